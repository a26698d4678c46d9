"""Reading a ``.thaw`` container (layout in :mod:`thaw_agents._container`): the header,
validated in a fixed order before any payload byte is trusted, and the payload's checksums
on demand.

Example:
    >>> import tempfile
    >>> from thaw_agents._container_writer import write_container
    >>> path = write_container(f"{tempfile.mkdtemp()}/x.thaw", "test", {}, [("a", b"abcd")]).path
    >>> container = read_container(path, expect_kind="test")
    >>> verify_regions(container)  # raises SnapshotChecksumError on a corrupt region
    >>> container.regions[0].nbytes
    4
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ._container import (
    CHECKSUM_ALGORITHM,
    CONTAINER_FIELDS,
    FORMAT_VERSION,
    KIND_RE,
    MAGIC,
    MAX_HEADER_NBYTES,
    PAYLOAD_ALIGN,
    PREFIX,
    Container,
    Region,
)
from ._errors import (
    SnapshotChecksumError,
    SnapshotFormatError,
    SnapshotTruncatedError,
    SnapshotVersionError,
)
from ._threads import in_parts
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

__all__ = ["read_container", "verify_regions"]

# What to do with a file of an older format version, by kind.
_REMEDY = {
    "kv": "KV snapshots are caches: fork the prefix again with this thaw-agents",
    "weights": "freeze the model again with this thaw-agents (thaw-agents freeze MODEL -o FILE)",
}
# Regions are hashed through a buffer of this size: memory does not follow a declared size.
_VERIFY_CHUNK_NBYTES = CHUNK_NBYTES


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
        prefix = pread_all(fd, PREFIX.size, 0, path)
        if len(prefix) < PREFIX.size:
            raise SnapshotTruncatedError(
                f"file is {file_nbytes} bytes, shorter than the 16-byte prefix", path=path
            )
        magic, header_nbytes = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise SnapshotFormatError(f"not a thaw snapshot (magic {magic!r}, expected {MAGIC!r})", path=path)
        if header_nbytes > MAX_HEADER_NBYTES or header_nbytes == 0:
            raise SnapshotFormatError(
                f"header size {header_nbytes} is outside 1..{MAX_HEADER_NBYTES} bytes", path=path
            )
        if PREFIX.size + header_nbytes > file_nbytes:
            raise SnapshotTruncatedError(
                f"header claims {header_nbytes} bytes but the file has {file_nbytes}", path=path
            )
        if (PREFIX.size + header_nbytes) % PAYLOAD_ALIGN:
            # The payload is mapped and read with O_DIRECT: both need page-aligned offsets.
            raise SnapshotFormatError(
                f"the payload starts at byte {PREFIX.size + header_nbytes}, not "
                f"{PAYLOAD_ALIGN}-aligned: not written by thaw-agents; re-create the file",
                path=path,
            )
        blob = pread_all(fd, header_nbytes, PREFIX.size, path)
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
    payload_offset = PREFIX.size + header_nbytes
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
    if not KIND_RE.fullmatch(kind) or kind in CONTAINER_FIELDS:
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

    Reads in chunks of at most 8 MiB into one buffer per thread, so memory does not grow with
    a region's declared size; the file is reopened as a regular file like the header was.
    Contiguous runs of regions are checked in parallel (:func:`~thaw_agents._threads.in_parts`).

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

        def first_bad(part: list[int]) -> int | None:
            buffer = bytearray(min(_VERIFY_CHUNK_NBYTES, max(1, container.payload_nbytes)))
            view = memoryview(buffer)
            for index in part:
                region = container.regions[index]
                digest = region_digest(
                    fd, container.payload_offset + region.offset, region.nbytes, view, path
                )
                if digest != region.checksum:
                    return index
            return None

        # Parts in parallel (reads and hashing release the GIL); the first bad region is named.
        bad = [index for index in in_parts(first_bad, wanted) if index is not None]
        if bad:
            index = bad[0]
            raise SnapshotChecksumError(
                f"region {index} ({describe(container.regions[index].name)}) does not match its "
                "checksum: the file is corrupt. Re-create the snapshot or fetch it again.",
                path=path,
                region=index,
            )
    finally:
        os.close(fd)
