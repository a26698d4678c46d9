"""The scheduler half of the thaw connector.

Runs in vLLM's scheduler (the engine-core process). It decides, per request, how many
prompt tokens a snapshot chain can supply, records which engine blocks to fill or to save,
and hands the worker half plain jobs each step. It never raises into the scheduler: a
snapshot it cannot use is logged and the request falls back to prefill.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._manifest import KVManifest, read_kv_manifest
from .metadata import BlockSource, LoadJob, SaveJob, ThawConnectorMetadata
from .params import thaw_params

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["ThawScheduler"]

logger = logging.getLogger(__name__)


@dataclass
class _LoadPlan:
    sources: list[BlockSource]  # one per snapshot block, chain order
    matched_blocks: int


@dataclass
class _PendingLoad:
    start_block: int
    num_blocks: int
    sources: list[BlockSource]


@dataclass
class _PendingSave:
    meta: dict[str, Any]
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)
    done: bool = False


class ThawScheduler:
    """Plans snapshot loads and saves; see the module docstring."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.block_size = vllm_config.cache_config.block_size
        self._plans: dict[str, _LoadPlan | None] = {}
        self._pending_loads: dict[str, _PendingLoad] = {}
        self._local_tokens: dict[str, int] = {}
        self._saves: dict[str, _PendingSave] = {}
        self._manifest_cache: dict[tuple[str, int, int], KVManifest] = {}

    # -- loads -------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = thaw_params(request.kv_transfer_params)
        if params is None or params.get("op") != "load":
            return 0, False
        plan = self._plan(request, params)
        if plan is None:
            return 0, False
        # vLLM must compute at least the last prompt token itself.
        limit_blocks = (request.num_prompt_tokens - 1) // self.block_size
        matched_tokens = min(plan.matched_blocks, limit_blocks) * self.block_size
        # The scheduler presents a block-aligned local hit; the load starts right after it.
        self._local_tokens[request.request_id] = num_computed_tokens
        return max(0, matched_tokens - num_computed_tokens), False

    def _plan(self, request: Request, params: dict[str, Any]) -> _LoadPlan | None:
        if request.request_id in self._plans:
            return self._plans[request.request_id]
        plan: _LoadPlan | None = None
        try:
            plan = self._build_plan(list(request.prompt_token_ids or ()), params.get("files"))
        except Exception as exc:  # never let a bad file take the scheduler down
            logger.warning(
                "thaw: request %s: snapshot not used, prefilling instead: %s",
                request.request_id,
                exc,
            )
        self._plans[request.request_id] = plan
        return plan

    def _build_plan(self, prompt: list[int], files: Any) -> _LoadPlan | None:
        if not isinstance(files, list) or not files:
            raise ValueError("load parameters carry no files")
        sources: list[BlockSource] = []
        matched = 0
        still_matching = True
        previous: KVManifest | None = None
        for path in files:
            manifest = self._manifest(str(path))
            if manifest.spec.block_size != self.block_size:
                raise ValueError(f"{path}: block size {manifest.spec.block_size}, engine {self.block_size}")
            if previous is None and manifest.parent is not None:
                raise ValueError(f"{path}: the chain must start at a root snapshot")
            if previous is not None and (
                manifest.parent is None or manifest.parent.snapshot_id != previous.snapshot_id
            ):
                raise ValueError(f"{path} does not extend {previous.snapshot_id}")
            for index in range(manifest.num_blocks):
                offset, nbytes, checksum = manifest.block_source(index)
                sources.append(
                    BlockSource(path=manifest.path, offset=offset, nbytes=nbytes, checksum=checksum)
                )
                if still_matching:
                    lo = index * self.block_size
                    block_tokens = manifest.token_ids[lo : lo + self.block_size]
                    start = (manifest.first_block + index) * self.block_size
                    if tuple(prompt[start : start + self.block_size]) == block_tokens:
                        matched += 1
                    else:
                        still_matching = False
            previous = manifest
        return _LoadPlan(sources=sources, matched_blocks=matched)

    def _manifest(self, path: str) -> KVManifest:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        manifest = self._manifest_cache.get(key)
        if manifest is None:
            # The front validated it against this engine before sending the request;
            # re-reading the header here is cheap and protects against a swapped file.
            manifest = read_kv_manifest(path, check_keys=False)
            if len(self._manifest_cache) > 256:
                self._manifest_cache.clear()
            self._manifest_cache[key] = manifest
        return manifest

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens <= 0:
            return
        plan = self._plans.get(request.request_id)
        if plan is None:
            return
        start_block = self._local_tokens.get(request.request_id, 0) // self.block_size
        num_blocks = num_external_tokens // self.block_size
        self._pending_loads[request.request_id] = _PendingLoad(
            start_block=start_block,
            num_blocks=num_blocks,
            sources=plan.sources[start_block : start_block + num_blocks],
        )

    # -- saves -------------------------------------------------------------------------
    def on_new_request(self, request: Request) -> None:
        params = thaw_params(request.kv_transfer_params)
        if params is None or params.get("op") != "save":
            return
        self._saves[request.request_id] = _PendingSave(
            meta=dict(params),
            token_ids=tuple(request.prompt_token_ids or ()),
            num_prompt_tokens=request.num_prompt_tokens,
        )

    # -- per step ----------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ThawConnectorMetadata:
        meta = ThawConnectorMetadata()
        for new_req in scheduler_output.scheduled_new_reqs:
            block_ids = list(new_req.block_ids[0]) if new_req.block_ids else []
            pending = self._pending_loads.pop(new_req.req_id, None)
            if pending is not None and pending.num_blocks:
                targets = block_ids[pending.start_block : pending.start_block + pending.num_blocks]
                meta.loads.append(
                    LoadJob(
                        req_id=new_req.req_id,
                        block_ids=tuple(targets),
                        sources=tuple(pending.sources[: len(targets)]),
                    )
                )
            save = self._saves.get(new_req.req_id)
            if save is not None:
                save.block_ids = block_ids
                self._maybe_emit_save(
                    meta,
                    new_req.req_id,
                    save,
                    new_req.num_computed_tokens,
                    scheduler_output.num_scheduled_tokens.get(new_req.req_id, 0),
                )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            save = self._saves.get(req_id)
            if save is None or save.done:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    save.block_ids = list(new_ids[0])
                else:
                    save.block_ids.extend(new_ids[0])
            self._maybe_emit_save(
                meta,
                req_id,
                save,
                cached.num_computed_tokens[i],
                scheduler_output.num_scheduled_tokens.get(req_id, 0),
            )
        return meta

    def _maybe_emit_save(
        self,
        meta: ThawConnectorMetadata,
        req_id: str,
        save: _PendingSave,
        num_computed: int,
        num_scheduled: int,
    ) -> None:
        if save.done or num_computed + num_scheduled < save.num_prompt_tokens:
            return  # the prompt is still being prefilled in chunks
        save.done = True
        parent = save.meta.get("parent") or None
        first_block = int(parent["num_blocks"]) if parent else 0
        prefix_tokens = save.token_ids[: int(save.meta.get("num_tokens", len(save.token_ids)))]
        full_blocks = len(prefix_tokens) // self.block_size
        meta.saves.append(
            SaveJob(
                req_id=req_id,
                block_ids=tuple(save.block_ids[first_block:full_blocks]),
                first_block=first_block,
                token_ids=tuple(prefix_tokens),
                meta=save.meta,
            )
        )

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._plans.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._local_tokens.pop(request.request_id, None)
        self._saves.pop(request.request_id, None)
        return False, None
