"""CPU block gather/scatter: bit-exact round trips and refused bad input."""

from __future__ import annotations

import random

import pytest
import torch

from thaw_agents.accel import BlockLayout, gather_blocks, scatter_blocks, staging_nbytes


def _cache(num_blocks: int, shape=(3, 32, 128), layers: int = 4, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((num_blocks, *shape), generator=gen).to(dtype) for _ in range(layers)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_round_trip_random_ids(dtype: torch.dtype) -> None:
    src = (
        _cache(64, dtype=dtype)
        if dtype != torch.uint8
        else [torch.randint(0, 255, (64, 5, 7), dtype=torch.uint8) for _ in range(3)]
    )
    dst = [torch.zeros_like(t) for t in src]
    ids = random.Random(1).sample(range(64), 17)
    targets = random.Random(2).sample(range(64), 17)
    staged = gather_blocks(src, ids)
    assert staged.shape == (17, staging_nbytes(src, 1))
    scatter_blocks(staged, dst, targets)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(s[ids].view(torch.uint8), d[targets].view(torch.uint8))
    untouched = sorted(set(range(64)) - set(targets))
    assert all(int(d[untouched].view(torch.uint8).abs().sum()) == 0 for d in dst)


def test_odd_sizes_and_layouts() -> None:
    # FlashAttention-style [2, num_blocks, block, heads, dim]: blocks are not contiguous.
    src = [torch.randn(2, 10, 3, 1, 5) for _ in range(2)]
    dst = [torch.zeros_like(t) for t in src]
    layout = BlockLayout(block_dim=1)
    scatter_blocks(gather_blocks(src, [9, 0, 4], layout=layout), dst, [1, 2, 3], layout=layout)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(s[:, [9, 0, 4]], d[:, [1, 2, 3]])


def test_empty_list() -> None:
    src = _cache(4)
    staged = gather_blocks(src, [])
    assert staged.shape[0] == 0
    scatter_blocks(staged, src, [])


def test_repeated_ids_refused() -> None:
    src = _cache(8)
    with pytest.raises(ValueError, match="repeated"):
        gather_blocks(src, [1, 1])
    with pytest.raises(ValueError, match="repeated"):
        scatter_blocks(gather_blocks(src, [1, 2]), src, [3, 3])


def test_out_of_range_refused() -> None:
    with pytest.raises(IndexError):
        gather_blocks(_cache(8), [8])


def test_wrong_staging_shape_refused() -> None:
    src = _cache(8)
    with pytest.raises(ValueError, match="shape"):
        scatter_blocks(torch.zeros(2, 3, dtype=torch.uint8), src, [0, 1])


def test_reused_out_buffer() -> None:
    src = _cache(8)
    out = torch.empty((2, staging_nbytes(src, 1)), dtype=torch.uint8)
    assert gather_blocks(src, [3, 4], out=out) is out
    assert torch.equal(out, gather_blocks(src, [3, 4]))
