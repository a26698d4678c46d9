"""The scheduler half of the thaw connector.

Runs in vLLM's scheduler (the engine-core process). Per request it resolves the snapshot id
the request names in its own store (never a path), checks the chain against this engine
(model fingerprint, block size, platform; the worker half checks the full spec again before
reading a byte), decides how many prompt tokens the chain supplies, and hands the worker half
plain jobs each step. It never raises into the scheduler: a request whose snapshot cannot be
used prefills instead, with a warning, and says why in its output's ``kv_transfer_params``.

In a tensor-parallel engine every rank's worker half loads and saves its own share of each
block: a load job carries each rank's file offsets, and a save is done once every rank has
reported (written if all wrote their share; the last one renamed the file into place).

A hydrated snapshot (``{"op": "hydrate"}``, see :mod:`.standing`) is kept until a request that
starts with its tokens loads it; the request that brought it is never scheduled.

Served-token accounting is honest: when the worker reports blocks that failed (checksum,
spec, I/O), vLLM recomputes them and this half lowers the request's cached-token count by
the tokens recomputed, so ``num_cached_tokens`` only counts tokens actually loaded.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._compat import uncount_external_tokens
from .._errors import SnapshotMismatchError, ThawError
from .._kv_ranks import combine_rank_results
from .._kvspec import KVSpec
from .._manifest import KVManifest
from .config import ThawConnectorConfig
from .engine_spec import engine_fingerprint, platform_name
from .manifests import ManifestCache
from .metadata import BlockSource, LoadJob, SaveJob, ThawConnectorMetadata, ThawWorkerMetadata
from .params import PARAMS_KEY, HydrateParams, LoadParams, ParamsError, SaveParams, parse_params
from .standing import StandingSnapshots

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["ThawScheduler"]

logger = logging.getLogger(__name__)

# A hydrate request waits unscheduled this long for its front's abort; one a front forgot then
# runs as a plain one-token request, so nothing waits forever.
_PARK_S = 60.0


@dataclass
class _Load:
    request: Request
    snapshot_id: str
    sources: list[list[BlockSource]] = field(default_factory=list)  # per rank: one per block, chain order
    matched_blocks: int = 0
    local_tokens: int = 0
    start_block: int = 0
    num_blocks: int = 0
    job_block_ids: tuple[int, ...] = ()
    emitted: bool = False  # this allocation's load job went to the worker
    loaded_tokens: int = 0  # by the first load (what num_cached_tokens counts)
    reloaded_tokens: int = 0  # by loads after preemptions
    recomputed_tokens: int = 0
    loads: int = 0
    standing: bool = False  # planned from a hydrated snapshot, not named by the request

    @property
    def snapshot_blocks(self) -> int:
        """Blocks in the whole chain (rank 0's regions: every rank has one per block)."""
        return len(self.sources[0])


@dataclass
class _PendingSave:
    snapshot_id: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    first_block: int
    parent_id: str | None
    parent_last_key: str
    block_ids: list[int] = field(default_factory=list)
    emitted: bool = False  # the save job went to the worker, which now holds the blocks
    result: dict[str, Any] | None = None  # the worker's report, once written or failed


class ThawScheduler:
    """Plans snapshot loads and saves; see the module docstring."""

    def __init__(self, vllm_config: VllmConfig, config: ThawConnectorConfig) -> None:
        self._vllm_config = vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self.tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        self.store = config.store
        self._manifests = ManifestCache(self.store)
        self._fingerprint: str | None = None
        # After reset_cache (a weights swap): the fingerprint is the worker's, asked for in the
        # next step's metadata; until it comes, every snapshot is refused (fail closed).
        self._fingerprint_unknown = False
        self._loads: dict[str, _Load] = {}
        self._saves: dict[str, _PendingSave] = {}
        self._refused: dict[str, tuple[str, str | None, str]] = {}  # req -> (op, id, why)
        # Engine blocks that queued or running saves still read (block -> requests): vLLM may
        # free them (the request finished or was preempted); before it hands one to another
        # request, the worker waits for those saves (``ThawConnectorMetadata.flush``).
        self._unwritten: dict[str, tuple[int, ...]] = {}
        self._read_blocks: dict[int, set[str]] = {}
        self._rank_results: dict[str, dict[int, dict[str, Any]]] = {}  # req -> rank -> result
        self._standing = StandingSnapshots(self.block_size)
        self._parked: dict[str, float] = {}  # hydrate request -> when it arrived

    # -- checks ------------------------------------------------------------------------
    def _check_engine(self, spec: KVSpec, path: str) -> None:
        """What the scheduler can check itself; the worker checks the whole spec again."""
        if self._fingerprint_unknown:
            raise SnapshotMismatchError(
                "model_fingerprint",
                "unknown (the engine's weights were just swapped)",
                spec.model_fingerprint,
                path=path,
            )
        if self._fingerprint is None:
            self._fingerprint = engine_fingerprint(self._vllm_config)
        for name, engine_value, snapshot_value in (
            ("model_fingerprint", self._fingerprint, spec.model_fingerprint),
            ("tensor_parallel_size", self.tp_size, spec.tensor_parallel_size),
            ("block_size", self.block_size, spec.block_size),
            ("platform", platform_name(), spec.platform),
        ):
            if engine_value != snapshot_value:
                raise SnapshotMismatchError(name, engine_value, snapshot_value, path=path)

    def _refuse(self, request: Request, op: str, snapshot_id: str | None, exc: Exception) -> None:
        why = str(exc) if isinstance(exc, (ThawError, ParamsError)) else f"{type(exc).__name__}: {exc}"
        self._refused[request.request_id] = (op, snapshot_id, why)
        logger.warning(
            "thaw: request %s: %s %s refused, prefilling instead: %s",
            request.request_id,
            op,
            snapshot_id or "",
            why,
        )

    # -- loads -------------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Prompt tokens the request's snapshot (named, or hydrated earlier) supplies beyond
        ``num_computed_tokens``; None keeps a hydrate request unscheduled until its abort.

        vLLM asks when a request is scheduled from the waiting queue: new, or resumed after a
        preemption (which freed its blocks). The snapshot chain is read and checked on the
        first call only; later calls (a retry after a failed allocation, a resumption) reuse
        that plan and touch no file.
        """
        state = self._loads.get(request.request_id)
        if state is None:
            parked = self._parked.get(request.request_id)
            if parked is not None:
                return (None, False) if time.monotonic() - parked < _PARK_S else (0, False)
            if request.request_id in self._refused:
                return 0, False
            try:
                params = parse_params(request.kv_transfer_params)
            except ParamsError as exc:
                self._refuse(request, "load", None, exc)
                return 0, False
            if isinstance(params, LoadParams):
                try:
                    state = self._plan(request, params)
                except Exception as exc:  # never let a bad file take the scheduler down
                    self._refuse(request, "load", params.snapshot_id, exc)
                    return 0, False
            else:
                state = self._plan_standing(request, num_computed_tokens)
                if state is None:
                    return 0, False
            self._loads[request.request_id] = state
        # The scheduler presents a block-aligned local hit; the load starts right after it.
        state.local_tokens = num_computed_tokens
        return max(0, self._servable_tokens(state) - num_computed_tokens), False

    def _servable_tokens(self, state: _Load) -> int:
        """Prompt tokens the planned chain can supply: its matching blocks, short of the last
        prompt token (vLLM must compute at least that one itself)."""
        limit_blocks = (state.request.num_prompt_tokens - 1) // self.block_size
        return min(state.matched_blocks, limit_blocks) * self.block_size

    def _plan_standing(self, request: Request, num_computed_tokens: int) -> _Load | None:
        """A load from the hydrated snapshot that supplies the most of this prompt beyond what
        vLLM's prefix cache holds; None when none does."""
        best: _Load | None = None
        for snapshot_id in self._standing.candidates(request.prompt_token_ids or ()):
            try:
                state = self._plan(request, LoadParams(snapshot_id=snapshot_id))
            except Exception as exc:  # gone from the store, or no longer this engine's
                self._standing.discard(snapshot_id)
                logger.info("thaw: hydrated snapshot %s is no longer served: %s", snapshot_id, exc)
                continue
            if best is None or state.matched_blocks > best.matched_blocks:
                best = state
                best.standing = True
        if best is None:
            return None
        if num_computed_tokens >= best.snapshot_blocks * self.block_size:
            self._standing.discard(best.snapshot_id)  # vLLM's prefix cache holds all of it already
            return None
        return best if self._servable_tokens(best) > num_computed_tokens else None

    def _hydrate(self, request: Request, params: HydrateParams) -> None:
        """Keep the snapshot for later requests; its own request waits until the front aborts it."""
        self._parked[request.request_id] = time.monotonic()
        try:
            chain = self._checked_chain(params.snapshot_id)
        except Exception as exc:
            self._refuse(request, "hydrate", params.snapshot_id, exc)
            return
        self._standing.add(params.snapshot_id, chain[0].token_ids)

    def _checked_chain(self, snapshot_id: str) -> list[KVManifest]:
        """The snapshot's chain in the store, every file checked against this engine."""
        chain = self._manifests.chain(snapshot_id)
        for manifest in chain:  # each file's regions are laid out for its own rank count
            self._check_engine(manifest.spec, manifest.path)
        return chain

    def _plan(self, request: Request, params: LoadParams) -> _Load:
        chain = self._checked_chain(params.snapshot_id)
        prompt = list(request.prompt_token_ids or ())
        state = _Load(request=request, snapshot_id=params.snapshot_id)
        state.sources = [[] for _ in range(self.tp_size)]
        bs = self.block_size
        still_matching = True
        for manifest in chain:
            for index in range(manifest.num_blocks):
                for rank, sources in enumerate(state.sources):
                    offset, nbytes, checksum = manifest.block_source(index, rank)
                    sources.append(
                        BlockSource(
                            snapshot_id=manifest.snapshot_id, offset=offset, nbytes=nbytes, checksum=checksum
                        )
                    )
                if still_matching:
                    start = (manifest.first_block + index) * bs
                    block_tokens = manifest.token_ids[index * bs : (index + 1) * bs]
                    if tuple(prompt[start : start + bs]) == block_tokens:
                        state.matched_blocks += 1
                    else:
                        still_matching = False
        return state

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._loads.get(request.request_id)
        if state is None:
            return
        # A new allocation (first schedule, or a resumption after a preemption): the load job,
        # if any, goes out with this step's metadata, into these blocks.
        state.start_block = state.local_tokens // self.block_size
        state.num_blocks = max(0, num_external_tokens) // self.block_size
        state.emitted = False
        if state.standing and state.start_block + state.num_blocks >= state.snapshot_blocks:
            # The whole snapshot is now in vLLM's prefix cache: served from there from now on.
            self._standing.discard(state.snapshot_id)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Take the worker's save results; uncount blocks that failed to load (vLLM
        recomputes them) so ``num_cached_tokens`` only counts tokens actually loaded."""
        worker_meta = connector_output.kv_connector_worker_meta
        if isinstance(worker_meta, ThawWorkerMetadata):
            if worker_meta.model_fingerprint is not None:
                self._fingerprint, self._fingerprint_unknown = worker_meta.model_fingerprint, False
            for req_id, result in worker_meta.results:
                self._take_result(req_id, result)
        invalid = connector_output.invalid_block_ids
        if not invalid:
            return
        for state in self._loads.values():
            bad = [i for i, block in enumerate(state.job_block_ids) if block in invalid]
            if not bad:
                continue
            # vLLM truncates the request's computed tokens at its first failed block.
            recomputed = (len(state.job_block_ids) - bad[0]) * self.block_size
            state.recomputed_tokens += recomputed
            state.job_block_ids = ()
            if state.loads == 1:  # a reload after a preemption is not in num_cached_tokens
                state.loaded_tokens -= recomputed
                uncount_external_tokens(state.request, recomputed)
            else:
                state.reloaded_tokens -= recomputed
            logger.warning(
                "thaw: request %s: %d tokens of snapshot %s failed to load and were recomputed",
                state.request.request_id,
                recomputed,
                state.snapshot_id,
            )

    def _take_result(self, req_id: str, rank_result: dict[str, Any]) -> None:
        """One rank's result; the save's, once every rank has sent its own."""
        by_rank = self._rank_results.setdefault(req_id, {})
        by_rank[int(rank_result.get("rank", 0))] = rank_result
        if len(by_rank) < self.tp_size:
            return
        del self._rank_results[req_id]
        result = combine_rank_results(list(by_rank.values()))
        assert result is not None
        for block in self._unwritten.pop(req_id, ()):
            readers = self._read_blocks.get(block)
            if readers is not None:
                readers.discard(req_id)
                if not readers:
                    del self._read_blocks[block]
        save = self._saves.get(req_id)
        if save is not None and result.get("snapshot_id") == save.snapshot_id:
            save.result = result
        if result.get("status") == "failed":
            error = result.get("error") or {}
            logger.warning(
                "thaw: request %s: snapshot %s was not written: %s: %s",
                req_id,
                result.get("snapshot_id"),
                error.get("type"),
                error.get("message"),
            )

    # -- saves -------------------------------------------------------------------------
    def on_new_request(self, request: Request) -> None:
        try:
            params = parse_params(request.kv_transfer_params)
        except ParamsError as exc:
            self._refuse(request, "request", None, exc)
            return
        if isinstance(params, HydrateParams):
            self._hydrate(request, params)
            return
        if not isinstance(params, SaveParams):
            return
        try:
            self._saves[request.request_id] = self._plan_save(request, params)
        except Exception as exc:
            self._refuse(request, "save", params.snapshot_id, exc)

    def _plan_save(self, request: Request, params: SaveParams) -> _PendingSave:
        prompt = tuple(request.prompt_token_ids or ())
        if params.num_tokens > len(prompt):
            raise ParamsError(f"num_tokens is {params.num_tokens} but the prompt has {len(prompt)} tokens")
        first_block, last_key = 0, ""
        if params.parent is not None:
            chain = self._manifests.chain(params.parent)
            self._check_engine(chain[-1].spec, chain[-1].path)
            parent_tokens = [t for manifest in chain for t in manifest.token_ids]
            if tuple(parent_tokens) != prompt[: len(parent_tokens)] or params.num_tokens < len(parent_tokens):
                raise ParamsError(f"the prompt does not start with the tokens of its parent {params.parent}")
            first_block = chain[-1].end_block
            last_key = _last_key(chain)
        return _PendingSave(
            snapshot_id=params.snapshot_id,
            token_ids=prompt[: params.num_tokens],
            num_prompt_tokens=request.num_prompt_tokens,
            first_block=first_block,
            parent_id=params.parent if first_block else None,
            parent_last_key=last_key,
        )

    # -- per step ----------------------------------------------------------------------
    def reset_cache(self) -> bool:
        """The engine's weights may have changed (vLLM's ``reset_prefix_cache(reset_connector=
        True)``, which ``swap_weights`` sends): learn the model fingerprint from the worker again."""
        self._fingerprint_unknown = True
        self._standing.clear()  # snapshots of the old weights
        return True

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ThawConnectorMetadata:
        meta = ThawConnectorMetadata(want_fingerprint=self._fingerprint_unknown)
        num_scheduled = scheduler_output.num_scheduled_tokens
        written: list[int] = []  # blocks this step's loads and forwards write
        for new_req in scheduler_output.scheduled_new_reqs:
            # New requests, and (with vLLM's V2 model runner) resumed ones.
            block_ids = list(new_req.block_ids[0]) if new_req.block_ids else []
            first = self._maybe_emit_load(meta, new_req.req_id, block_ids)
            written += block_ids[min(first, new_req.num_computed_tokens // self.block_size) :]
            save = self._saves.get(new_req.req_id)
            if save is not None and not save.emitted:
                save.block_ids = block_ids
                self._maybe_emit_save(
                    meta,
                    new_req.req_id,
                    save,
                    new_req.num_computed_tokens,
                    num_scheduled.get(new_req.req_id, 0),
                )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = list(cached.new_block_ids[i][0]) if cached.new_block_ids[i] else None
            resumed = req_id in cached.resumed_req_ids
            if resumed and new_ids is not None:
                # A preempted request back with a new allocation (all its blocks).
                first = self._maybe_emit_load(meta, req_id, new_ids)
                written += new_ids[min(first, cached.num_computed_tokens[i] // self.block_size) :]
            elif new_ids is not None:
                written += new_ids
            save = self._saves.get(req_id)
            if save is None or save.emitted:
                continue
            if new_ids is not None:
                if resumed:
                    save.block_ids = new_ids
                else:
                    save.block_ids.extend(new_ids)
            self._maybe_emit_save(
                meta, req_id, save, cached.num_computed_tokens[i], num_scheduled.get(req_id, 0)
            )
        if self._read_blocks:
            readers: set[str] = set()
            for block in written:
                readers |= self._read_blocks.get(block, set())
            meta.flush = sorted(readers)
        return meta

    def _maybe_emit_load(self, meta: ThawConnectorMetadata, req_id: str, block_ids: list[int]) -> int:
        """Emit the load of this allocation, if any; the index of its first block (the
        request's block count when there is none)."""
        state = self._loads.get(req_id)
        if state is None or state.emitted:
            return len(block_ids)
        state.emitted = True
        targets = tuple(block_ids[state.start_block : state.start_block + state.num_blocks])
        state.job_block_ids = targets
        if not targets:
            return len(block_ids)
        state.loads += 1
        if state.loads == 1:
            state.loaded_tokens = len(targets) * self.block_size
        else:
            state.reloaded_tokens += len(targets) * self.block_size
        meta.loads.append(
            LoadJob(
                req_id=req_id,
                snapshot_id=state.snapshot_id,
                block_ids=targets,
                sources=tuple(
                    tuple(sources[state.start_block : state.start_block + len(targets)])
                    for sources in state.sources
                ),
            )
        )
        return state.start_block

    def _maybe_emit_save(
        self,
        meta: ThawConnectorMetadata,
        req_id: str,
        save: _PendingSave,
        num_computed: int,
        num_scheduled: int,
    ) -> None:
        if num_computed + num_scheduled < save.num_prompt_tokens:
            return  # the prompt is still being prefilled in chunks
        save.emitted = True
        full_blocks = len(save.token_ids) // self.block_size
        blocks = tuple(save.block_ids[save.first_block : full_blocks])
        self._unwritten[req_id] = blocks
        for block in blocks:
            self._read_blocks.setdefault(block, set()).add(req_id)
        meta.saves.append(
            SaveJob(
                req_id=req_id,
                snapshot_id=save.snapshot_id,
                block_ids=blocks,
                first_block=save.first_block,
                token_ids=save.token_ids,
                parent_id=save.parent_id,
                parent_last_key=save.parent_last_key,
                engine_pid=os.getpid(),
            )
        )

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; its output's ``kv_transfer_params["thaw"]`` says what happened.

        Returns False: vLLM frees the blocks at once, even while a save still reads them (as
        vLLM's offloading connector does). Freed blocks keep their bytes until vLLM hands them
        to another request, and :meth:`build_connector_meta` makes the worker finish the save
        before that request's step writes them. Holding the blocks instead would keep them
        until the engine's next step, which an in-process ``vllm.LLM`` only takes at the next
        ``generate`` (and ``reset_prefix_cache`` would refuse to run meanwhile).
        """
        self._parked.pop(request.request_id, None)
        state = self._loads.pop(request.request_id, None)
        save = self._saves.pop(request.request_id, None)
        refused = self._refused.pop(request.request_id, None)
        report: dict[str, Any] | None = None
        if state is not None:
            report = {
                "op": "load",
                "snapshot_id": state.snapshot_id,
                "loaded_tokens": max(0, state.loaded_tokens),
                "recomputed_tokens": state.recomputed_tokens,
                "reloaded_tokens": max(0, state.reloaded_tokens),
                "preemptions": int(getattr(request, "num_preemptions", 0) or 0),
            }
        elif save is not None:
            report = {"op": "save", "snapshot_id": save.snapshot_id}
            if save.emitted:
                report.update(save.result or {"status": "pending"})
            else:
                report.update(
                    status="failed",
                    error="the request finished before its prompt was computed; nothing was written",
                )
        elif refused is not None:
            op, snapshot_id, why = refused
            report = {"op": op, "snapshot_id": snapshot_id, "error": why}
        return False, ({PARAMS_KEY: report} if report else None)


def _last_key(chain: list[KVManifest]) -> str:
    leaf = chain[-1]
    if leaf.keys:
        return leaf.keys[-1]
    return leaf.parent.last_key if leaf.parent else ""
