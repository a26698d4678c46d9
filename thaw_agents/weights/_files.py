"""File access of the restore paths: mapping a payload, telling tmpfs apart, checked reads.

Every open here is non-blocking and re-checked as a regular file (a FIFO swapped in since
the header was read must not hang a restore); sizes are re-checked against the header.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from typing import TYPE_CHECKING, Any

from .._errors import SnapshotChangedError, SnapshotTruncatedError
from .._validate import read_failed

if TYPE_CHECKING:
    import torch

__all__ = ["check_size", "close_mapping", "map_payload", "on_tmpfs", "pread_into", "round_up_page"]

# Reads go through requests of at most this size.
_READ_NBYTES = 32 << 20


def round_up_page(n: int) -> int:
    return -(-n // 4096) * 4096


def map_payload(
    path: str, offset: int, nbytes: int, *, shared: bool, keep_fd: bool = False
) -> tuple[torch.Tensor, mmap.mmap, int | None]:
    """Map the payload. ``shared``: the file's own pages (what cudaHostRegister must lock for a
    zero-copy /dev/shm hand-off); otherwise a private, never-written mapping of a read-only fd.
    ``keep_fd``: return the open fd (its owner closes it), else None."""
    import torch

    nonblock = os.O_NONBLOCK | os.O_CLOEXEC  # never wait on a FIFO swapped in since the header
    try:
        fd = os.open(path, (os.O_RDWR if shared else os.O_RDONLY) | nonblock)
    except PermissionError:
        fd, shared = os.open(path, os.O_RDONLY | nonblock), False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotChangedError("is no longer a regular file; read it again", path=path)
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        region = mmap.mmap(fd, nbytes, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except BaseException:
        os.close(fd)
        raise
    if not keep_fd:
        os.close(fd)
    return torch.frombuffer(region, dtype=torch.uint8), region, fd if keep_fd else None


def on_tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            best, fstype = "", ""
            real = os.path.realpath(path)
            for line in mounts:
                parts = line.split()
                if (
                    len(parts) > 2
                    and real.startswith(parts[1].rstrip("/") + "/")
                    and len(parts[1]) > len(best)
                ):
                    best, fstype = parts[1], parts[2]
            return fstype == "tmpfs"
    except OSError:
        return False


def close_mapping(region: mmap.mmap) -> None:
    # BufferError: a view is still alive somewhere; the mapping goes away with it.
    with contextlib.suppress(BufferError):
        region.close()


def check_size(fd: int, end: int, path: str) -> None:
    size = os.fstat(fd).st_size
    if size < end:
        raise SnapshotTruncatedError(f"the file is {size} bytes, its header says {end}", path=path)
    if size > end:
        raise SnapshotChangedError("the file grew since its header was read; map it again", path=path)


def pread_into(fd: int, offset: int, nbytes: int, out: Any, path: str) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < nbytes:
        want = min(nbytes - done, _READ_NBYTES)
        try:
            got = os.preadv(fd, [view[done : done + want]], offset + done)
        except OSError as exc:
            raise read_failed(path, exc) from exc
        if got <= 0:
            raise SnapshotTruncatedError("the file shrank while it was read; map it again", path=path)
        done += got
