"""Many tensor-to-tensor copies at once: one kernel launch on CUDA, memcpys on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["copy_segments"]


def _u8(t: torch.Tensor) -> torch.Tensor:
    import torch

    if not t.is_contiguous():
        raise ValueError("copy_segments needs contiguous tensors")
    return t.reshape(-1).view(torch.uint8)


def copy_segments(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy the bytes of each ``src`` into its ``dst`` (same byte size, contiguous).

    When every destination is on one GPU, all copies run as one kernel launch on the
    current stream (sources on that GPU or in pinned host memory); otherwise each pair is
    an ordinary ``copy_``.

    Example:
        >>> import torch
        >>> a, b = torch.arange(4), torch.zeros(4, dtype=torch.int64)
        >>> copy_segments([(a, b)])
        >>> b.tolist()
        [0, 1, 2, 3]
    """
    if not pairs:
        return
    flat = [(_u8(s), _u8(d)) for s, d in pairs]
    for s, d in flat:
        if s.numel() != d.numel():
            raise ValueError(f"copy_segments: {s.numel()} source bytes for {d.numel()} destination bytes")
    devices = {d.device for _, d in flat}
    if len(devices) == 1 and next(iter(devices)).type == "cuda":
        device = next(iter(devices)).index or 0
        from ._cuda import copy_segments_cuda, is_pinned

        if all(s.device == d.device or is_pinned(s) for s, d in flat):
            copy_segments_cuda(
                [(s.data_ptr(), d.data_ptr(), s.numel()) for s, d in flat if s.numel()], device
            )
            return
    for s, d in flat:
        d.copy_(s)
