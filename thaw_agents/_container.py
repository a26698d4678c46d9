"""The ``.thaw`` container: an 8-byte magic, a little-endian header length, a JSON header, raw bytes.

One format for KV snapshots and frozen weights (see ``docs/snapshot-format.md``)::

    offset 0    b"THAWSNAP"                      magic, 8 bytes
    offset 8    u64 little-endian                header_nbytes
    offset 16   JSON header, UTF-8, space padded  so the payload starts 4096-aligned
    offset P    payload                          regions listed in the header

The header holds the container's own fields and, under a key named after the kind, the
kind's fields (``{"format": "thaw", ..., "kind": "kv", "kv": {...}}``): a kind's fields can
never stand in for a container field. Nothing in a container is executable: the header is
JSON, the payload raw tensor bytes. The reader validates in a fixed order (magic, header
size, UTF-8 + JSON, version, schema, offsets, then checksums on demand), each step with its
own error class, before any payload byte is trusted. The writer is deterministic, atomic
(temporary name, fsync, rename) and leaves files readable by their owner only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import blake3

from ._errors import (
    SnapshotChecksumError,
    SnapshotFormatError,
    SnapshotTruncatedError,
    SnapshotVersionError,
    write_failed,
)
from ._validate import (
    CHUNK_NBYTES,
    describe,
    loads_bounded,
    open_regular,
    pread_all,
    region_digest,
    want_dict,
    want_fields,
    want_hex,
    want_int,
    want_list,
    want_str,
)

__all__ = [
    "CONTAINER_FIELDS",
    "FORMAT_VERSION",
    "MAGIC",
    "PAYLOAD_ALIGN",
    "Container",
    "Region",
    "canonical_json",
    "checksum",
    "container_header",
    "encode_header",
    "fsync_dir",
    "read_container",
    "region_parts",
    "verify_regions",
    "write_container",
    "write_parts",
]

MAGIC = b"THAWSNAP"
# 2: the kind's fields moved under their own key (1 had them beside the container's, where
# a kind field named like a container field won). Files of 1 are refused, not converted:
# they are caches (fork again) or frozen weights (freeze again).
FORMAT_VERSION = 2
# The container's own header fields; the only other key is the kind's.
CONTAINER_FIELDS = (
    "format",
    "format_version",
    "kind",
    "checksum_algorithm",
    "created_by",
    "payload_nbytes",
    "regions",
)
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_REMEDY = {
    "kv": "KV snapshots are caches: fork the prefix again with this thaw-agents",
    "weights": "freeze the model again with this thaw-agents (thaw-agents freeze MODEL -o FILE)",
}
PAYLOAD_ALIGN = 4096
# A header is a manifest, not data. A KV header costs ~20 bytes per token at block size 16
# (the token id, and per block a chain key and a region entry), so 16 MiB fits ~800k tokens;
# a weights header ~200 bytes per tensor. Together with the structure bounds of
# _validate.loads_bounded it keeps a hostile header to a fraction of a second and ~100 MB.
MAX_HEADER_NBYTES = 16 << 20
# Regions are hashed through a buffer of this size: memory does not follow a declared size.
_VERIFY_CHUNK_NBYTES = CHUNK_NBYTES
_PREFIX = struct.Struct("<8sQ")
CHECKSUM_ALGORITHM = "blake3"


Buffer = bytes | bytearray | memoryview
# A region's bytes: one buffer, or several written back to back (scatter-gather, e.g. one
# row per layer of a KV block, straight from the cache).
RegionData = Buffer | Sequence[Buffer]


def region_parts(data: RegionData) -> list[memoryview]:
    """A region's bytes as flat byte views, one per buffer."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return [memoryview(data).cast("B")]
    return [memoryview(part).cast("B") for part in data]


def checksum(data: RegionData) -> str:
    """The hex checksum of a region's bytes (BLAKE3, several GB/s; multi-threaded for big buffers)."""
    parts = region_parts(data)
    big = sum(p.nbytes for p in parts) >= (8 << 20)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if big else blake3.blake3()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    """A named byte range of the payload with its checksum."""

    name: str
    offset: int
    nbytes: int
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "checksum": self.checksum,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Container:
    """A validated container header: where the payload starts and what it holds."""

    path: str
    header: dict[str, Any]
    regions: tuple[Region, ...]
    payload_offset: int
    payload_nbytes: int

    @property
    def kind(self) -> str:
        return str(self.header["kind"])

    @property
    def meta(self) -> dict[str, Any]:
        """The kind's own fields (``header[kind]``), as the kind's reader validates them."""
        return self.header[self.kind]  # type: ignore[no-any-return]

    @property
    def created_by(self) -> str:
        return str(self.header["created_by"])


