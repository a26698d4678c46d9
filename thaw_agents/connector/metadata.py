"""Plain data that crosses between the connector's halves each step.

Scheduler to worker (:class:`ThawConnectorMetadata`): only ids, offsets and checksums, never
tensors, handles or paths (the worker turns ids into files of its own store). Worker to
scheduler (:class:`ThawWorkerMetadata`): the results of the saves written since the last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from .._compat import KVConnectorWorkerMetadata

__all__ = ["BlockSource", "LoadJob", "SaveJob", "ThawConnectorMetadata", "ThawWorkerMetadata"]


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
    sources: tuple[tuple[BlockSource, ...], ...]  # per tensor-parallel rank, one per block


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
    # The engine-core process (the scheduler half's): every tensor-parallel rank names the
    # shared file it writes after it, whatever process tree the executor built.
    engine_pid: int = 0


@dataclass
class ThawConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)
    # Requests whose saves may still read blocks that this step allocates to another request:
    # the worker finishes those saves before the forward (handle_preemptions).
    flush: list[str] = field(default_factory=list)
    # The scheduler half lost the engine's model fingerprint (its cache was reset: the weights
    # may have been swapped) and asks the worker for it (``ThawWorkerMetadata.model_fingerprint``).
    want_fingerprint: bool = False


@dataclass
class ThawWorkerMetadata(KVConnectorWorkerMetadata):
    """Save results since the worker's last step: ``(request id, result)``, where a result is
    ``{"snapshot_id", "rank", "status": "written", "tokens", "nbytes", "ms"}`` or
    ``{"snapshot_id", "rank", "status": "failed", "error": {"type", "message", ...}}``. vLLM
    aggregates every tensor-parallel rank's into one; the scheduler half waits for all ranks."""

    results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    model_fingerprint: str | None = None  # the worker's, when the scheduler asked for it

    def aggregate(self, other: KVConnectorWorkerMetadata) -> ThawWorkerMetadata:
        assert isinstance(other, ThawWorkerMetadata)
        return ThawWorkerMetadata(
            results=[*self.results, *other.results],
            model_fingerprint=self.model_fingerprint or other.model_fingerprint,
        )
