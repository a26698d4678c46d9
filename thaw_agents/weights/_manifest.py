"""The header of a weights file: what it holds, its strict reader, and the match with a model.

A weights file is the snapshot container (``docs/snapshot-format.md``) with ``kind: "weights"``:
one region per tensor, in manifest order, each checksummed with BLAKE3. The ``weights`` object
records names, dtypes and shapes, the model's fingerprint and ``header_checksum``: BLAKE3 of
the whole header's canonical JSON without that field, so a header edited or corrupted after
the freeze (a dtype, a shape, the fingerprint) is refused rather than restored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3

from .._container import Container, Region, canonical_json, container_header
from .._container_reader import read_container
from .._errors import SnapshotFormatError, SnapshotMismatchError
from .._validate import describe, dtype_itemsize, want_fields, want_hex, want_list, want_shape, want_str

if TYPE_CHECKING:
    import torch

__all__ = [
    "KIND",
    "WEIGHT_DTYPES",
    "Pairs",
    "TensorEntry",
    "WeightsManifest",
    "WeightsStats",
    "check_targets",
    "dtype_name",
    "read_weights_manifest",
    "weights_header",
]

KIND = "weights"
# dtypes a weights file may hold (names as torch prints them, without "torch.").
WEIGHT_DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
)

_ZERO_CHECKSUM = "0" * 64


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorEntry:
    """One tensor of a weights file: its name, dtype name, shape and region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightsManifest:
    """A validated weights file header.

    Attributes:
        container: the container header (path, payload offset, regions).
        model_name: the model the weights came from, as given at freeze time.
        model_fingerprint: :func:`thaw_agents._kvspec.model_fingerprint` of that model.
        tensors: one entry per tensor, in payload order.
        created_by: ``thaw-agents <version>``.
    """

    container: Container
    model_name: str
    model_fingerprint: str
    tensors: tuple[TensorEntry, ...]
    created_by: str

    @property
    def path(self) -> str:
        return self.container.path

    @property
    def nbytes(self) -> int:
        return self.container.payload_nbytes

    def __repr__(self) -> str:
        return (
            f"WeightsManifest(path={self.path!r}, model={self.model_name!r}, "
            f"tensors={len(self.tensors)}, nbytes={self.nbytes:,})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WeightsStats:
    """What a freeze or restore moved and how fast.

    Attributes:
        nbytes: payload bytes.
        num_tensors: tensors written or restored.
        seconds: wall time of the whole call.
        route: how the bytes travelled (``o_direct``, ``buffered``, ``mmap``, ``mmap+registered``,
            ``host``), and whether a device landing buffer was used.
    """

    nbytes: int
    num_tensors: int
    seconds: float
    route: str

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes per second)."""
        return self.nbytes / self.seconds / 1e9 if self.seconds else 0.0


Pairs = Sequence[tuple[TensorEntry, "torch.Tensor"]]


def dtype_name(tensor: torch.Tensor) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: how a weights file names a dtype."""
    return str(tensor.dtype).removeprefix("torch.")


def weights_header(
    tensors: Sequence[tuple[str, torch.Tensor]], digests: Sequence[str], meta: dict[str, Any]
) -> dict[str, Any]:
    """The header of a weights file of ``tensors`` with these region checksums and ``meta``
    (the ``weights`` object without its checksum), ``header_checksum`` included.

    Checksums are fixed-width hex: the header's length does not depend on them, so a writer
    can size it before the payload is hashed (pass ``"0" * 64`` each).
    """
    regions = []
    offset = 0
    for (name, t), digest in zip(tensors, digests, strict=True):
        nbytes = t.numel() * t.element_size()
        regions.append(Region(name=name, offset=offset, nbytes=nbytes, checksum=digest))
        offset += nbytes
    header = container_header(KIND, {**meta, "header_checksum": _ZERO_CHECKSUM}, regions)
    header[KIND]["header_checksum"] = _header_checksum(header)
    return header


def _header_checksum(header: dict[str, Any]) -> str:
    body = {**header, KIND: {k: v for k, v in header[KIND].items() if k != "header_checksum"}}
    return blake3.blake3(canonical_json(body)).hexdigest()


