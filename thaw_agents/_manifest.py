"""KV snapshots: their ids, their one writer and their strict reader.

:func:`derive_snapshot` is the one place a snapshot id is made from tokens (``fork()``
names the file it asks for, the worker recomputes it before writing, the reader before
trusting a file); :func:`write_kv_snapshot` is the one writer (the connector's worker
calls it); :func:`read_kv_manifest` the reader. A ``kind == "kv"`` container's header holds
these fields under ``"kv"`` (see ``docs/snapshot-format.md``)::

    kv_spec       the engine's KVSpec (model fingerprint, dtype, block size, layout, layers)
    hash_scheme   "thaw-chain-blake3-v1"
    snapshot      id, first_block, token_ids (of this file's blocks),
                  tail_token_ids (the partial block after them), keys (hex, one per block),
                  parent ({snapshot_id, num_blocks, last_key} or null)

A tensor-parallel engine's snapshot is one file too: one region per rank and block, rank-major
(``rank <r> block <i>``), written by every rank into one shared file (:mod:`._kv_ranks`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from ._container import Container, RegionData
from ._container_reader import read_container
from ._container_writer import write_container
from ._errors import SnapshotFormatError, SnapshotMismatchError
from ._kv_ranks import write_rank_share
from ._kvspec import HASH_SCHEME, KVSpec, chain_keys
from ._store import snapshot_path
from ._validate import (
    describe,
    want_fields,
    want_hex,
    want_id,
    want_int,
    want_list,
    want_str,
    want_tokens,
)

__all__ = [
    "KVManifest",
    "ParentRef",
    "SnapshotContent",
    "check_compatible",
    "derive_snapshot",
    "read_kv_manifest",
    "write_kv_snapshot",
]

# Blocks before a file's first one: a chain of 2**40 blocks is far beyond any real prefix.
_MAX_BLOCKS = 2**40
_SNAPSHOT_FIELDS = ("id", "first_block", "token_ids", "tail_token_ids", "keys")

_HINTS = {
    "model_fingerprint": "hydrate it into an engine running the model it was taken from",
    "dtype": "start the engine with the snapshot's dtype (reinterpreting KV bytes as another "
    "dtype produces garbage)",
    "block_size": "start the engine with the snapshot's block_size",
    "kv_layout": "KV bytes are laid out differently by this attention backend or CPU instruction "
    "set; take the snapshot on a matching engine",
    "platform": "snapshots do not cross CPU and GPU engines",
    "layers": "the engines' KV caches have different shapes (model or tensor parallel size)",
    "tensor_parallel_size": "each rank's blocks hold only its KV heads: hydrate it into an engine "
    "with the snapshot's tensor_parallel_size (snapshots are not resharded)",
    "kv_head_slices": "the ranks hold other KV heads than the snapshot's: use the engine it was taken on",
    "vllm_version": "KV block layouts may change between vLLM releases; re-create the snapshot with "
    "this engine's vLLM",
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
class SnapshotContent:
    """What a KV snapshot file holds, derived from its tokens (see :func:`derive_snapshot`).

    Attributes:
        snapshot_id: ``thaw-`` + 32 hex digits: the file's name in a store.
        first_block: index of the file's first block in the whole prefix.
        token_ids: the tokens of the file's full blocks.
        tail_token_ids: the partial block after them (never cached, recomputed on restore).
        keys: one chain key per full block.
        parent: the snapshot this one extends, or None for a root.
    """

    snapshot_id: str
    first_block: int
    token_ids: tuple[int, ...]
    tail_token_ids: tuple[int, ...]
    keys: tuple[bytes, ...]
    parent: ParentRef | None

    @property
    def num_blocks(self) -> int:
        return len(self.keys)

    @property
    def last_key(self) -> bytes:
        """The key the id is made of: the last block's, else the parent's last (else empty)."""
        if self.keys:
            return self.keys[-1]
        return bytes.fromhex(self.parent.last_key) if self.parent else b""


def derive_snapshot(
    spec: KVSpec, token_ids: Sequence[int], *, parent: ParentRef | None = None
) -> SnapshotContent:
    """The id and block keys of the snapshot of ``token_ids``: the one place ids are made.

    The id is BLAKE3 of the KV byte layout, the last chain key and the partial tail's tokens:
    the same tokens in another dtype or attention layout are another snapshot, and a child's
    id binds its whole prefix through the parent's last key.

    Args:
        spec: the engine's KV spec (its model and block size seed the key chain).
        token_ids: the tokens from the snapshot's first block on: a whole prefix for a root,
            the tokens after the parent's blocks for a child.
        parent: the snapshot this one extends (its keys continue the parent's chain).

    Example:
        >>> content = derive_snapshot(spec, tokens)                        # doctest: +SKIP
        >>> snapshot_path(store, content.snapshot_id)                      # doctest: +SKIP
    """
    bs = spec.block_size
    full = len(token_ids) // bs * bs
    start_key = bytes.fromhex(parent.last_key) if parent else None
    keys = tuple(chain_keys(spec, token_ids[:full], start_key=start_key))
    tail = tuple(token_ids[full:])
    last_key = keys[-1] if keys else (start_key or b"")
    digest = blake3.blake3(spec.layout_material() + b"|" + last_key + np.asarray(tail, dtype="<i4").tobytes())
    return SnapshotContent(
        snapshot_id="thaw-" + digest.hexdigest()[:32],
        first_block=parent.num_blocks if parent else 0,
        token_ids=tuple(token_ids[:full]),
        tail_token_ids=tail,
        keys=keys,
        parent=parent,
    )


def write_kv_snapshot(
    store: Path,
    spec: KVSpec,
    content: SnapshotContent,
    blocks: Sequence[RegionData],
    *,
    fsync: bool | None = None,
    rank: int = 0,
    job: str = "",
    engine_pid: int = 0,
) -> Container | None:
    """Write ``content``'s blocks to ``<store>/<snapshot id>.thaw``, atomically and owner-only.

    In a tensor-parallel engine (``spec.tensor_parallel_size > 1``) each rank calls this with
    its own share of the blocks and the same ``job``; the file appears once every rank has
    written its share (the last one writes the header and renames it into place).

    Args:
        store: the snapshot store folder.
        spec: the KV spec of the engine the blocks come from.
        content: from :func:`derive_snapshot` (the file is named and keyed by it).
        blocks: one block's bytes each (a buffer, or one buffer per layer written back to
            back), ``content.num_blocks`` of them, ``spec.block_nbytes`` each (this rank's).
        fsync: flush before the rename; default: yes, except under ``/dev/shm``.
        rank: this worker's tensor-parallel rank.
        job: the same on every rank for one save, unique between saves (the request id).
        engine_pid: the engine's process, the same for every rank (0: this one's parent);
            the shared file is named after it so the store removes a dead engine's leftovers.

    Returns:
        The container, or None for a rank whose share is written while others are not yet.

    Raises:
        SnapshotWriteError: the file could not be written (a full disk, permissions).
    """
    if len(blocks) != content.num_blocks:
        raise ValueError(f"{len(blocks)} blocks for a snapshot of {content.num_blocks}")
    dest = snapshot_path(store, content.snapshot_id)
    parent = content.parent
    meta = {
        "hash_scheme": HASH_SCHEME,
        "kv_spec": spec.to_json(),
        "snapshot": {
            "id": content.snapshot_id,
            "first_block": content.first_block,
            "token_ids": list(content.token_ids),
            "tail_token_ids": list(content.tail_token_ids),
            "keys": [key.hex() for key in content.keys],
            "parent": None
            if parent is None
            else {
                "snapshot_id": parent.snapshot_id,
                "num_blocks": parent.num_blocks,
                "last_key": parent.last_key,
            },
        },
    }
    if fsync is None:
        fsync = not str(dest).startswith("/dev/shm/")  # shared memory needs no fsync
    if spec.tensor_parallel_size > 1:
        names = [
            f"rank {r} block {content.first_block + i}"
            for r in range(spec.tensor_parallel_size)
            for i in range(content.num_blocks)
        ]
        return write_rank_share(
            dest,
            meta,
            names,
            blocks,
            rank=rank,
            ranks=spec.tensor_parallel_size,
            block_nbytes=spec.block_nbytes,
            job=job,
            owner_pid=engine_pid or os.getppid(),
            fsync=fsync,
        )
    regions = [(f"block {content.first_block + i}", block) for i, block in enumerate(blocks)]
    return write_container(dest, "kv", meta, regions, fsync=fsync)


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

    def block_source(self, index: int, rank: int = 0) -> tuple[int, int, str]:
        """(absolute file offset, nbytes, checksum) of ``rank``'s share of this file's
        ``index``-th block (the whole block at TP=1)."""
        region = self.container.regions[rank * self.num_blocks + index]
        return self.container.payload_offset + region.offset, region.nbytes, region.checksum


def read_kv_manifest(
    path: str | os.PathLike[str],
    *,
    expect_spec: KVSpec | None = None,
    check_keys: bool = True,
    expect_id: str | None = None,
    follow_symlinks: bool = True,
) -> KVManifest:
    """Read and validate a KV snapshot's header (no payload bytes are checked here).

    Beyond the container's checks: the KV schema with strict types and ranges, the hash
    scheme, one region per block of the declared size, the chain keys recomputed from the
    token ids, and the snapshot id recomputed from the last key, the tail and the layout:
    a header edited by hand (one token id changed) is refused, never served under the id.
    With ``expect_spec`` the snapshot's KV spec is compared with the target engine's right
    after it is parsed; with ``expect_id`` the file must hold exactly that snapshot.

    Args:
        check_keys: kept for compatibility; the keys are always checked (a few
            microseconds a block), since the id is only as good as the keys it is made of.
        follow_symlinks: False refuses a symbolic link (files inside a snapshot store).

    Raises:
        SnapshotNotFoundError, SnapshotFormatError, SnapshotVersionError,
        SnapshotTruncatedError, SnapshotReadError
        SnapshotMismatchError: naming the first field that differs from ``expect_spec``.
    """
    del check_keys  # always on: see above
    container = read_container(path, expect_kind="kv", follow_symlinks=follow_symlinks)
    where = container.path
    kv = want_fields(container.meta, "kv", where, ("kv_spec", "hash_scheme", "snapshot"))
    if len(kv) != 3:
        raise SnapshotFormatError(f"'kv' holds unknown fields {describe(sorted(kv))}", path=where)
    try:
        spec = KVSpec.from_json(kv["kv_spec"])
    except SnapshotFormatError as exc:
        raise SnapshotFormatError(f"kv_spec is malformed: {exc}", path=where) from exc
    if expect_spec is not None:
        check_compatible(spec, expect_spec, path=where)
    scheme = want_str(kv["hash_scheme"], "kv.hash_scheme", where)
    if scheme != HASH_SCHEME:
        raise SnapshotFormatError(
            f"hash scheme {describe(scheme)} is unknown; this thaw-agents uses {HASH_SCHEME!r}",
            path=where,
        )
    snap = want_fields(kv["snapshot"], "kv.snapshot", where, _SNAPSHOT_FIELDS)
    stored_id = want_id(snap["id"], "snapshot.id", where)
    first_block = want_int(snap["first_block"], "snapshot.first_block", where, hi=_MAX_BLOCKS)
    token_ids = want_tokens(snap["token_ids"], "snapshot.token_ids", where)
    tail = want_tokens(snap["tail_token_ids"], "snapshot.tail_token_ids", where)
    keys = want_list(snap["keys"], "snapshot.keys", where)
    for index, key in enumerate(keys):
        want_hex(key, f"snapshot.keys[{index}]", where)
    bs = spec.block_size
    if len(token_ids) != len(keys) * bs:
        raise SnapshotFormatError(
            f"{len(token_ids)} token ids do not fill {len(keys)} blocks of {bs}", path=where
        )
    if len(tail) >= bs:
        raise SnapshotFormatError(f"tail of {len(tail)} tokens is not shorter than a block", path=where)
    ranks = spec.tensor_parallel_size
    if len(container.regions) != len(keys) * ranks:
        raise SnapshotFormatError(
            f"{len(container.regions)} payload regions for {len(keys)} blocks of {ranks} ranks",
            path=where,
        )
    block_nbytes = spec.block_nbytes  # a sum over the layers: once, not per region
    for region in container.regions:
        if region.nbytes != block_nbytes:
            raise SnapshotFormatError(
                f"region {describe(region.name)} holds {region.nbytes} bytes; a block is {block_nbytes}",
                path=where,
            )
    parent = _parent(snap.get("parent"), where)
    if parent is not None:
        if parent.num_blocks != first_block:
            raise SnapshotFormatError(
                f"starts at block {first_block} but its parent holds {parent.num_blocks}",
                path=where,
            )
    elif first_block != 0:
        raise SnapshotFormatError(f"starts at block {first_block} without a parent", path=where)
    derived = derive_snapshot(spec, token_ids + tail, parent=parent)
    if [key.hex() for key in derived.keys] != keys:
        raise SnapshotFormatError(
            "the block keys do not match the token ids: the manifest was edited or corrupted; "
            "re-create the snapshot",
            path=where,
        )
    if derived.snapshot_id != stored_id:
        raise SnapshotFormatError(
            f"the snapshot id {stored_id} is not the id of its content ({derived.snapshot_id}): the "
            "manifest was edited or corrupted; re-create the snapshot",
            path=where,
        )
    if expect_id is not None and stored_id != expect_id:
        raise SnapshotFormatError(
            f"the file under the name {describe(expect_id)} holds another snapshot ({stored_id}); "
            "remove it and save the snapshot again",
            path=where,
        )
    return KVManifest(
        container=container,
        spec=spec,
        snapshot_id=stored_id,
        first_block=first_block,
        token_ids=token_ids,
        tail_token_ids=tail,
        keys=tuple(keys),
        parent=parent,
        created_by=container.created_by,
    )


def _parent(data: Any, where: str) -> ParentRef | None:
    if data is None:
        return None
    data = want_fields(data, "snapshot.parent", where, ("snapshot_id", "num_blocks", "last_key"))
    return ParentRef(
        snapshot_id=want_id(data["snapshot_id"], "snapshot.parent.snapshot_id", where),
        num_blocks=want_int(data["num_blocks"], "snapshot.parent.num_blocks", where, hi=_MAX_BLOCKS),
        last_key=want_hex(data["last_key"], "snapshot.parent.last_key", where),
    )
