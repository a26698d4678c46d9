"""Pipelined file I/O: O_DIRECT with aligned buffers, several requests in flight, atomic files.

Large sequential transfers bypass the page cache (``O_DIRECT``) so a 16 GB freeze neither
evicts the working set nor pays a second memcpy, and several chunk requests run at once so
NVMe queues stay full. Where ``O_DIRECT`` is refused (tmpfs, some network and overlay
filesystems) the same code runs with buffered I/O: :func:`probe_o_direct` decides once per
filesystem.

* :class:`AtomicFile`: a temporary file beside the destination; :meth:`~AtomicFile.commit`
  fsyncs, renames and fsyncs the directory, so the destination appears complete or not at all.
* :func:`write_segments`: stream tensors (host or CUDA) into a file through a ring of
  aligned, pinned slots: device-to-host copies, writes and checksums overlap.
* :func:`read_into`: read a file range into an aligned host buffer with several reads in
  flight, reporting each chunk as it lands.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ._staging import PAGE_NBYTES, aligned_empty

if TYPE_CHECKING:
    import torch

__all__ = ["O_DIRECT", "AtomicFile", "probe_o_direct", "read_into", "write_segments"]

O_DIRECT = getattr(os, "O_DIRECT", 0)
CHUNK_NBYTES = 32 << 20
# Defaults of write_segments, read at call time (benchmarks tune them).
WRITE_TUNING: dict[str, Any] = {
    "chunk_nbytes": 32 << 20,
    "num_buffers": 6,
    "num_writers": 4,
    # fallocate first never helped on the H100 host's virtio disk: 83% vs 84% of dd's O_DIRECT
    # write interleaved, 2-11 points behind in one-off runs (benchmarks/accel_gpu.py).
    "preallocate": False,
}


def _round_up(n: int, align: int = PAGE_NBYTES) -> int:
    return -(-n // align) * align


@functools.lru_cache(maxsize=64)
def _probe_device(st_dev: int, directory: str) -> bool:
    del st_dev  # the cache key: one answer per filesystem
    if not O_DIRECT:
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=".thaw-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    try:
        fd = os.open(tmp, os.O_RDWR | O_DIRECT)
    except OSError:
        os.unlink(tmp)
        return False
    try:
        page = aligned_empty(PAGE_NBYTES).numpy()
        return os.pwrite(fd, memoryview(page), 0) == PAGE_NBYTES and os.preadv(fd, [page], 0) == PAGE_NBYTES
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(tmp)


def probe_o_direct(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` accept ``O_DIRECT`` reads and writes (cached per filesystem).

    Example:
        >>> import tempfile
        >>> probe_o_direct(tempfile.gettempdir()) in (True, False)   # tmpfs before Linux 6.6 refuses it
        True
    """
    directory = os.fspath(directory)
    return _probe_device(os.stat(directory).st_dev, directory)


