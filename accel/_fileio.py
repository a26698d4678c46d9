"""File I/O straight between snapshot files and a paged KV cache on the CPU.

A snapshot stores each block as one region laid out ``[layer][layer block bytes]``. On the
CPU each layer's block is a contiguous row of its cache tensor, so a block can be read with
one ``preadv`` whose iovecs point into the cache rows themselves, and written with one
``pwritev`` from them: no staging copy, no page faults on a fresh buffer. Checksums are
computed over the same views as they are read or written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._blocks import BlockLayout, _block_view, _u8_rows

if TYPE_CHECKING:
    import torch

__all__ = ["block_views", "read_blocks_into"]

# Linux allows 1024 iovecs per call; stay well inside it.
_IOV_MAX = 512


def block_views(
    layers: Sequence[torch.Tensor], block_ids: Sequence[int], layout: BlockLayout | None = None
) -> list[list[memoryview]] | None:
    """Per block, a memoryview of each layer's bytes of that block (views into the cache).

    None when blocks are not contiguous rows (GPU tensors, FlashAttention's K/V split): use
    :func:`~thaw_agents.accel.gather_blocks` with a staging buffer instead.
    """
    layout = layout or BlockLayout()
    rows = [_u8_rows(_block_view(layer, layout)) for layer in layers]
    if any(r is None for r in rows):
        return None
    num_blocks = rows[0].shape[0]
    out = []
    for b in block_ids:
        if b < 0 or b >= num_blocks:
            raise IndexError(f"block id {b} is outside 0..{num_blocks - 1}")
        out.append([memoryview(r[b]) for r in rows])
    return out


def read_blocks_into(
    fd: int,
    file_offsets: Sequence[int],
    views: Sequence[Sequence[memoryview]],
    *,
    hasher: Callable[[], Any] | None = None,
) -> tuple[list[bool], list[str | None]]:
    """Read block ``i`` from ``file_offsets[i]`` into ``views[i]``; return (complete, digest) per block.

    A short read marks that block incomplete (its bytes must not be used) and does not stop the
    others. With ``hasher`` (e.g. ``blake3.blake3``) each block's hex digest is returned.
    """
    complete: list[bool] = []
    digests: list[str | None] = []
    for offset, iov in zip(file_offsets, views, strict=True):
        want = sum(v.nbytes for v in iov)
        got = 0
        for start in range(0, len(iov), _IOV_MAX):
            chunk = iov[start : start + _IOV_MAX]
            n = os.preadv(fd, chunk, offset + got)
            got += n
            if n != sum(v.nbytes for v in chunk):
                break
        complete.append(got == want)
        if hasher is not None and got == want:
            h = hasher()
            for v in iov:
                h.update(v)
            digests.append(h.hexdigest())
        else:
            digests.append(None)
    return complete, digests
