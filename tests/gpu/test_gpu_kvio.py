"""CudaBlockLoader: snapshot rows from a file into a GPU paged cache, digests computed on the GPU."""

from __future__ import annotations

import os

import blake3
import pytest

torch = pytest.importorskip("torch")


def _cache(num_blocks: int, layers: int = 4) -> list:
    # The FlashAttention layout vLLM 0.24 hands the connector: [blocks, 2, 16, kv_heads, head_dim].
    return [torch.zeros(num_blocks, 2, 16, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]


def _rows(n: int, row: int) -> list[bytes]:
    return [os.urandom(row) for _ in range(n)]


@pytest.mark.parametrize("chunk_nbytes", [1 << 20, 64 << 10])
def test_loader_round_trip(tmp_path, chunk_nbytes):
    from thaw_agents.accel import BlockLayout, CudaBlockLoader, gather_blocks

    layers = _cache(64)
    row = sum(t[0].numel() * t.element_size() for t in layers)
    rows = _rows(40, row)
    path = tmp_path / "blocks.bin"
    path.write_bytes(b"H" * 4096 + b"".join(rows))
    offsets = [4096 + i * row for i in range(40)]
    ids = [63 - 2 * i for i in range(20)] + list(range(20))
    loader = CudaBlockLoader(0, chunk_nbytes=chunk_nbytes, slots=3, threads=2)
    fd = os.open(path, os.O_RDONLY)
    try:
        complete, digests = loader.load(fd, offsets, row, layers, ids, BlockLayout(block_dim=0))
    finally:
        os.close(fd)
        loader.close()
    assert all(complete)
    assert digests == [blake3.blake3(r).hexdigest() for r in rows]
    back = gather_blocks(layers, ids).cpu().numpy()
    for i, r in enumerate(rows):
        assert back[i].tobytes() == r


def test_loader_short_file_marks_incomplete(tmp_path):
    from thaw_agents.accel import BlockLayout, CudaBlockLoader

    layers = _cache(8, layers=2)
    row = sum(t[0].numel() * t.element_size() for t in layers)
    rows = _rows(4, row)
    path = tmp_path / "short.bin"
    path.write_bytes(b"".join(rows)[: 3 * row + 100])  # the last block is cut short
    loader = CudaBlockLoader(0, chunk_nbytes=row, slots=2, threads=2)
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = [i * row for i in range(4)]
        complete, digests = loader.load(fd, offsets, row, layers, [0, 1, 2, 3], BlockLayout())
    finally:
        os.close(fd)
        loader.close()
    assert complete == [True, True, True, False]
    assert digests[:3] == [blake3.blake3(r).hexdigest() for r in rows[:3]] and digests[3] is None


def test_cuda_data_path_self_test():
    from thaw_agents.accel import check_cuda_data_path

    check_cuda_data_path(0)