class AtomicFile:
    """A file written under a temporary name and renamed into place by :meth:`commit`.

    Writes go through :meth:`pwrite`: ``O_DIRECT`` when the buffer address, length and offset
    are aligned and the filesystem allows it, buffered otherwise. The file is owner-only (0600).

    Args:
        path: the destination; its directory must exist.
        direct: use O_DIRECT; ``None`` probes the filesystem.
        fsync: flush data and the directory entry to stable storage (off for shared memory).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> with AtomicFile(os.path.join(d, "x.bin")) as f:
        ...     _ = f.pwrite(b"hello", 0)
        ...     f.commit()
        >>> open(os.path.join(d, "x.bin"), "rb").read()
        b'hello'
    """

    def __init__(
        self, path: str | os.PathLike[str], *, direct: bool | None = None, fsync: bool = True
    ) -> None:
        self.path = os.fspath(path)
        self.directory = os.path.dirname(os.path.abspath(self.path))
        self.fsync = fsync
        fd, self.tmp_path = tempfile.mkstemp(prefix=".thaw-", suffix=".partial", dir=self.directory)
        os.fchmod(fd, 0o600)
        self.fd = fd
        self.direct_fd = -1
        if direct is None:
            direct = probe_o_direct(self.directory)
        if direct and O_DIRECT:
            try:
                self.direct_fd = os.open(self.tmp_path, os.O_WRONLY | O_DIRECT)
            except OSError:
                self.direct_fd = -1
        self._done = False

    @property
    def direct(self) -> bool:
        return self.direct_fd >= 0

    def pwrite(self, data: Any, offset: int) -> int:
        """Write all of ``data`` at ``offset``; returns the byte count."""
        view = memoryview(data).cast("B")
        fd = self.fd
        if self.direct_fd >= 0 and _aligned(view, offset):
            fd = self.direct_fd
        done = 0
        while done < view.nbytes:
            try:
                n = os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                if fd == self.direct_fd and exc.errno == errno.EINVAL:
                    fd = self.fd  # the filesystem refused this O_DIRECT request after all
                    continue
                raise
            if n <= 0:
                raise OSError(errno.EIO, f"short write to {self.tmp_path}")
            done += n
        return done

    def truncate(self, nbytes: int) -> None:
        os.ftruncate(self.fd, nbytes)

    def reserve(self, nbytes: int) -> None:
        """Allocate the file's blocks up front (best effort: not every filesystem can)."""
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fallocate(self.fd, 0, nbytes)

    def commit(self) -> None:
        """Flush, rename into place and flush the directory."""
        if self.fsync:
            os.fsync(self.fd)
        self._close_fds()
        os.replace(self.tmp_path, self.path)
        self._done = True
        if self.fsync:
            with contextlib.suppress(OSError):
                dfd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def abort(self) -> None:
        """Remove the temporary file (the destination is left as it was)."""
        self._close_fds()
        if not self._done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)
            self._done = True

    def _close_fds(self) -> None:
        for name in ("direct_fd", "fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _aligned(view: memoryview, offset: int) -> bool:
    import ctypes

    if view.nbytes % PAGE_NBYTES or offset % PAGE_NBYTES:
        return False
    if view.readonly:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return address % PAGE_NBYTES == 0


def _flat_u8(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    if not tensor.is_contiguous():
        raise ValueError("segments must be contiguous tensors")
    return tensor.reshape(-1).view(torch.uint8) if tensor.numel() else tensor.new_empty(0, dtype=torch.uint8)


def _plan(sizes: Sequence[int], chunk_nbytes: int) -> list[list[tuple[int, int, int, int]]]:
    """Split the back-to-back concatenation of ``sizes`` into chunks of (seg, seg_off, n, chunk_off)."""
    chunks: list[list[tuple[int, int, int, int]]] = [[]]
    room = chunk_nbytes
    for seg, size in enumerate(sizes):
        off = 0
        while off < size:
            if room == 0:
                chunks.append([])
                room = chunk_nbytes
            n = min(size - off, room)
            chunks[-1].append((seg, off, n, chunk_nbytes - room))
            off += n
            room -= n
    return chunks if chunks[0] else []


def write_segments(
    file: AtomicFile,
    offset: int,
    segments: Sequence[torch.Tensor],
    *,
    hasher: Callable[[], Any] | None = None,
    chunk_nbytes: int | None = None,
    num_buffers: int | None = None,
    num_writers: int | None = None,
    preallocate: bool | None = None,
) -> list[str | None]:
    """Write ``segments`` back to back at ``offset`` of ``file``; return each one's hex digest.

    Tensors may live on the CPU or a GPU (copied device-to-host on a side stream into pinned
    slots). ``num_buffers`` slots of ``chunk_nbytes`` rotate: while one is being written and
    hashed, the next is being filled. The file ends exactly at the last segment's end.

    Example:
        >>> import tempfile, os, torch, blake3
        >>> d = tempfile.mkdtemp()
        >>> with AtomicFile(os.path.join(d, "w.bin")) as f:
        ...     digests = write_segments(f, 0, [torch.arange(10)], hasher=blake3.blake3)
        ...     f.commit()
        >>> os.path.getsize(os.path.join(d, "w.bin"))
        80
    """
    import torch

    chunk_nbytes = chunk_nbytes or WRITE_TUNING["chunk_nbytes"]
    num_buffers = num_buffers or WRITE_TUNING["num_buffers"]
    num_writers = num_writers or WRITE_TUNING["num_writers"]
    preallocate = WRITE_TUNING["preallocate"] if preallocate is None else preallocate
    flats = [_flat_u8(t) for t in segments]
    sizes = [t.numel() for t in flats]
    total = sum(sizes)
    on_gpu = any(t.is_cuda for t in flats)
    chunk_nbytes = _round_up(max(PAGE_NBYTES, min(chunk_nbytes, _round_up(total or 1))))
    slots = [aligned_empty(chunk_nbytes, pin_memory=on_gpu) for _ in range(max(2, num_buffers))]
    free: queue.Queue[int] = queue.Queue()
    for i in range(len(slots)):
        free.put(i)
    hashers = [hasher() if hasher else None for _ in flats]
    stream = torch.cuda.Stream(device=next(t.device for t in flats if t.is_cuda)) if on_gpu else None
    pending: list[Any] = [None] * len(slots)  # per slot: the CUDA event its fill recorded
    errors: list[BaseException] = []
    remaining = [0] * len(slots)
    lock = threading.Lock()

    def release(slot: int) -> None:
        with lock:
            remaining[slot] -= 1
            last = remaining[slot] == 0
        if last:
            free.put(slot)

    def write(slot: int, start: int, length: int) -> None:
        try:
            if pending[slot] is not None:
                pending[slot].synchronize()
            padded = _round_up(length) if file.direct else length
            if padded > length:
                slots[slot][length:padded].zero_()
            file.pwrite(slots[slot][:padded].numpy(), offset + start)
        except BaseException as exc:
            errors.append(exc)
        finally:
            release(slot)

    def digest(slot: int, pieces: list[tuple[int, int, int, int]]) -> None:
        try:
            if pending[slot] is not None:
                pending[slot].synchronize()
            view = slots[slot].numpy()
            for seg, _, n, at in pieces:
                hashers[seg].update(view[at : at + n])
        except BaseException as exc:
            errors.append(exc)
        finally:
            release(slot)

    if preallocate and total:
        # Writes inside the file's allocated size run in parallel; extending writes queue on
        # the inode lock (ext4, XFS) and allocate as they go.
        file.reserve(offset + _round_up(total))
    chunks = _plan(sizes, chunk_nbytes)
    with ThreadPoolExecutor(num_writers) as writers, ThreadPoolExecutor(1) as hashing:
        start = 0
        for pieces in chunks:
            if errors:
                break
            slot = free.get()
            if errors:
                break
            length = sum(p[2] for p in pieces)
            host = slots[slot]
            event = None
            for seg, seg_off, n, at in pieces:
                src = flats[seg][seg_off : seg_off + n]
                if src.is_cuda:
                    with torch.cuda.stream(stream):
                        host[at : at + n].copy_(src, non_blocking=True)
                else:
                    host[at : at + n].copy_(src)
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
            pending[slot] = event
            remaining[slot] = 2 if hasher else 1
            writers.submit(write, slot, start, length)
            if hasher:
                hashing.submit(digest, slot, pieces)
            start += length
    if errors:
        raise errors[0]
    if (file.direct or preallocate) and total % PAGE_NBYTES:
        file.truncate(offset + total)
    return [h.hexdigest() if h is not None else None for h in hashers]


def read_into(
    path: str | os.PathLike[str],
    offset: int,
    nbytes: int,
    dest: torch.Tensor,
    *,
    direct: bool | None = None,
    chunk_nbytes: int = CHUNK_NBYTES,
    num_readers: int = 4,
    on_chunk: Callable[[int, int], None] | None = None,
) -> None:
    """Read ``nbytes`` of ``path`` from ``offset`` into the uint8 host tensor ``dest``.

    ``num_readers`` chunk reads run at once, with ``O_DIRECT`` when ``direct`` (``None``:
    probe) and ``dest``/``offset`` are page-aligned; ``dest`` then needs room for ``nbytes``
    rounded up to 4096. ``on_chunk(start, end)`` is called from a reader thread as each chunk
    lands (in any order).

    Raises:
        EOFError: the file ended before ``offset + nbytes``.

    Example:
        >>> import tempfile, os, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "r.bin")
        >>> _ = open(path, "wb").write(bytes(range(100)))
        >>> out = torch.empty(90, dtype=torch.uint8)
        >>> read_into(path, 10, 90, out)
        >>> int(out[0])
        10
    """
    path = os.fspath(path)
    if direct is None:
        direct = probe_o_direct(os.path.dirname(os.path.abspath(path)))
    view = dest.numpy()
    aligned = direct and offset % PAGE_NBYTES == 0 and dest.data_ptr() % PAGE_NBYTES == 0
    if aligned and view.size < _round_up(nbytes):
        aligned = False
    fd = os.open(path, os.O_RDONLY)
    dfd = -1
    if aligned and O_DIRECT:
        try:
            dfd = os.open(path, os.O_RDONLY | O_DIRECT)
        except OSError:
            dfd = -1
    chunk_nbytes = _round_up(max(PAGE_NBYTES, chunk_nbytes))

    def read(start: int) -> None:
        want = min(chunk_nbytes, nbytes - start)
        got = 0
        use = dfd
        while got < want:
            if use >= 0:
                length = _round_up(want) - got
                try:
                    n = os.preadv(use, [view[start + got : start + got + length]], offset + start + got)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    use = -1
                    continue
                if n % PAGE_NBYTES and got + n < want:
                    use = -1  # a partial page: finish buffered
            else:
                n = os.preadv(fd, [view[start + got : start + want]], offset + start + got)
            if n <= 0:
                raise EOFError(f"{path}: file ends before byte {offset + start + want}")
            got += n
        if on_chunk is not None:
            on_chunk(start, start + want)

    try:
        with ThreadPoolExecutor(num_readers) as pool:
            for future in [pool.submit(read, s) for s in range(0, nbytes, chunk_nbytes)]:
                future.result()
    finally:
        os.close(fd)
        if dfd >= 0:
            os.close(dfd)
