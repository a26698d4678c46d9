"""Plain data that crosses from the scheduler half to the worker half each step.

Only ids, paths, offsets and checksums: never tensors or handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

__all__ = ["BlockSource", "LoadJob", "SaveJob", "ThawConnectorMetadata"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockSource:
    """Where one snapshot block's bytes live."""

    path: str
    offset: int  # absolute file offset of the block's first byte
    nbytes: int
    checksum: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadJob:
    """Copy snapshot blocks into the engine's KV cache before this step's forward."""

    req_id: str
    block_ids: tuple[int, ...]
    sources: tuple[BlockSource, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveJob:
    """Write a request's prompt blocks to a snapshot file after this step's forward.

    ``block_ids`` are the engine blocks of snapshot blocks ``first_block..``;
    ``token_ids`` is the whole prefix (parent part included) and ``meta`` the
    request's thaw parameters (destination, parent).
    """

    req_id: str
    block_ids: tuple[int, ...]
    first_block: int
    token_ids: tuple[int, ...]
    meta: dict[str, Any]


@dataclass
class ThawConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
