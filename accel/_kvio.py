"""Snapshot blocks from a file into a paged KV cache on a GPU, checked on the GPU.

The CPU reads each block straight into the cache rows (:func:`read_blocks_into`); a GPU cache
cannot be the target of a ``pread``. :class:`CudaBlockLoader` pipelines the three steps over
fixed-size chunks of blocks, so the host only reads:

1. reader threads ``pread`` chunk ``c`` into pinned slot ``c % slots``, several pieces of a
   chunk at once (the page cache or ``/dev/shm`` is a memcpy in the kernel: it scales with
   threads, and one thread per chunk left most of them idle);
2. on a copy stream the slot goes host-to-device into device chunk ``c % 2``; on a compute
   stream the GPU computes the BLAKE3 digest of every block of it and one kernel scatters its
   rows into the cache blocks, while the copy stream already moves chunk ``c + 1``;
3. a slot is read into again only once its host-to-device copy has completed, and a device
   chunk is copied into again only once its scatter has run (events).

Memory is bounded and allocated once (``slots`` pinned chunks and two device chunks), so the
first load of a fresh engine pays no allocation. The digests are compared by the caller: a block
whose digest differs (or whose read came up short) must be reported, so the engine recomputes it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ._blocks import BlockLayout

if TYPE_CHECKING:
    import torch

__all__ = ["CudaBlockLoader"]


class CudaBlockLoader:
    """Reads blocks of one or more snapshot files into CUDA KV cache layers (see module doc).

    Args:
        device: the CUDA device index of the cache.
        chunk_nbytes: bytes per pipeline chunk (rounded to whole blocks; at least one block).
        slots: pinned host chunks in flight (reads run ahead of the copies by this much).
        threads: reader threads.
        piece_nbytes: bytes one reader task reads (whole blocks; at least one block).

    Example:
        >>> loader = CudaBlockLoader(0)                                     # doctest: +SKIP
        >>> ok, digests = loader.load(fd, offsets, row, layers, ids, layout)  # doctest: +SKIP
    """

    def __init__(
        self,
        device: int,
        *,
        chunk_nbytes: int | None = None,
        slots: int | None = None,
        threads: int | None = None,
        piece_nbytes: int | None = None,
    ) -> None:
        import torch

        # Defaults (H200 sweep, benchmarks/gpu_kvio.py), overridable for tuning:
        # THAW_AGENTS_KV_CHUNK_MIB, _KV_SLOTS, _KV_READERS, _KV_PIECE_MIB.
        if chunk_nbytes is None:
            chunk_nbytes = int(os.environ.get("THAW_AGENTS_KV_CHUNK_MIB", "64")) << 20
        if slots is None:
            slots = int(os.environ.get("THAW_AGENTS_KV_SLOTS", "4"))
        if threads is None:
            threads = int(os.environ.get("THAW_AGENTS_KV_READERS", "16"))
        if piece_nbytes is None:
            piece_nbytes = int(os.environ.get("THAW_AGENTS_KV_PIECE_MIB", "8")) << 20
        self.device = device
        self.chunk_nbytes = chunk_nbytes
        self.piece_nbytes = piece_nbytes
        self.slots = slots
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="thaw-kv-read")
        self._copy_stream = torch.cuda.Stream(device=device)
        self._compute_stream = torch.cuda.Stream(device=device)
        self._lock = threading.Lock()
        self._host: torch.Tensor | None = None
        self._dev: torch.Tensor | None = None
        self._slot_nbytes = 0
        self._freed: list[Any] = []  # per host slot: its copy to the device has completed
        self._landed: list[Any] = []  # per device chunk: its copy from the host has completed
        self._used: list[Any] = []  # per device chunk: its digests and scatter have run

    def reserve(self, row_nbytes: int) -> None:
        """Allocate the pinned slots and the device chunks for blocks of ``row_nbytes`` now
        (engine start), so that the first load allocates nothing."""
        import torch

        from ._staging import aligned_empty

        rows = max(1, self.chunk_nbytes // row_nbytes)
        need = rows * row_nbytes
        if need <= self._slot_nbytes:
            return
        self._host = None
        self._dev = None
        host = aligned_empty(need * self.slots, pin_memory=True)
        host.zero_()  # fault the pages in now
        self._host = host
        self._dev = torch.empty((2, need), dtype=torch.uint8, device=self.device)
        self._slot_nbytes = need
        self._freed = [torch.cuda.Event() for _ in range(self.slots)]
        self._landed = [torch.cuda.Event() for _ in range(2)]
        self._used = [torch.cuda.Event() for _ in range(2)]

    def load(
        self,
        fd: int,
        offsets: Sequence[int],
        row_nbytes: int,
        layers: Sequence[torch.Tensor],
        block_ids: Sequence[int],
        layout: BlockLayout,
    ) -> tuple[list[bool], list[str | None]]:
        """Read block ``i`` of ``fd`` at ``offsets[i]`` (``row_nbytes`` each) into cache block
        ``block_ids[i]`` of every layer; return (complete, BLAKE3 hex digest) per block.

        An incomplete block (short read) has digest None; its cache rows hold garbage and must
        be reported to vLLM as failed, like a block whose digest differs from the manifest's.
        """
        import torch

        from ._blake3 import launch_blake3_digests
        from ._blocks import scatter_blocks

        n = len(block_ids)
        if len(offsets) != n:
            raise ValueError(f"{len(offsets)} offsets for {n} blocks")
        if n == 0:
            return [], []
        with self._lock:
            self.reserve(row_nbytes)
            assert self._host is not None and self._dev is not None
            rows_per = self._slot_nbytes // row_nbytes
            piece_rows = max(1, self.piece_nbytes // row_nbytes)
            chunks = [(s, min(n, s + rows_per)) for s in range(0, n, rows_per)]
            host = self._host.view(self.slots, self._slot_nbytes)
            host_np = host.numpy()
            complete = [False] * n
            copy, compute = self._copy_stream, self._compute_stream
            engine_stream = torch.cuda.current_stream(self.device)
            copy.wait_stream(engine_stream)
            compute.wait_stream(engine_stream)

            def read_piece(c: int, i: int, j: int) -> None:
                """Blocks ``i..j`` of chunk ``c``, back to back in the file."""
                self._freed[c % self.slots].synchronize()  # the slot's last copy has completed
                base = chunks[c][0]
                part = host_np[c % self.slots][(i - base) * row_nbytes : (j - base) * row_nbytes]
                got = _pread_full(fd, part, offsets[i])
                for k in range(i, j):
                    complete[k] = got >= (k - i + 1) * row_nbytes

            def submit(c: int) -> list[Future[None]]:
                start, end = chunks[c]
                pieces: list[Future[None]] = []
                i = start
                while i < end:
                    j = i + 1  # a run of blocks that lie back to back in the file, one piece long
                    while j < end and j - i < piece_rows and offsets[j] == offsets[j - 1] + row_nbytes:
                        j += 1
                    pieces.append(self._pool.submit(read_piece, c, i, j))
                    i = j
                return pieces

            reads: dict[int, list[Future[None]]] = {}
            for c in range(min(self.slots, len(chunks))):
                reads[c] = submit(c)
            pending = []
            try:
                for c, (start, end) in enumerate(chunks):
                    for future in reads.pop(c):
                        future.result()
                    slot, d = c % self.slots, c % 2
                    nbytes = (end - start) * row_nbytes
                    dev = self._dev[d, :nbytes]
                    with torch.cuda.stream(copy):
                        if c >= 2:
                            copy.wait_event(self._used[d])  # chunk c - 2 is done with it
                        dev.copy_(host[slot, :nbytes], non_blocking=True)
                        self._freed[slot].record(copy)
                        self._landed[d].record(copy)
                    with torch.cuda.stream(compute):
                        compute.wait_event(self._landed[d])
                        regions = [(k * row_nbytes, row_nbytes) for k in range(end - start)]
                        pending.append(launch_blake3_digests(dev, regions))
                        scatter_blocks(
                            dev.view(end - start, row_nbytes),
                            layers,
                            list(block_ids[start:end]),
                            layout=layout,
                            non_blocking=True,
                        )
                        self._used[d].record(compute)
                    if c + self.slots < len(chunks):
                        reads[c + self.slots] = submit(c + self.slots)
            finally:
                for futures in reads.values():  # an error above: let the readers finish first
                    for future in futures:
                        future.exception()
            digests: list[str | None] = []
            for p in pending:
                digests.extend(p.result())
            compute.synchronize()
            copy.synchronize()
        return complete, [d if ok else None for d, ok in zip(digests, complete, strict=True)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._host = None
        self._dev = None


def _pread_full(fd: int, view: Any, offset: int) -> int:
    """Read up to ``len(view)`` bytes at ``offset`` (looping over short reads); bytes read."""
    mv = memoryview(view).cast("B")
    got = 0
    while got < mv.nbytes:
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got