def canonical_json(header: dict[str, Any]) -> bytes:
    """The one serialisation of a header: sorted keys, no spaces, UTF-8 (deterministic files,
    and a stable input for a header checksum)."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def container_header(kind: str, meta: dict[str, Any], regions: Sequence[Region]) -> dict[str, Any]:
    """The header of a container of ``kind``: the container's fields and ``{kind: meta}``.

    Raises:
        ValueError: ``kind`` is not a short lowercase name, or is a container field's name.
    """
    if not _KIND_RE.fullmatch(kind) or kind in CONTAINER_FIELDS:
        raise ValueError(f"kind {kind!r} must be a short lowercase name other than {CONTAINER_FIELDS}")
    from . import __version__

    return {
        "format": "thaw",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "created_by": f"thaw-agents {__version__}",
        "payload_nbytes": sum(r.nbytes for r in regions),
        "regions": [r.to_json() for r in regions],
        kind: meta,
    }


def encode_header(header: dict[str, Any]) -> bytes:
    """What precedes the payload: magic, length, the JSON header space-padded so the payload
    starts ``PAYLOAD_ALIGN``-aligned."""
    raw = canonical_json(header)
    total = _PREFIX.size + len(raw)
    padded = -(-total // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
    return _PREFIX.pack(MAGIC, padded - _PREFIX.size) + raw + b" " * (padded - total)


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
            _write_all(handle, blob)
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


def _write_all(handle: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = handle.write(view)
        if not written:
            raise OSError("short write")
        view = view[written:]


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


def read_container(
    path: str | os.PathLike[str], *, expect_kind: str | None = None, follow_symlinks: bool = True
) -> Container:
    """Read and validate a container's header; the payload is checked for size, not content.

    Validation order: a regular file (never a FIFO, device, socket or directory; no symlink
    when ``follow_symlinks`` is False), magic, header size, alignment, bounded UTF-8 JSON,
    format version, schema with strict types (the container's fields and one object under
    the kind's name, nothing else), kind, region offsets (contiguous, covering the payload
    exactly), file size. Use :func:`verify_regions` to check the checksums.

    Raises:
        SnapshotNotFoundError, SnapshotFormatError, SnapshotVersionError,
        SnapshotTruncatedError, SnapshotReadError
    """
    path = os.fsdecode(path)
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        file_nbytes = os.fstat(fd).st_size
        prefix = pread_all(fd, _PREFIX.size, 0, path)
        if len(prefix) < _PREFIX.size:
            raise SnapshotTruncatedError(
                f"file is {file_nbytes} bytes, shorter than the 16-byte prefix", path=path
            )
        magic, header_nbytes = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise SnapshotFormatError(f"not a thaw snapshot (magic {magic!r}, expected {MAGIC!r})", path=path)
        if header_nbytes > MAX_HEADER_NBYTES or header_nbytes == 0:
            raise SnapshotFormatError(
                f"header size {header_nbytes} is outside 1..{MAX_HEADER_NBYTES} bytes", path=path
            )
        if _PREFIX.size + header_nbytes > file_nbytes:
            raise SnapshotTruncatedError(
                f"header claims {header_nbytes} bytes but the file has {file_nbytes}", path=path
            )
        if (_PREFIX.size + header_nbytes) % PAYLOAD_ALIGN:
            # The payload is mapped and read with O_DIRECT: both need page-aligned offsets.
            raise SnapshotFormatError(
                f"the payload starts at byte {_PREFIX.size + header_nbytes}, not "
                f"{PAYLOAD_ALIGN}-aligned: not written by thaw-agents; re-create the file",
                path=path,
            )
        blob = pread_all(fd, header_nbytes, _PREFIX.size, path)
        if len(blob) < header_nbytes:
            raise SnapshotTruncatedError("the file shrank while its header was read", path=path)
    finally:
        os.close(fd)
    header = loads_bounded(blob, path)
    del blob
    _check_version(header, path)
    _check_schema(header, path)
    if expect_kind is not None and header["kind"] != expect_kind:
        raise SnapshotFormatError(f"this is a {header['kind']!r} file, expected {expect_kind!r}", path=path)
    regions = tuple(_parse_regions(header, path))
    payload_offset = _PREFIX.size + header_nbytes
    payload_nbytes = header["payload_nbytes"]
    actual = file_nbytes - payload_offset
    if actual < payload_nbytes:
        raise SnapshotTruncatedError(
            f"payload is {actual} bytes, the header says {payload_nbytes}: the file was cut short",
            path=path,
        )
    if actual > payload_nbytes:
        raise SnapshotFormatError(f"{actual - payload_nbytes} unexpected bytes after the payload", path=path)
    return Container(
        path=path,
        header=header,
        regions=regions,
        payload_offset=payload_offset,
        payload_nbytes=payload_nbytes,
    )


def _check_version(header: Any, path: str) -> None:
    """The version first: a file of another version is named as such, whatever else changed."""
    if type(header) is not dict:
        raise SnapshotFormatError("header is not a JSON object", path=path)
    want_fields(header, "header", path, ("format", "format_version"))
    if header["format"] != "thaw":
        raise SnapshotFormatError(f"format is {describe(header['format'])}, expected 'thaw'", path=path)
    version = want_int(header["format_version"], "header field 'format_version'", path)
    if version == FORMAT_VERSION:
        return
    kind = header.get("kind")
    if version > FORMAT_VERSION:
        remedy = "upgrade thaw-agents to read it"
    elif isinstance(kind, str) and kind in _REMEDY:
        remedy = _REMEDY[kind]
    else:
        remedy = "re-create it with this thaw-agents"
    raise SnapshotVersionError(
        f"format version {version}; this thaw-agents reads version {FORMAT_VERSION} only: {remedy}",
        path=path,
    )


def _check_schema(header: dict[str, Any], path: str) -> None:
    want_fields(header, "header", path, CONTAINER_FIELDS)
    kind = want_str(header["kind"], "header field 'kind'", path, max_len=64)
    if not _KIND_RE.fullmatch(kind) or kind in CONTAINER_FIELDS:
        raise SnapshotFormatError(f"kind {describe(kind)} is not a kind name", path=path)
    extra = sorted(set(header) - {*CONTAINER_FIELDS, kind})
    if extra:
        raise SnapshotFormatError(
            f"header holds fields outside the container and its {kind!r} object: {describe(extra)}",
            path=path,
        )
    if kind not in header:
        raise SnapshotFormatError(f"header lacks the {kind!r} object of its kind", path=path)
    want_dict(header[kind], f"header field {kind!r}", path)
    want_str(header["checksum_algorithm"], "header field 'checksum_algorithm'", path)
    want_str(header["created_by"], "header field 'created_by'", path)
    want_int(header["payload_nbytes"], "header field 'payload_nbytes'", path)
    want_list(header["regions"], "header field 'regions'", path)
    if header["checksum_algorithm"] != CHECKSUM_ALGORITHM:
        raise SnapshotFormatError(
            f"unknown checksum algorithm {describe(header['checksum_algorithm'])}", path=path
        )


def _parse_regions(header: dict[str, Any], path: str) -> Iterable[Region]:
    expected_offset = 0
    for index, entry in enumerate(header["regions"]):
        what = f"region {index}"
        want_fields(entry, what, path, ("name", "offset", "nbytes", "checksum"))
        region = Region(
            name=want_str(entry["name"], f"{what} name", path),
            offset=want_int(entry["offset"], f"{what} offset", path),
            nbytes=want_int(entry["nbytes"], f"{what} nbytes", path),
            checksum=want_hex(entry["checksum"], f"{what} checksum", path),
        )
        if region.offset != expected_offset:
            raise SnapshotFormatError(
                f"region {index} ({describe(region.name)}) starts at {region.offset}, expected "
                f"{expected_offset}: regions must be contiguous",
                path=path,
            )
        expected_offset += region.nbytes
        yield region
    if expected_offset != header["payload_nbytes"]:
        raise SnapshotFormatError(
            f"regions cover {expected_offset} bytes but payload_nbytes is {header['payload_nbytes']}",
            path=path,
        )


def verify_regions(
    container: Container, indices: Iterable[int] | None = None, *, follow_symlinks: bool = True
) -> None:
    """Check the checksums of the given regions (default: all).

    Reads in chunks of at most 8 MiB into one reused buffer, so memory does not grow with
    a region's declared size; the file is reopened as a regular file like the header was.

    Raises:
        SnapshotChecksumError: naming the first region whose bytes differ.
        SnapshotTruncatedError: the file shrank since its header was read.
    """
    wanted = range(len(container.regions)) if indices is None else indices
    path = container.path
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        end = container.payload_offset + container.payload_nbytes
        if os.fstat(fd).st_size < end:
            raise SnapshotTruncatedError(
                "the file shrank since its header was read; fetch or re-create it", path=path
            )
        buffer = bytearray(min(_VERIFY_CHUNK_NBYTES, max(1, container.payload_nbytes)))
        view = memoryview(buffer)
        for index in wanted:
            region = container.regions[index]
            if region_digest(fd, container.payload_offset + region.offset, region.nbytes, view, path) != (
                region.checksum
            ):
                raise SnapshotChecksumError(
                    f"region {index} ({describe(region.name)}) does not match its checksum: the "
                    "file is corrupt. Re-create the snapshot or fetch it again.",
                    path=path,
                    region=index,
                )
    finally:
        os.close(fd)
