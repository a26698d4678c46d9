"""What a KV snapshot must match, and the content hash chain that keys its blocks.

Two engines can exchange KV blocks only when every field of :class:`KVSpec` is equal:
the model (by fingerprint, not by name), the KV dtype, block size, the per-layer block
shapes, the byte layout of a block (attention backend and, on CPU, the instruction
set variant: AMX machines pack K differently from AVX-512 ones), and the tensor-parallel
size with each rank's slice of the KV heads (a rank's block holds only its heads; ``layers``
then describes one rank's block, the same on every rank).

Blocks are keyed by our own chain, never by vLLM's block hashes (those are seeded per
process on some versions and pickle-based by default)::

    key[-1] = BLAKE3("thaw-chain-v1|" | model fingerprint, block size as JSON)
    key[i]  = BLAKE3(key[i-1] | int32-LE token ids of block i)

A snapshot's id is made from these keys in one place only:
:func:`thaw_agents._manifest.derive_snapshot`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from ._errors import SnapshotFormatError
from ._validate import dtype_itemsize, want_fields, want_int, want_list, want_shape, want_str

__all__ = ["HASH_SCHEME", "KVSpec", "LayerSpec", "chain_keys", "kv_head_slices", "model_fingerprint"]

HASH_SCHEME = "thaw-chain-blake3-v1"
_SAMPLE_NBYTES = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerSpec:
    """One attention layer's KV cache, described per block."""

    name: str
    block_shape: tuple[int, ...]
    block_nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KVSpec:
    """Everything a restore must match, as plain data (crosses process boundaries as JSON)."""

    model_name: str
    model_fingerprint: str
    vllm_version: str
    platform: str
    kv_layout: str
    dtype: str
    block_size: int
    layers: tuple[LayerSpec, ...] = field(default_factory=tuple)
    # Tensor parallelism: ranks, and per rank the [start, stop) of the model's KV heads its
    # cache holds (several ranks hold the same head when there are fewer heads than ranks).
    # Absent from the JSON of a single-rank engine, so its files and ids are unchanged.
    tensor_parallel_size: int = 1
    kv_head_slices: tuple[tuple[int, int], ...] = ()

    @property
    def block_nbytes(self) -> int:
        """Bytes of one rank's share of a block across every layer (the whole block at TP=1)."""
        return sum(layer.block_nbytes for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.tensor_parallel_size == 1:
            del data["tensor_parallel_size"], data["kv_head_slices"]
        else:
            data["kv_head_slices"] = [list(s) for s in self.kv_head_slices]
        data["layers"] = [
            {
                "name": lyr.name,
                "block_shape": list(lyr.block_shape),
                "block_nbytes": lyr.block_nbytes,
            }
            for lyr in self.layers
        ]
        return data

    @classmethod
    def from_json(cls, data: Any) -> KVSpec:
        """Parse a spec, strictly: it may come from a file or another process.

        Strings are strings, ints are ints (never bools, floats or numeric strings), the dtype
        is a known one, and each layer's ``block_nbytes`` is its shape times the dtype's size.

        Raises:
            SnapshotFormatError: naming the first field that is wrong.
        """
        return _spec_from_json(cls, data)

    def differences(self, other: KVSpec) -> list[tuple[str, Any, Any]]:
        """Fields that differ, as (field, self's value, other's value), most telling first.

        The vLLM version must be of the same release series (major.minor): the byte layout of
        a backend's blocks is vLLM's internal business and may change between releases even
        when the backend's name does not. Patch releases are assumed to keep it.
        """
        out: list[tuple[str, Any, Any]] = []
        for name in ("model_fingerprint", "dtype", "block_size", "kv_layout", "platform"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append((name, mine, theirs))
        if self.tensor_parallel_size != other.tensor_parallel_size:
            out.append(("tensor_parallel_size", self.tensor_parallel_size, other.tensor_parallel_size))
        elif self.kv_head_slices != other.kv_head_slices:
            out.append(("kv_head_slices", list(self.kv_head_slices), list(other.kv_head_slices)))
        mine_layers = [(lyr.block_shape, lyr.block_nbytes) for lyr in self.layers]
        their_layers = [(lyr.block_shape, lyr.block_nbytes) for lyr in other.layers]
        if mine_layers != their_layers:
            out.append(("layers", _layers_summary(self.layers), _layers_summary(other.layers)))
        if release_series(self.vllm_version) != release_series(other.vllm_version):
            out.append(("vllm_version", self.vllm_version, other.vllm_version))
        return out

    def chain_root_material(self) -> bytes:
        """What seeds the key chain: the model and the block size (they decide the tokens of
        each block). The byte layout is checked field by field instead, so an engine that
        differs gets an error naming the field rather than a silent miss."""
        material = {"model_fingerprint": self.model_fingerprint, "block_size": self.block_size}
        return json.dumps(material, sort_keys=True, separators=(",", ":")).encode()

    def layout_material(self) -> bytes:
        material = {
            "kv_layout": self.kv_layout,
            "dtype": self.dtype,
            "platform": self.platform,
            "layers": [list(lyr.block_shape) for lyr in self.layers],
        }
        if self.tensor_parallel_size > 1:  # single-rank ids stay what they were
            material["tensor_parallel_size"] = self.tensor_parallel_size
            material["kv_head_slices"] = [list(s) for s in self.kv_head_slices]
        return json.dumps(material, sort_keys=True, separators=(",", ":")).encode()


_MAX_LAYERS = 4096
_MAX_BLOCK_SIZE = 1 << 16
_MAX_RANKS = 1024
_MAX_HEADS = 1 << 16
_SPEC_FIELDS = (
    "model_name",
    "model_fingerprint",
    "vllm_version",
    "platform",
    "kv_layout",
    "dtype",
    "block_size",
    "layers",
)


def _spec_from_json(cls: type[KVSpec], data: Any) -> KVSpec:
    data = want_fields(data, "kv_spec", None, _SPEC_FIELDS)
    dtype = want_str(data["dtype"], "kv_spec.dtype", None)
    itemsize = dtype_itemsize(dtype, "kv_spec.dtype", None)
    raw_layers = want_list(data["layers"], "kv_spec.layers", None)
    if len(raw_layers) > _MAX_LAYERS:
        raise SnapshotFormatError(f"kv_spec lists {len(raw_layers)} layers (at most {_MAX_LAYERS})")
    layers = []
    for index, raw in enumerate(raw_layers):
        what = f"kv_spec.layers[{index}]"
        raw = want_fields(raw, what, None, ("name", "block_shape", "block_nbytes"))
        shape = want_shape(raw["block_shape"], f"{what}.block_shape", None)
        nbytes = want_int(raw["block_nbytes"], f"{what}.block_nbytes", None)
        if nbytes != math.prod(shape) * itemsize:
            raise SnapshotFormatError(
                f"{what}.block_nbytes is {nbytes}, but {list(shape)} of {dtype} is "
                f"{math.prod(shape) * itemsize} bytes"
            )
        layers.append(
            LayerSpec(
                name=want_str(raw["name"], f"{what}.name", None), block_shape=shape, block_nbytes=nbytes
            )
        )
    tp_size, slices = _tensor_parallel_from_json(data)
    return cls(
        model_name=want_str(data["model_name"], "kv_spec.model_name", None),
        model_fingerprint=want_str(data["model_fingerprint"], "kv_spec.model_fingerprint", None),
        vllm_version=want_str(data["vllm_version"], "kv_spec.vllm_version", None),
        platform=want_str(data["platform"], "kv_spec.platform", None),
        kv_layout=want_str(data["kv_layout"], "kv_spec.kv_layout", None),
        dtype=dtype,
        block_size=want_int(data["block_size"], "kv_spec.block_size", None, lo=1, hi=_MAX_BLOCK_SIZE),
        layers=tuple(layers),
        tensor_parallel_size=tp_size,
        kv_head_slices=slices,
    )


def _tensor_parallel_from_json(data: dict[str, Any]) -> tuple[int, tuple[tuple[int, int], ...]]:
    """``tensor_parallel_size`` (absent: 1) and one ``[start, stop)`` of KV heads per rank."""
    if "tensor_parallel_size" not in data and "kv_head_slices" not in data:
        return 1, ()
    want_fields(data, "kv_spec", None, ("tensor_parallel_size", "kv_head_slices"))
    size = want_int(data["tensor_parallel_size"], "kv_spec.tensor_parallel_size", None, lo=2, hi=_MAX_RANKS)
    raw = want_list(data["kv_head_slices"], "kv_spec.kv_head_slices", None)
    if len(raw) != size:
        raise SnapshotFormatError(f"kv_spec.kv_head_slices lists {len(raw)} ranks, not {size}")
    slices = []
    for rank, pair in enumerate(raw):
        what = f"kv_spec.kv_head_slices[{rank}]"
        pair = want_list(pair, what, None)
        if len(pair) != 2:
            raise SnapshotFormatError(f"{what} is not a [start, stop] pair")
        start = want_int(pair[0], what, None, hi=_MAX_HEADS)
        stop = want_int(pair[1], what, None, hi=_MAX_HEADS)
        if stop <= start:
            raise SnapshotFormatError(f"{what} is [{start}, {stop}], an empty slice")
        slices.append((start, stop))
    return size, tuple(slices)


def kv_head_slices(num_kv_heads: int, tp_size: int) -> tuple[tuple[int, int], ...]:
    """The KV heads each rank's cache holds, as vLLM shards them: ``num_kv_heads / tp_size``
    heads per rank, or one head shared by ``tp_size / num_kv_heads`` ranks when fewer."""
    per_rank = max(1, num_kv_heads // tp_size)
    return tuple(
        (start, start + per_rank) for start in (rank * num_kv_heads // tp_size for rank in range(tp_size))
    )


def release_series(version: str) -> str:
    """``"0.32"`` for ``"0.32.0"``, ``"0.32.1.dev3+cpu"``: what must match between engines."""
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def _layers_summary(layers: Sequence[LayerSpec]) -> str:
    shapes = {tuple(lyr.block_shape) for lyr in layers}
    return f"{len(layers)} layers, block shapes {sorted(shapes)}"


def chain_keys(spec: KVSpec, token_ids: Sequence[int], *, start_key: bytes | None = None) -> list[bytes]:
    """Chain keys of every full block of ``token_ids`` (a partial tail block gets none).

    Args:
        spec: the engine's KV spec (its root seeds the chain).
        token_ids: tokens starting at a block boundary.
        start_key: the key of the block before ``token_ids[0]``; None for the root.
    """
    bs = spec.block_size
    key = start_key if start_key is not None else chain_root(spec)
    tokens = np.asarray(token_ids, dtype="<i4")
    keys: list[bytes] = []
    for start in range(0, len(tokens) - bs + 1, bs):
        key = blake3.blake3(key + tokens[start : start + bs].tobytes()).digest()
        keys.append(key)
    return keys


def chain_root(spec: KVSpec) -> bytes:
    return blake3.blake3(b"thaw-chain-v1|" + spec.chain_root_material()).digest()


def model_fingerprint(model: str, hf_config: dict[str, Any] | None = None) -> str:
    """A fingerprint of a model's weights and architecture.

    For a local folder: SHA-256 over the config and, for each weight file, its name, size
    and three 1 MiB samples (start, middle, end): different checkpoints of one
    architecture differ there, and a 16 GB model is fingerprinted in milliseconds.
    For a hub id that is not a local folder: the id and its config.
    """
    path = Path(model)
    if path.is_dir():
        return _folder_fingerprint(str(path.resolve()), _mtime_signature(path))
    digest = hashlib.sha256(b"thaw-model-id-v1|" + model.encode())
    if hf_config:
        digest.update(json.dumps(hf_config, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"})
    return files


def _mtime_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    files = [*_weight_files(path), path / "config.json"]
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists())


@lru_cache(maxsize=16)
def _folder_fingerprint(path: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    folder = Path(path)
    digest = hashlib.sha256(b"thaw-model-folder-v1|")
    config = folder / "config.json"
    if config.exists():
        try:
            digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
        except ValueError:
            digest.update(config.read_bytes())
    for weights in _weight_files(folder):
        size = weights.stat().st_size
        digest.update(f"|{weights.name}|{size}|".encode())
        with open(weights, "rb") as handle:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE_NBYTES // 2), max(0, size - _SAMPLE_NBYTES)}):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_NBYTES))
    del signature  # part of the cache key only: a rewritten file gets a new fingerprint
    return "sha256:" + digest.hexdigest()
