"""Plain data that crosses from the scheduler half to the worker half each step.

Only ids, offsets and checksums: never tensors, handles or paths (the worker turns ids into
files of its own store).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

__all__ = ["BlockSource", "LoadJob", "SaveJob", "ThawConnectorMetadata"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockSource:
    """Where one snapshot block's bytes live: a file of the store, by snapshot id."""

    snapshot_id: str
    offset: int  # absolute file offset of the block's first byte
    nbytes: int
    checksum: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadJob:
    """Copy snapshot blocks into the engine's KV cache before this step's forward."""

    req_id: str
    snapshot_id: str  # the chain's leaf, for logs
    block_ids: tuple[int, ...]
    sources: tuple[BlockSource, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveJob:
    """Write a request's prompt blocks to ``<store>/<snapshot_id>.thaw`` after this step's forward.

    ``block_ids`` are the engine blocks of snapshot blocks ``first_block..``; ``token_ids`` is
    the whole prefix (parent part included). The parent's id and last chain key come from
    the parent's validated file, never from the request.
    """

    req_id: str
    snapshot_id: str  # the id the caller expects; the worker recomputes and compares
    block_ids: tuple[int, ...]
    first_block: int
    token_ids: tuple[int, ...]
    parent_id: str | None
    parent_last_key: str


@dataclass
class ThawConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
