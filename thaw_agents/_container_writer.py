"""Writing a ``.thaw`` container (layout in :mod:`thaw_agents._container`): deterministic,
atomic (temporary name, fsync, rename), readable by its owner only.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> written = write_container(f"{folder}/x.thaw", "test", {"note": "hi"}, [("a", b"abcd")])
    >>> written.payload_nbytes, [r.name for r in written.regions]
    (4, ['a'])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from ._container import Container, Region, RegionData, checksum, container_header, encode_header, region_parts
from ._errors import write_failed

__all__ = ["fsync_dir", "write_container", "write_parts"]


def write_container(
    path: str | os.PathLike[str],
    kind: str,
    meta: dict[str, Any],
    regions: Sequence[tuple[str, RegionData]],
    *,
    fsync: bool = True,
) -> Container:
    """Write a container atomically: ``path`` either appears complete or not at all.

    Args:
        path: destination file; its directory must exist.
        kind: what the payload is (``"kv"``, ``"weights"``).
        meta: the kind's own fields (JSON-serialisable), stored under ``header[kind]``.
        regions: (name, bytes or a sequence of buffers written back to back) in payload
            order; checksummed here.
        fsync: flush to stable storage before the rename (off for shared memory).
    """
    path = os.fspath(path)
    entries: list[Region] = []
    offset = 0
    parted = [(name, region_parts(data)) for name, data in regions]
    for name, parts in parted:
        nbytes = sum(p.nbytes for p in parts)
        entries.append(Region(name=name, offset=offset, nbytes=nbytes, checksum=checksum(parts)))
        offset += nbytes
    header = container_header(kind, meta, entries)
    blob = encode_header(header)
    directory = os.path.dirname(path) or "."
    try:
        # The pid in the name lets a store tell a dead writer's leftovers from a live one's.
        fd, tmp = tempfile.mkstemp(prefix=f".thaw-{os.getpid()}-", suffix=".partial", dir=directory)
    except OSError as exc:
        raise write_failed(path, exc) from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", buffering=0) as handle:
            write_parts(handle.fileno(), [memoryview(blob)])
            for _, parts in parted:
                write_parts(handle.fileno(), parts)
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(directory)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_failed(path, exc, len(blob) + offset) from exc
        raise
    return Container(
        path=path,
        header=header,
        regions=tuple(entries),
        payload_offset=len(blob),
        payload_nbytes=offset,
    )


def write_parts(fd: int, parts: list[memoryview], offset: int | None = None) -> None:
    """Write every byte of ``parts`` back to back: at the file position, or at ``offset``
    (``pwritev``, the position untouched); short writes are resumed."""
    pending = [p for p in parts if p.nbytes]
    while pending:
        if offset is None:
            written = os.writev(fd, pending[:512])
        else:
            written = os.pwritev(fd, pending[:512], offset)
            offset += max(written, 0)
        if written <= 0:
            raise OSError("short write")
        while pending and written >= pending[0].nbytes:
            written -= pending[0].nbytes
            pending.pop(0)
        if written:
            pending[0] = pending[0][written:]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it); quietly skipped where a file system refuses."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (tmpfs, network) refuse fsync on directories
    finally:
        os.close(fd)
