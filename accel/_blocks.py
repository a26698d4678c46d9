"""Block gather/scatter over paged KV caches.

A paged KV cache is one tensor per layer whose ``block_dim`` indexes blocks. ``gather``
copies the blocks ``block_ids`` of every layer into one contiguous staging tensor laid out
``[block][layer][block bytes]``; ``scatter`` copies such a staging tensor back into other
block ids of another cache. The layout is block-major so each snapshot block is one
contiguous, separately checksummed region.

On CPU this is NumPy/PyTorch; on CUDA (see ``_cuda.py``) one kernel launch covers every
layer and block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["BlockLayout", "gather_blocks", "scatter_blocks", "staging_nbytes"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockLayout:
    """How to find a block's bytes in each layer tensor.

    Attributes:
        block_dim: the dimension that indexes blocks (0 on CPU and FlashInfer-NHD
            without a leading K/V axis; 1 for FlashAttention's ``[2, blocks, ...]``).
    """

    block_dim: int = 0


def _check_ids(block_ids: Sequence[int], num_blocks: int) -> list[int]:
    ids = block_ids.tolist() if hasattr(block_ids, "tolist") else [int(b) for b in block_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("block_ids contains repeated ids; each block may appear once")
    for b in ids:
        if b < 0 or b >= num_blocks:
            raise IndexError(f"block id {b} is outside 0..{num_blocks - 1}")
    return ids


def _block_view(layer: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``layer`` as [num_blocks, ...] with the block dimension first (a view, no copy)."""
    return layer.movedim(layout.block_dim, 0) if layout.block_dim else layer


def _layer_block_nbytes(layer: torch.Tensor, layout: BlockLayout) -> int:
    return layer.numel() // layer.shape[layout.block_dim] * layer.element_size()


def staging_nbytes(layers: Sequence[torch.Tensor], num_blocks: int, layout: BlockLayout | None = None) -> int:
    """Bytes a staging buffer needs for ``num_blocks`` blocks of ``layers``."""
    layout = layout or BlockLayout()
    return num_blocks * sum(_layer_block_nbytes(t, layout) for t in layers)


def _checked(
    layers: Sequence[torch.Tensor], block_ids: Sequence[int], layout: BlockLayout | None
) -> tuple[BlockLayout, list[int], int]:
    """The layout, the validated block ids and the staging row's bytes, for gather and scatter."""
    layout = layout or BlockLayout()
    if not layers:
        raise ValueError("no layers given")
    ids = _check_ids(block_ids, layers[0].shape[layout.block_dim])
    return layout, ids, sum(_layer_block_nbytes(t, layout) for t in layers)


def _u8_rows(view: torch.Tensor):
    """[num_blocks, ...] -> a NumPy uint8 [num_blocks, block_nbytes] view, or None if blocks
    are not contiguous rows (then the torch fallback copies)."""
    import torch

    if view.device.type != "cpu" or not view.is_contiguous():
        return None
    return view.reshape(view.shape[0], -1).view(torch.uint8).numpy()


def gather_blocks(
    layers: Sequence[torch.Tensor],
    block_ids: Sequence[int],
    out: torch.Tensor | None = None,
    *,
    layout: BlockLayout | None = None,
    non_blocking: bool = False,
) -> torch.Tensor:
    """Copy ``block_ids`` of every layer into ``out`` (uint8 ``[n, sum of layer block bytes]``).

    CUDA layers: one kernel launch on PyTorch's current stream covers every layer and block.
    ``out`` may live on the GPU (default) or the host; a pinned host ``out`` is filled by a
    two-stream pipeline at PCIe bandwidth. With a host ``out`` the call returns once the bytes
    are there, unless ``non_blocking=True`` (then synchronize the current stream first).

    Example:
        >>> import torch
        >>> kv = [torch.arange(4 * 6, dtype=torch.float32).view(4, 2, 3) for _ in range(2)]
        >>> staged = gather_blocks(kv, [3, 1])
        >>> tuple(staged.shape)
        (2, 48)
    """
    import torch

    layout, ids, total = _checked(layers, block_ids, layout)
    if out is None:
        out = torch.empty((len(ids), total), dtype=torch.uint8, device=layers[0].device)
    elif out.dtype != torch.uint8 or tuple(out.shape) != (len(ids), total) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous uint8 tensor of shape {(len(ids), total)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    if not ids:
        return out
    if layers[0].is_cuda:
        from ._cuda import gather_cuda

        gather_cuda(layers, ids, out, layout, non_blocking=non_blocking)
        return out
    # One memcpy per (block, layer) straight into the staging row: measured as fast as a
    # plain NumPy copy of the same bytes, where index_select + copy paid twice.
    out_np = out.numpy() if out.device.type == "cpu" else None
    index = None
    col = 0
    for layer in layers:
        view = _block_view(layer, layout)
        nbytes = _layer_block_nbytes(layer, layout)
        rows = _u8_rows(view)
        if rows is not None and out_np is not None:
            dst = out_np[:, col : col + nbytes]
            for i, b in enumerate(ids):
                dst[i] = rows[b]
        else:
            if index is None:
                index = torch.tensor(ids, dtype=torch.long)
            picked = view.index_select(0, index).contiguous()
            out[:, col : col + nbytes].copy_(picked.reshape(len(ids), -1).view(torch.uint8))
        col += nbytes
    return out


def scatter_blocks(
    staged: torch.Tensor,
    layers: Sequence[torch.Tensor],
    block_ids: Sequence[int],
    *,
    layout: BlockLayout | None = None,
    non_blocking: bool = False,
) -> None:
    """Copy rows of ``staged`` (as produced by :func:`gather_blocks`) into ``block_ids`` of ``layers``.

    CUDA layers: one kernel launch on the current stream; ``staged`` may be on the GPU or
    the host (pinned: pipelined over two streams). With a host ``staged`` the call returns
    once ``staged`` may be reused, unless ``non_blocking=True``.

    Example:
        >>> import torch
        >>> src = [torch.randn(4, 2, 3) for _ in range(2)]
        >>> dst = [torch.zeros(4, 2, 3) for _ in range(2)]
        >>> scatter_blocks(gather_blocks(src, [0, 2]), dst, [1, 3])
        >>> bool(torch.equal(dst[1][3], src[1][2]))
        True
    """
    import torch

    layout, ids, total = _checked(layers, block_ids, layout)
    if staged.dtype != torch.uint8 or tuple(staged.shape) != (len(ids), total):
        raise ValueError(
            f"staged must be uint8 of shape {(len(ids), total)}, got {staged.dtype} {tuple(staged.shape)}"
        )
    if not ids:
        return
    if layers[0].is_cuda:
        from ._cuda import scatter_cuda

        scatter_cuda(staged, layers, ids, layout, non_blocking=non_blocking)
        return
    staged_np = staged.numpy() if staged.device.type == "cpu" and staged.is_contiguous() else None
    index = None
    col = 0
    for layer in layers:
        view = _block_view(layer, layout)
        nbytes = _layer_block_nbytes(layer, layout)
        rows = _u8_rows(view)
        if rows is not None and staged_np is not None:
            src = staged_np[:, col : col + nbytes]
            for i, b in enumerate(ids):
                rows[b] = src[i]
        else:
            if index is None:
                index = torch.tensor(ids, dtype=torch.long)
            part = staged[:, col : col + nbytes].contiguous()
            view.index_copy_(0, index, part.view(layer.dtype).reshape((len(ids), *view.shape[1:])))
        col += nbytes
