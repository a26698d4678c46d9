"""Frozen weights: every tensor of a model in one ``.thaw`` file, restored into an initialised model.

The file is the snapshot container (``docs/snapshot-format.md``) with ``kind: "weights"``:
one region per tensor, in manifest order, each checksummed with BLAKE3. The manifest records
names, dtypes and shapes and the model's fingerprint; nothing in the file is executable.

Freezing streams the tensors (CPU or GPU) through pinned, page-aligned slots into an
O_DIRECT file, hashing as it goes; the header, whose length does not depend on the checksums,
is written last and the file renamed into place. Restoring validates the header, the
manifest and the match against the target tensors, then reads and verifies every byte
*before* the first parameter is written (see :mod:`thaw_agents.weights_restore`): a
truncated or corrupt file raises a typed error and leaves the model as it was.

Example:
    >>> import torch
    >>> from thaw_agents.weights import freeze_module, restore_module
    >>> model = torch.nn.Linear(4, 2)
    >>> _ = freeze_module(model, "/tmp/lin.thaw", model_name="demo", model_fingerprint="sha256:0")
    >>> fresh = torch.nn.Linear(4, 2)
    >>> _ = restore_module(fresh, "/tmp/lin.thaw")
    >>> bool(torch.equal(fresh.weight, model.weight))
    True
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3

from . import __version__
from ._container import _PREFIX, CHECKSUM_ALGORITHM, FORMAT_VERSION, MAGIC, Container, _padded_header
from ._container import read_container as _read_container
from ._errors import SnapshotFormatError, SnapshotMismatchError, write_failed
from ._validate import describe, dtype_itemsize, want_dict, want_list, want_shape, want_str

if TYPE_CHECKING:
    import torch

__all__ = [
    "WeightsManifest",
    "WeightsStats",
    "check_targets",
    "freeze_module",
    "freeze_tensors",
    "module_tensors",
    "read_weights_manifest",
    "restore_module",
    "restore_tensors",
]

logger = logging.getLogger(__name__)

KIND = "weights"
# dtypes a weights file may hold (names as torch prints them, without "torch.").
_DTYPES = (
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


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a weights file holds for ``module``: parameters and persistent buffers.

    Tensors that share memory with an earlier one (tied embeddings) are listed once, under
    the first name, so freeze and restore agree on the list.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: list[tuple[str, torch.Tensor]] = []
    named: list[tuple[str, Any]] = list(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf_name not in mod._non_persistent_buffers_set:
                named.append((f"{mod_name}.{buf_name}" if mod_name else buf_name, buf))
    for name, tensor in named:
        data = tensor.data if hasattr(tensor, "data") else tensor
        if data.device.type == "meta":
            raise SnapshotFormatError(f"tensor {name} is on the meta device: load the model's weights first")
        key = (data.data_ptr(), data.numel() * data.element_size(), tuple(data.shape))
        if data.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, data))
    return out


def _header(
    tensors: Sequence[tuple[str, torch.Tensor]], digests: Sequence[str], meta: dict[str, Any]
) -> tuple[dict[str, Any], bytes]:
    regions = []
    offset = 0
    for (name, t), digest in zip(tensors, digests, strict=True):
        nbytes = t.numel() * t.element_size()
        regions.append({"name": name, "offset": offset, "nbytes": nbytes, "checksum": digest})
        offset += nbytes
    header = {
        "format": "thaw",
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "payload_nbytes": offset,
        "regions": regions,
        **meta,
    }
    blob = _padded_header(header)
    return header, _PREFIX.pack(MAGIC, len(blob)) + blob


def _hasher() -> Any:
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


def freeze_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    *,
    model_name: str,
    model_fingerprint: str,
    fsync: bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> WeightsStats:
    """Write ``tensors`` (CPU or CUDA, contiguous) to a weights file at ``path``, atomically.

    Args:
        path: destination; written under a temporary name and renamed, mode 0600.
        tensors: name -> tensor, in the order they will be stored.
        model_name: recorded for people and ``thaw-agents info``.
        model_fingerprint: what a restore checks against (``expect_fingerprint``).
        fsync: flush to stable storage before the rename; default: yes unless under /dev/shm.
        extra: more JSON fields for the ``weights`` manifest (e.g. ``vllm_version``).

    Example:
        >>> import torch
        >>> stats = freeze_tensors("/tmp/t.thaw", {"w": torch.ones(3)}, model_name="m",
        ...                        model_fingerprint="sha256:0")
        >>> stats.nbytes
        12
    """
    from .accel import AtomicFile, write_segments

    start = time.perf_counter()
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")
    for name, t in items:
        if _dtype_name(t) not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {t.dtype}, which weights files do not hold")
    items = [(n, t if t.is_contiguous() else t.contiguous()) for n, t in items]
    meta = {
        "created_by": f"thaw-agents {__version__}",
        "weights": {
            "model_name": model_name,
            "model_fingerprint": model_fingerprint,
            "tensors": [{"name": n, "dtype": _dtype_name(t), "shape": list(t.shape)} for n, t in items],
            **(dict(extra) if extra else {}),
        },
    }
    # Checksums are fixed-width hex: the header's length is known before the payload is hashed.
    _, placeholder = _header(items, ["0" * 64] * len(items), meta)
    path = os.fspath(path)
    if fsync is None:
        fsync = not os.path.abspath(path).startswith("/dev/shm/")
    nbytes = sum(t.numel() * t.element_size() for _, t in items)
    try:
        with AtomicFile(path, fsync=fsync) as file:
            digests = write_segments(file, len(placeholder), [t for _, t in items], hasher=_hasher)
            _, blob = _header(items, [str(d) for d in digests], meta)
            assert len(blob) == len(placeholder), "header length changed with the checksums"
            file.pwrite(blob, 0)
            route = "o_direct" if file.direct else "buffered"
            file.commit()
    except OSError as exc:  # the partial file is gone (AtomicFile); say why in our terms
        raise write_failed(path, exc, len(placeholder) + nbytes) from exc
    stats = WeightsStats(
        nbytes=nbytes, num_tensors=len(items), seconds=time.perf_counter() - start, route=route
    )
    logger.info("thaw: froze %d tensors (%d bytes) to %s at %.2f GB/s", len(items), nbytes, path, stats.gbps)
    return stats


def freeze_module(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_fingerprint: str,
    **kwargs: Any,
) -> WeightsStats:
    """Freeze every parameter and persistent buffer of ``module`` (see :func:`freeze_tensors`)."""
    return freeze_tensors(
        path, module_tensors(module), model_name=model_name, model_fingerprint=model_fingerprint, **kwargs
    )


def read_weights_manifest(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> WeightsManifest:
    """Read and validate a weights file's header (no payload byte is read).

    Strict like the KV reader: names are strings, one tensor per region with the region's
    name, unique names, a dtype from a closed set, a shape of ints >= 0 whose exact product
    times the dtype's size is the region's size.

    Args:
        follow_symlinks: False refuses a symbolic link.

    Raises:
        SnapshotNotFoundError, SnapshotFormatError, SnapshotVersionError, SnapshotTruncatedError,
        SnapshotReadError
    """
    container = _read_container(path, expect_kind=KIND, follow_symlinks=follow_symlinks)
    where = container.path
    meta = want_dict(container.header.get("weights"), "the 'weights' manifest", where)
    for key in ("model_name", "model_fingerprint"):
        want_str(meta.get(key), f"weights manifest field {key!r}", where)
    listed = want_list(meta.get("tensors"), "weights manifest field 'tensors'", where)
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
        item = want_dict(item, what, where)
        if item.get("name") != region.name:
            raise SnapshotFormatError(
                f"{what} is named {describe(item.get('name'))}, its region {describe(region.name)}",
                path=where,
            )
        if region.name in seen:
            raise SnapshotFormatError(f"{what} repeats the name {describe(region.name)}", path=where)
        seen.add(region.name)
        dtype = item.get("dtype")
        if dtype not in _DTYPES:  # the writer's closed set (not every name torch has)
            raise SnapshotFormatError(f"{what} has unsupported dtype {describe(dtype)}", path=where)
        itemsize = dtype_itemsize(dtype, f"{what} dtype", where)
        shape = want_shape(item.get("shape"), f"{what} shape", where)
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
    return WeightsManifest(
        container=container,
        model_name=meta["model_name"],
        model_fingerprint=meta["model_fingerprint"],
        tensors=tuple(entries),
        created_by=want_str(container.header.get("created_by", ""), "field 'created_by'", where),
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
        if _dtype_name(target) != entry.dtype:
            raise SnapshotMismatchError(f"{entry.name}.dtype", _dtype_name(target), entry.dtype, path=path)
        if tuple(target.shape) != entry.shape:
            raise SnapshotMismatchError(f"{entry.name}.shape", tuple(target.shape), entry.shape, path=path)
        if not target.is_contiguous():
            raise SnapshotMismatchError(f"{entry.name}.contiguous", True, False, path=path)
        pairs.append((entry, target))
    return pairs


def restore_tensors(
    path: str | os.PathLike[str],
    targets: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    *,
    expect_fingerprint: str | None = None,
    source: str = "auto",
) -> WeightsStats:
    """Restore a weights file into ``targets`` (CPU or CUDA tensors), all or nothing.

    Every check (header, manifest, names, dtypes, shapes, fingerprint, then every checksum)
    passes before the first target byte is written.

    Args:
        source: ``auto``, ``direct`` (O_DIRECT reads), ``buffered`` (page cache) or ``mmap``
            (map the file; on CUDA page-locked with cudaHostRegister: the /dev/shm fast path).
    """
    from .weights_restore import restore_from_file

    manifest = read_weights_manifest(path)
    items = targets.items() if isinstance(targets, Mapping) else targets
    pairs = check_targets(manifest, items, expect_fingerprint=expect_fingerprint)
    return restore_from_file(manifest, pairs, source=source)


def restore_module(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    expect_fingerprint: str | None = None,
    **kwargs: Any,
) -> WeightsStats:
    """Restore every parameter and persistent buffer of ``module`` from a weights file."""
    return restore_tensors(path, module_tensors(module), expect_fingerprint=expect_fingerprint, **kwargs)
