"""The CUDA data path: one CuPy raw-kernel launch per gather, scatter or multi-tensor copy.

Tensors stay PyTorch's: the kernels receive raw device pointers (``data_ptr()``, the same
addresses ``__cuda_array_interface__`` exports), so nothing is copied or re-wrapped, and
every launch runs on PyTorch's current stream (``cupy.cuda.ExternalStream``), ordered with
the caller's own work.

Host endpoints (a pinned staging buffer) take one of two routes:

* ``staged`` (default): the kernel gathers into a device scratch chunk and a second stream
  copies that chunk to the pinned buffer with ``cudaMemcpyAsync`` while the kernel gathers
  the next one (two scratch chunks, two streams). Scatter runs the same pipeline backwards.
* ``direct``: the kernel reads or writes the pinned, mapped host buffer itself over PCIe.

Pageable host memory cannot be reached by the GPU asynchronously; it goes through a device
scratch buffer and a synchronous ``copy_``.

CuPy is imported on first use; without it :class:`CupyMissingError` names the install command.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._kernels import CupyMissingError, kernel, require_cupy

if TYPE_CHECKING:
    import torch

    from ._blocks import BlockLayout

__all__ = [
    "CupyMissingError",
    "check_cuda_data_path",
    "copy_segments_cuda",
    "cuda_host_path",
    "gather_cuda",
    "is_pinned",
    "require_cupy",
    "scatter_cuda",
]

HostRoute = Literal["staged", "direct"]

# Staged host route. Transfers up to _WHOLE_NBYTES get a device scratch of their own size and
# chunks that double from _FIRST_NBYTES: the first PCIe copy starts after a short gather and
# every later gather finishes before the copy ahead of it (measured on an H100: 85% of the
# pinned bandwidth with fixed 16 MiB chunks). Larger transfers rotate two _CHUNK_NBYTES slots.
_FIRST_NBYTES = 4 << 20
_CHUNK_NBYTES = 64 << 20
_WHOLE_NBYTES = 512 << 20
_THREADS = 256
# Work items of one CTA in copy_segments: big tensors are split so every SM gets work.
_TASK_NBYTES = 256 << 10


def _grid(device: int, tasks: int) -> int:
    return max(1, min(tasks, _state(device).sms * 8))


def is_pinned(tensor: torch.Tensor) -> bool:
    """Whether a CPU tensor's memory is page-locked (cudaHostAlloc or cudaHostRegister)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    cp = require_cupy()
    try:
        attrs = cp.cuda.runtime.pointerGetAttributes(tensor.data_ptr())
    except cp.cuda.runtime.CUDARuntimeError:
        return False
    return int(attrs.type) == 1  # cudaMemoryTypeHost


def _segments(layers: Sequence[torch.Tensor], layout: BlockLayout) -> np.ndarray:
    """The per-segment table of :data:`thaw_blocks`: one row per contiguous run of a layer block."""
    rows: list[tuple[int, int, int, int]] = []
    col = 0
    for layer in layers:
        bd = layout.block_dim
        inner = layer.shape[bd + 1 :]
        seg_numel = int(np.prod(inner, dtype=np.int64)) if inner else 1
        expected = 1
        for size, stride in zip(reversed(inner), reversed(layer.stride()[bd + 1 :]), strict=True):
            if size != 1 and stride != expected:
                raise ValueError(
                    f"the dimensions after block_dim of a {tuple(layer.shape)} layer with strides "
                    f"{layer.stride()} are not contiguous; make the layer contiguous first"
                )
            expected *= size
        es = layer.element_size()
        seg_nbytes = seg_numel * es
        block_stride = layer.stride(bd) * es
        outer_shape = layer.shape[:bd]
        outer_strides = layer.stride()[:bd]
        for outer in np.ndindex(*outer_shape) if outer_shape else [()]:
            offset = sum(i * s for i, s in zip(outer, outer_strides, strict=True)) * es
            rows.append((layer.data_ptr() + offset, block_stride, col, seg_nbytes))
            col += seg_nbytes
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