def read_weights_manifest(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> WeightsManifest:
    """Read and validate a weights file's header (no payload byte is read).

    Strict like the KV reader: names are strings, one tensor per region with the region's
    name, unique names, a dtype from a closed set, a shape of ints >= 0 whose exact product
    times the dtype's size is the region's size; then ``header_checksum`` recomputed over
    the whole header (a header edited after the freeze is refused).

    Args:
        follow_symlinks: False refuses a symbolic link.

    Raises:
        SnapshotNotFoundError, SnapshotFormatError, SnapshotVersionError, SnapshotTruncatedError,
        SnapshotReadError
    """
    container = read_container(path, expect_kind=KIND, follow_symlinks=follow_symlinks)
    where = container.path
    fields = ("model_name", "model_fingerprint", "tensors", "header_checksum")
    meta = want_fields(container.meta, "weights manifest", where, fields)
    for key in ("model_name", "model_fingerprint"):
        want_str(meta[key], f"weights manifest field {key!r}", where)
    listed = want_list(meta["tensors"], "weights manifest field 'tensors'", where)
    if len(listed) != len(container.regions):
        raise SnapshotFormatError(
            f"weights manifest lists {len(listed)} tensors for {len(container.regions)} regions: "
            "it must list one tensor per region",
            path=where,
        )
    entries = []
    seen: set[str] = set()
    for index, (item, region) in enumerate(zip(listed, container.regions, strict=True)):
        what = f"tensor {index}"
        item = want_fields(item, what, where, ("name", "dtype", "shape"))
        if item["name"] != region.name:
            raise SnapshotFormatError(
                f"{what} is named {describe(item['name'])}, its region {describe(region.name)}",
                path=where,
            )
        if region.name in seen:
            raise SnapshotFormatError(f"{what} repeats the name {describe(region.name)}", path=where)
        seen.add(region.name)
        dtype = item["dtype"]
        if dtype not in WEIGHT_DTYPES:  # the writer's closed set (not every name torch has)
            raise SnapshotFormatError(f"{what} has unsupported dtype {describe(dtype)}", path=where)
        itemsize = dtype_itemsize(dtype, f"{what} dtype", where)
        shape = want_shape(item["shape"], f"{what} shape", where)
        expected = math.prod(shape) * itemsize
        if expected != region.nbytes:
            raise SnapshotFormatError(
                f"tensor {describe(region.name)} is {dtype}{list(shape)} = {expected} bytes "
                f"but its region has {region.nbytes}",
                path=where,
            )
        entries.append(
            TensorEntry(
                name=region.name,
                dtype=dtype,
                shape=shape,
                offset=region.offset,
                nbytes=region.nbytes,
                checksum=region.checksum,
            )
        )
    stored = want_hex(meta["header_checksum"], "weights manifest field 'header_checksum'", where)
    if stored != _header_checksum(container.header):
        raise SnapshotFormatError(
            "the header does not match its header_checksum: it was edited or corrupted after the "
            "freeze; freeze the model again",
            path=where,
        )
    return WeightsManifest(
        container=container,
        model_name=meta["model_name"],
        model_fingerprint=meta["model_fingerprint"],
        tensors=tuple(entries),
        created_by=container.created_by,
    )


def check_targets(
    manifest: WeightsManifest,
    targets: Iterable[tuple[str, torch.Tensor]],
    *,
    expect_fingerprint: str | None = None,
) -> list[tuple[TensorEntry, torch.Tensor]]:
    """Pair each file tensor with its target; refuse any difference before a byte moves.

    Raises:
        SnapshotMismatchError: naming the field (``model_fingerprint``, ``tensors``,
            ``<name>.dtype``, ``<name>.shape``) that differs.
    """
    path = manifest.path
    if expect_fingerprint is not None and expect_fingerprint != manifest.model_fingerprint:
        raise SnapshotMismatchError(
            "model_fingerprint",
            expect_fingerprint,
            manifest.model_fingerprint,
            path=path,
            hint="these weights were frozen from another model; freeze this model again",
        )
    by_name = dict(targets)
    names = [e.name for e in manifest.tensors]
    missing = sorted(set(by_name) - set(names))
    extra = sorted(set(names) - set(by_name))
    if missing or extra:
        raise SnapshotMismatchError(
            "tensors",
            f"{len(by_name)} tensors" + (f", not in the file: {missing[:5]}" if missing else ""),
            f"{len(names)} tensors" + (f", not in the model: {extra[:5]}" if extra else ""),
            path=path,
            hint="the file was frozen from a model with other parameters",
        )
    pairs = []
    for entry in manifest.tensors:
        target = by_name[entry.name]
        if dtype_name(target) != entry.dtype:
            raise SnapshotMismatchError(f"{entry.name}.dtype", dtype_name(target), entry.dtype, path=path)
        if tuple(target.shape) != entry.shape:
            raise SnapshotMismatchError(f"{entry.name}.shape", tuple(target.shape), entry.shape, path=path)
        if not target.is_contiguous():
            raise SnapshotMismatchError(f"{entry.name}.contiguous", True, False, path=path)
        pairs.append((entry, target))
    return pairs
