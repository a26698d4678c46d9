"""Reusable host staging buffers.

Allocating a fresh 100 MB buffer per transfer costs more than the copy itself (first-touch
page faults measured at ~200 ms for 92 MB on the 2-core CPU machine against ~7 ms for the
memcpy). A staging buffer grows once and is reused; on CUDA machines it is page-locked so
device copies run at full PCIe bandwidth.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["StagingBuffer"]


class StagingBuffer:
    """A grow-only uint8 host buffer handed out as ``[rows, row_nbytes]`` views.

    Example:
        >>> buf = StagingBuffer()
        >>> view = buf.rows(4, 1024)
        >>> tuple(view.shape)
        (4, 1024)
    """

    def __init__(self, *, pin_memory: bool = False) -> None:
        self._pin = pin_memory
        self._buffer: torch.Tensor | None = None
        self.lock = threading.Lock()

    @property
    def capacity_nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def rows(self, num_rows: int, row_nbytes: int) -> torch.Tensor:
        """A ``[num_rows, row_nbytes]`` uint8 view of the buffer (valid until the next call)."""
        import torch

        need = num_rows * row_nbytes
        if self._buffer is None or self._buffer.numel() < need:
            size = max(need, 2 * self.capacity_nbytes)
            self._buffer = None  # release the old one first
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
            buffer.zero_()  # fault the pages in now, not inside a timed transfer
            self._buffer = buffer
        return self._buffer[:need].view(num_rows, row_nbytes)

    def release(self) -> None:
        self._buffer = None
