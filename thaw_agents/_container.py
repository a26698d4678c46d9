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

Three modules:

* this one, the layout: the format's constants, :class:`Region` and :class:`Container`, a
  region's checksum, a header as written (:func:`container_header`, :func:`encode_header`);
* :mod:`thaw_agents._container_reader`: :func:`read_container` (the header, validated) and
  :func:`verify_regions` (the payload's checksums);
* :mod:`thaw_agents._container_writer`: :func:`write_container` and the write helpers the
  tensor-parallel writer shares (:func:`write_parts`, :func:`fsync_dir`).

Example:
    >>> header = container_header("test", {"note": "hi"}, [Region(name="a", offset=0, nbytes=4,
    ...                           checksum=checksum(b"abcd"))])
    >>> len(encode_header(header)) % PAYLOAD_ALIGN
    0
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3

__all__ = [
    "CHECKSUM_ALGORITHM",
    "CONTAINER_FIELDS",
    "FORMAT_VERSION",
    "KIND_RE",
    "MAGIC",
    "MAX_HEADER_NBYTES",
    "PAYLOAD_ALIGN",
    "PREFIX",
    "Container",
    "Region",
    "RegionData",
    "canonical_json",
    "checksum",
    "container_header",
    "encode_header",
    "region_parts",
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
# A kind's name, which is also its key in the header.
KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
PAYLOAD_ALIGN = 4096
# A header is a manifest, not data. A KV header costs ~20 bytes per token at block size 16
# (the token id, and per block a chain key and a region entry), so 16 MiB fits ~800k tokens;
# a weights header ~200 bytes per tensor. Together with the structure bounds of
# _validate.loads_bounded it keeps a hostile header to a fraction of a second and ~100 MB.
MAX_HEADER_NBYTES = 16 << 20
# Magic and header length, before the JSON header.
PREFIX = struct.Struct("<8sQ")
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
    if not KIND_RE.fullmatch(kind) or kind in CONTAINER_FIELDS:
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
    total = PREFIX.size + len(raw)
    padded = -(-total // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
    return PREFIX.pack(MAGIC, padded - PREFIX.size) + raw + b" " * (padded - total)
