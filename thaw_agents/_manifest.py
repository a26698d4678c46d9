"""The KV snapshot manifest: what a ``kind == "kv"`` container's header holds beyond the container.

Fields (see ``docs/snapshot-format.md``)::

    kv_spec       the engine's KVSpec (model fingerprint, dtype, block size, layout, layers)
    hash_scheme   "thaw-chain-blake3-v1"
    snapshot      id, first_block, num_blocks, token_ids (of this file's blocks),
                  tail_token_ids (the partial block after them), keys (hex, one per block),
                  parent ({snapshot_id, num_blocks, last_key} or null), num_prefix_tokens
    created_by    "thaw-agents <version>"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ._container import Container, read_container
from ._errors import SnapshotFormatError, SnapshotMismatchError
from ._kvspec import HASH_SCHEME, KVSpec, chain_keys

__all__ = ["KVManifest", "ParentRef", "check_compatible", "read_kv_manifest"]

_HINTS = {
    "model_fingerprint": "hydrate it into an engine running the model it was taken from",
    "dtype": "start the engine with the snapshot's dtype (reinterpreting KV bytes as another "
    "dtype produces garbage)",
    "block_size": "start the engine with the snapshot's block_size",
    "kv_layout": "KV bytes are laid out differently by this attention backend or CPU instruction "
    "set; take the snapshot on a matching engine",
    "platform": "snapshots do not cross CPU and GPU engines",
    "layers": "the engines' KV caches have different shapes (model or tensor parallel size)",
}


def check_compatible(snapshot: KVSpec, engine: KVSpec, *, path: str | None = None) -> None:
    """Raise :class:`SnapshotMismatchError` naming the first field where they differ."""
    diffs = engine.differences(snapshot)
    if diffs:
        name, expected, actual = diffs[0]
        if name == "model_fingerprint":
            expected = f"{engine.model_name} ({expected[:19]}...)"
            actual = f"{snapshot.model_name} ({actual[:19]}...)"
        raise SnapshotMismatchError(name, expected, actual, path=path, hint=_HINTS.get(name, ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentRef:
    """The snapshot a nested snapshot extends."""

    snapshot_id: str
    num_blocks: int
    last_key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KVManifest:
    """A validated KV snapshot header (one file of a chain)."""

    container: Container
    spec: KVSpec
    snapshot_id: str
    first_block: int
    token_ids: tuple[int, ...]
    tail_token_ids: tuple[int, ...]
    keys: tuple[str, ...]
    parent: ParentRef | None
    created_by: str

    @property
    def path(self) -> str:
        return self.container.path

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def end_block(self) -> int:
        return self.first_block + self.num_blocks

    def block_source(self, index: int) -> tuple[int, int, str]:
        """(absolute file offset, nbytes, checksum) of this file's ``index``-th block."""
        region = self.container.regions[index]
        return self.container.payload_offset + region.offset, region.nbytes, region.checksum


def _field(data: dict[str, Any], key: str, typ: type, path: str) -> Any:
    if key not in data:
        raise SnapshotFormatError(f"manifest lacks {key!r}", path=path)
    value = data[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise SnapshotFormatError(f"manifest field {key!r} is not {typ.__name__}", path=path)
    return value


def _int_list(value: Any, key: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise SnapshotFormatError(f"manifest field {key!r} must be a list of integers", path=path)
    return tuple(value)


def read_kv_manifest(
    path: str | os.PathLike[str], *, expect_spec: KVSpec | None = None, check_keys: bool = True
) -> KVManifest:
    """Read and validate a KV snapshot's header (no payload bytes are checked here).

    Beyond the container's checks: the KV schema, the hash scheme, one region per block of
    the declared size, and (``check_keys``) that the stored chain keys are the keys of the
    stored token ids, so a manifest edited by hand is caught. With ``expect_spec`` the
    snapshot's KV spec is compared with the target engine's right after it is parsed.

    Raises:
        SnapshotMismatchError: naming the first field that differs from ``expect_spec``.
    """
    container = read_container(path, expect_kind="kv")
    header, where = container.header, container.path
    try:
        spec = KVSpec.from_json(_field(header, "kv_spec", dict, where))
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotFormatError(f"kv_spec is malformed: {exc}", path=where) from exc
    if expect_spec is not None:
        check_compatible(spec, expect_spec, path=where)
    scheme = _field(header, "hash_scheme", str, where)
    if scheme != HASH_SCHEME:
        raise SnapshotFormatError(
            f"hash scheme {scheme!r} is unknown; this thaw-agents uses {HASH_SCHEME!r}", path=where
        )
    snap = _field(header, "snapshot", dict, where)
    snapshot_id = _field(snap, "id", str, where)
    first_block = _field(snap, "first_block", int, where)
    token_ids = _int_list(snap.get("token_ids"), "token_ids", where)
    tail = _int_list(snap.get("tail_token_ids"), "tail_token_ids", where)
    keys = snap.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise SnapshotFormatError("manifest field 'keys' must be a list of hex strings", path=where)
    bs = spec.block_size
    if bs <= 0 or len(token_ids) != len(keys) * bs:
        raise SnapshotFormatError(
            f"{len(token_ids)} token ids do not fill {len(keys)} blocks of {bs}", path=where
        )
    if len(tail) >= bs:
        raise SnapshotFormatError(f"tail of {len(tail)} tokens is not shorter than a block", path=where)
    if len(container.regions) != len(keys):
        raise SnapshotFormatError(
            f"{len(container.regions)} payload regions for {len(keys)} blocks", path=where
        )
    for region in container.regions:
        if region.nbytes != spec.block_nbytes:
            raise SnapshotFormatError(
                f"region {region.name} holds {region.nbytes} bytes; a block is {spec.block_nbytes}",
                path=where,
            )
    parent_data = snap.get("parent")
    parent: ParentRef | None = None
    if parent_data is not None:
        if not isinstance(parent_data, dict):
            raise SnapshotFormatError("manifest field 'parent' must be an object or null", path=where)
        parent = ParentRef(
            snapshot_id=_field(parent_data, "snapshot_id", str, where),
            num_blocks=_field(parent_data, "num_blocks", int, where),
            last_key=_field(parent_data, "last_key", str, where),
        )
        if parent.num_blocks != first_block:
            raise SnapshotFormatError(
                f"starts at block {first_block} but its parent holds {parent.num_blocks}",
                path=where,
            )
    elif first_block != 0:
        raise SnapshotFormatError(f"starts at block {first_block} without a parent", path=where)
    if check_keys and keys:
        start = bytes.fromhex(parent.last_key) if parent else None
        expected = [k.hex() for k in chain_keys(spec, token_ids, start_key=start)]
        if expected != keys:
            raise SnapshotFormatError(
                "the block keys do not match the token ids: the manifest was edited or corrupted",
                path=where,
            )
    return KVManifest(
        container=container,
        spec=spec,
        snapshot_id=snapshot_id,
        first_block=first_block,
        token_ids=token_ids,
        tail_token_ids=tail,
        keys=tuple(keys),
        parent=parent,
        created_by=str(header.get("created_by", "")),
    )