class _DeviceState:
    """Per-device cached tables, scratch chunks and the side stream of the staged route."""

    def __init__(self, device: int) -> None:
        import torch

        self.device = device
        self.copy_stream = torch.cuda.Stream(device=device)
        self.scratch: list[torch.Tensor] = []
        self.seg_key: tuple[Any, ...] | None = None
        self.seg_table: Any = None
        self.num_segs = 0
        self.lock = threading.Lock()
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._cupy_streams: dict[int, Any] = {}

    def cupy_stream(self, handle: int) -> Any:
        """CuPy's view of a PyTorch stream (cached: creating one costs more than a launch)."""
        stream = self._cupy_streams.get(handle)
        if stream is None:
            stream = require_cupy().cuda.ExternalStream(handle, self.device)
            self._cupy_streams[handle] = stream
        return stream

    def segments(self, layers: Sequence[torch.Tensor], layout: BlockLayout) -> tuple[Any, int]:
        # Cheap key: a per-call tuple of every layer's shape and strides cost ~0.1 ms for 32
        # layers, 4% of a 65-block transfer. Caches are allocated once and keep their layout.
        first, last = layers[0], layers[-1]
        key = (
            layout.block_dim,
            tuple(t.data_ptr() for t in layers),
            first.shape,
            first.stride(),
            first.dtype,
            last.shape,
            last.stride(),
            last.dtype,
        )
        if key != self.seg_key:
            import torch

            table = _segments(layers, layout)
            self.seg_table = torch.from_numpy(table).to(f"cuda:{self.device}")
            self.num_segs = len(table)
            self.seg_key = key
        return self.seg_table, self.num_segs

    def scratch_of(self, nbytes: int) -> torch.Tensor:
        """A device scratch buffer of at least ``nbytes`` (grow-only, reused)."""
        import torch

        if not self.scratch or self.scratch[0].numel() < nbytes:
            self.scratch = []  # free the old one first
            self.scratch = [torch.empty(nbytes, dtype=torch.uint8, device=self.device)]
        return self.scratch[0]

    def chunks(self, n: int, row: int) -> list[tuple[int, int, torch.Tensor, int]]:
        """(first row, rows, scratch slice, slot) per chunk; slot -1: the slice is never reused."""
        if n * row <= _WHOLE_NBYTES:
            scratch = self.scratch_of(n * row)
            out, start, size = [], 0, max(1, _FIRST_NBYTES // row)
            while start < n:
                count = min(size, n - start)
                out.append((start, count, scratch[start * row : (start + count) * row], -1))
                start += count
                size = min(2 * size, max(1, _CHUNK_NBYTES // row))
            return out
        rows = max(1, _CHUNK_NBYTES // row)
        scratch = self.scratch_of(2 * rows * row)
        return [
            (
                start,
                min(rows, n - start),
                scratch[(k % 2) * rows * row :][: min(rows, n - start) * row],
                k % 2,
            )
            for k, start in enumerate(range(0, n, rows))
        ]


_devices: dict[int, _DeviceState] = {}
_state_lock = threading.Lock()


def _state(device: int) -> _DeviceState:
    with _state_lock:
        state = _devices.get(device)
        if state is None:
            state = _devices[device] = _DeviceState(device)
    return state


def _launch_blocks(
    state: _DeviceState,
    segs: tuple[Any, int],
    ids_dev: torch.Tensor,
    staged_ptr: int,
    row_nbytes: int,
    to_staged: bool,
) -> None:
    import torch

    cp = require_cupy()
    table, num_segs = segs
    num_ids = ids_dev.numel()
    launch = kernel("thaw_blocks", state.device)
    stream = torch.cuda.current_stream(state.device)
    with cp.cuda.Device(state.device), state.cupy_stream(stream.cuda_stream):
        launch(
            (_grid(state.device, num_ids * num_segs),),
            (_THREADS,),
            (
                np.uint64(table.data_ptr()),
                np.int32(num_segs),
                np.uint64(ids_dev.data_ptr()),
                np.int32(num_ids),
                np.uint64(staged_ptr),
                np.int64(row_nbytes),
                np.int32(1 if to_staged else 0),
            ),
        )


def _ids_on(device: int, ids: Sequence[int]) -> torch.Tensor:
    import torch

    host = torch.tensor(list(ids), dtype=torch.int64).pin_memory()
    return host.to(f"cuda:{device}", non_blocking=True)


def cuda_host_path(out: torch.Tensor) -> str:
    """How a host staging tensor will be reached: ``pinned`` or ``pageable``."""
    return "pinned" if is_pinned(out) else "pageable"


def gather_cuda(
    layers: Sequence[torch.Tensor],
    ids: Sequence[int],
    out: torch.Tensor,
    layout: BlockLayout,
    *,
    non_blocking: bool = False,
    route: HostRoute = "staged",
) -> None:
    """Gather ``ids`` of CUDA ``layers`` into ``out`` (device, or host: pinned or pageable).

    Runs on PyTorch's current stream. With a host ``out`` and ``non_blocking=False`` it
    returns once the bytes are there; with ``non_blocking=True`` synchronize the current
    stream before reading ``out``.
    """
    import torch

    device = layers[0].device.index or 0
    state = _state(device)
    row = out.shape[1]
    ids_dev = _ids_on(device, ids)
    with state.lock:
        segs = state.segments(layers, layout)
        if out.is_cuda:
            _launch_blocks(state, segs, ids_dev, out.data_ptr(), row, True)
            return
        pinned = is_pinned(out)
        if pinned and route == "direct":
            _launch_blocks(state, segs, ids_dev, out.data_ptr(), row, True)
        elif pinned:
            _staged_to_host(state, segs, ids_dev, out, row)
        else:
            scratch = torch.empty_like(out, device=f"cuda:{device}")
            _launch_blocks(state, segs, ids_dev, scratch.data_ptr(), row, True)
            out.copy_(scratch)
        if not non_blocking:
            torch.cuda.current_stream(device).synchronize()


def _staged_to_host(
    state: _DeviceState,
    segs: tuple[Any, int],
    ids_dev: torch.Tensor,
    out: torch.Tensor,
    row: int,
) -> None:
    import torch

    main = torch.cuda.current_stream(state.device)
    side = state.copy_stream
    freed: list[torch.cuda.Event | None] = [None, None]
    last = None
    for start, count, slot, k in state.chunks(ids_dev.numel(), row):
        if k >= 0 and freed[k] is not None:
            main.wait_event(freed[k])  # the side stream is done reading this slot
        _launch_blocks(state, segs, ids_dev[start : start + count], slot.data_ptr(), row, True)
        ready = torch.cuda.Event()
        ready.record(main)
        side.wait_event(ready)
        with torch.cuda.stream(side):
            out[start : start + count].view(-1).copy_(slot, non_blocking=True)
        last = torch.cuda.Event()
        last.record(side)
        if k >= 0:
            freed[k] = last
    if last is not None:
        main.wait_event(last)  # the side stream runs its copies in order
        state.scratch[0].record_stream(side)  # freed or regrown only after these copies


def scatter_cuda(
    staged: torch.Tensor,
    layers: Sequence[torch.Tensor],
    ids: Sequence[int],
    layout: BlockLayout,
    *,
    non_blocking: bool = False,
    route: HostRoute = "staged",
) -> None:
    """Scatter rows of ``staged`` (device or host) into ``ids`` of CUDA ``layers``.

    Runs on PyTorch's current stream; with a host ``staged`` and ``non_blocking=False`` it
    returns once ``staged`` may be reused.
    """
    import torch

    device = layers[0].device.index or 0
    state = _state(device)
    row = staged.shape[1]
    ids_dev = _ids_on(device, ids)
    with state.lock:
        segs = state.segments(layers, layout)
        if staged.is_cuda:
            src = staged if staged.is_contiguous() else staged.contiguous()
            _launch_blocks(state, segs, ids_dev, src.data_ptr(), row, False)
            if src is not staged:
                src.record_stream(torch.cuda.current_stream(device))
            return
        src = staged if staged.is_contiguous() else staged.contiguous()
        pinned = is_pinned(src)
        if pinned and route == "direct":
            _launch_blocks(state, segs, ids_dev, src.data_ptr(), row, False)
        elif pinned:
            _staged_from_host(state, segs, ids_dev, src, row)
        else:
            dev = src.to(f"cuda:{device}")
            _launch_blocks(state, segs, ids_dev, dev.data_ptr(), row, False)
            dev.record_stream(torch.cuda.current_stream(device))
        if not non_blocking:
            torch.cuda.current_stream(device).synchronize()


def _staged_from_host(
    state: _DeviceState,
    segs: tuple[Any, int],
    ids_dev: torch.Tensor,
    staged: torch.Tensor,
    row: int,
) -> None:
    import torch

    main = torch.cuda.current_stream(state.device)
    side = state.copy_stream
    side.wait_stream(main)  # the scratch may still be read by earlier work on main
    consumed: list[torch.cuda.Event | None] = [None, None]
    for start, count, slot, k in state.chunks(ids_dev.numel(), row):
        if k >= 0 and consumed[k] is not None:
            side.wait_event(consumed[k])  # the kernel is done with this slot
        with torch.cuda.stream(side):
            slot.copy_(staged[start : start + count].view(-1), non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record(side)
        main.wait_event(arrived)
        _launch_blocks(state, segs, ids_dev[start : start + count], slot.data_ptr(), row, False)
        if k >= 0:
            used = torch.cuda.Event()
            used.record(main)
            consumed[k] = used
    if state.scratch:
        state.scratch[0].record_stream(side)


def copy_segments_cuda(copies: Sequence[tuple[int, int, int]], device: int) -> None:
    """Run many ``(src_ptr, dst_ptr, nbytes)`` copies in one kernel launch on the current stream.

    Pointers are device pointers, or pinned host pointers (read or written over PCIe). Big
    copies are split into 256 KiB tasks so every SM has work.

    Example:
        >>> import torch
        >>> a, b = torch.arange(8, device="cuda"), torch.empty(8, dtype=torch.int64, device="cuda")
        >>> copy_segments_cuda([(a.data_ptr(), b.data_ptr(), 64)], 0)  # doctest: +SKIP
    """
    import torch

    if not copies:
        return
    src, dst, size = (np.asarray(c, dtype=np.int64) for c in zip(*copies, strict=True))
    pieces = np.maximum(1, -(-size // _TASK_NBYTES))
    owner = np.repeat(np.arange(len(size)), pieces)
    first = np.cumsum(pieces) - pieces
    k = np.arange(len(owner)) - np.repeat(first, pieces)
    start = k * _TASK_NBYTES
    nbytes = np.minimum(size[owner] - start, _TASK_NBYTES)
    table = np.stack([src[owner] + start, dst[owner] + start, nbytes], axis=1).astype(np.int64)
    cp = require_cupy()
    table_dev = (
        torch.from_numpy(np.ascontiguousarray(table)).pin_memory().to(f"cuda:{device}", non_blocking=True)
    )
    launch = kernel("thaw_copy_table", device)
    stream = torch.cuda.current_stream(device)
    with cp.cuda.Device(device), _state(device).cupy_stream(stream.cuda_stream):
        launch(
            (_grid(device, len(table)),),
            (_THREADS,),
            (np.uint64(table_dev.data_ptr()), np.int64(len(table))),
        )
    table_dev.record_stream(stream)


def check_cuda_data_path(device: int) -> None:
    """Prove the CUDA data path works on ``device`` before an engine relies on it: CuPy
    imports, the kernels compile, and a gather and a scatter of a small test cache round-trip.

    Raises:
        CupyMissingError: CuPy is not installed (the message is the pip command).
        RuntimeError: CuPy is there but cannot run here (another CUDA major than PyTorch's,
            no compiler runtime); the message says what failed and what to install.
    """
    import torch

    from ._blocks import BlockLayout, gather_blocks, scatter_blocks
    from ._kernels import _install_command

    require_cupy()
    try:
        src = [torch.arange(4 * 2 * 8, dtype=torch.int32, device=device).view(4, 2, 8) for _ in range(2)]
        dst = [torch.zeros_like(t) for t in src]
        staged = gather_blocks(src, [3, 1], layout=BlockLayout(block_dim=0))
        scatter_blocks(staged, dst, [0, 2], layout=BlockLayout(block_dim=0))
        torch.cuda.synchronize(device)
        ok = all(torch.equal(d[0], s[3]) and torch.equal(d[2], s[1]) for s, d in zip(src, dst, strict=True))
    except CupyMissingError:
        raise
    except Exception as exc:
        raise RuntimeError(
            f"thaw's CUDA data path does not run on cuda:{device} (PyTorch CUDA {torch.version.cuda}): "
            f"{type(exc).__name__}: {exc}. Install the CuPy build for this CUDA: {_install_command()}"
        ) from exc
    if not ok:
        raise RuntimeError(f"thaw's CUDA gather/scatter self-test gave wrong bytes on cuda:{device}")
