"""``fork_completions``: compute a trunk once, run every branch from it, say where and why.

A round: (1) tokenize, find the trunk (the longest common token prefix of the prompts, or
``prefix=``); (2) decide where it runs (``placement=``, see :mod:`._placement`: by default the
parent when it has room, else the pool); (3) in the parent, warm the trunk in its prefix cache
and run the branches there as one batch; in the pool, check the parent against the workers' KV
spec, fork the trunk into a snapshot, ship it, and give each worker its share of the branches
(round-robin over ready workers, so a round's batches are the same whether it runs alone or
beside other rounds), retrying once, elsewhere, the branches of a worker that died or hung;
(4) return one :class:`BranchResult` per branch in input order, saying where it ran and why,
or raise the first failure (with every failure and the partial results attached).

Example:
    >>> prompts = [trunk + " Security review:", trunk + " Performance review:"]   # doctest: +SKIP
    >>> results = fork_completions(llm, prompts, SamplingParams(max_tokens=64), pool)  # doctest: +SKIP
    >>> [(r.worker, r.reason) for r in results]                                 # doctest: +SKIP
    [('parent', 'auto: parent has room (256 free slots >= 2 sequences, ...'), ...]
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from .._fork import ForkHandle, fork
from .._kvspec import KVSpec
from .._manifest import derive_snapshot
from .._store import snapshot_path, store_dir
from ..front import Front, Request, front_for
from ._dispatch import Outcome, dispatch
from ._placement import PlacementChoice, check_spec, decide
from ._pool import ForkPool
from ._protocol import branch_reply, encode_sampling
from ._results import BranchResult, BranchTimings, Completion
from ._transport import Shipment, ship

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = ["afork_completions", "fork_completions"]

logger = logging.getLogger(__name__)
Prompt = str | Sequence[int]
_STORE_LOCK = threading.Lock()
_STORE_REFS: Counter[Path] = Counter()
_STORE_OWNED: set[Path] = set()


@dataclass(slots=True)
class _Plan:
    trunk: list[int]
    prompts: list[list[int]]
    handle: ForkHandle | None  # given by the caller as prefix=


def fork_completions(
    llm: Any,
    prompts: Sequence[Prompt] | None = None,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    pool: ForkPool | None = None,
    *,
    prefix: Any = None,
    suffixes: Sequence[Prompt] | None = None,
    placement: PlacementChoice = "auto",
    timeout_s: float | None = None,
) -> list[BranchResult]:
    """Run branches that share a trunk, computing the trunk once; results in input order.

    Args:
        llm: the parent engine: a ``vllm.LLM`` built with :func:`thaw_agents.engine_kwargs`, or
            a ChatThaw (whose engine then runs the branches when there is no pool).
        prompts: full prompts (strings or token ids) that share a trunk: their longest
            common token prefix.
        sampling_params: one for all branches or one per branch; ``n > 1`` gives each branch
            ``n`` completions. None: the model's defaults.
        pool: a started :class:`ForkPool`; None runs the branches in the parent engine.
        prefix: instead of ``prompts``: the trunk (string, token ids, chat messages, or a
            :class:`ForkHandle` already taken), with ``suffixes`` (strings or token ids).
        suffixes: each branch's text after the trunk.
        placement: ``"auto"``: in the parent when it has free batch slots and KV blocks for
            the whole round, else in the pool; ``"parent"``; ``"pool"`` (its workers, whatever
            the parent has free). Each result's ``placement`` and ``reason`` say what was chosen
            and why (``"worker"`` for the pool).
        timeout_s: a limit for the whole round (each step already has the pool's timeouts).

    Raises:
        ConfigError: a bad ``placement``, or ``"pool"`` without a pool.
        SnapshotMismatchError: the parent (or ``prefix`` handle) differs from the pool's workers
            in model, dtype, block size or KV layout; raised before any branch runs.
        PoolError: a branch failed, also after its retry; ``.branch``, ``.worker`` and
            ``.stage`` say which and where, ``.failures`` lists all, ``.results`` the rest.

    Example:
        >>> results = fork_completions(llm, prefix=diff, suffixes=["Security:", "Style:"],  # doctest: +SKIP
        ...                            sampling_params=SamplingParams(max_tokens=64), pool=pool)
        >>> results[1].text, results[1].reason                                          # doctest: +SKIP
    """
    round_start = time.perf_counter()
    front = front_for(llm)
    with front.lock():  # a vllm.LLM's tokenizer and engine are not for concurrent use
        plan = _plan(front, prompts, prefix, suffixes)
    params = _params(front, sampling_params, len(plan.prompts))
    decision = decide(front, plan.trunk, plan.prompts, params, pool, placement)
    logger.debug("round of %d branches: %s (%s)", len(plan.prompts), decision.target, decision.reason)
    if decision.target == "parent":
        return _in_parent(front, plan, params, round_start, decision.reason)
    assert pool is not None
    return _in_pool(front, plan, params, pool, round_start, timeout_s, decision.reason)


async def afork_completions(*args: Any, **kwargs: Any) -> list[BranchResult]:
    """:func:`fork_completions` for async callers (runs in a thread; rounds may overlap)."""
    return await asyncio.to_thread(fork_completions, *args, **kwargs)


# -- planning -------------------------------------------------------------------------------
def _plan(front: Front, prompts: Any, prefix: Any, suffixes: Any) -> _Plan:
    if prompts is not None:
        if prefix is not None or suffixes is not None:
            raise ConfigError("pass either prompts, or prefix= and suffixes=, not both")
        if isinstance(prompts, str) or not prompts:
            raise ConfigError("prompts must be a non-empty list of strings or token id lists")
        token_lists = [_tokens(front, p) for p in prompts]
        trunk = _common_prefix(token_lists)
        return _Plan(trunk=trunk, prompts=token_lists, handle=None)
    if prefix is None or suffixes is None or isinstance(suffixes, str) or not suffixes:
        raise ConfigError("pass prompts, or prefix= with a non-empty list of suffixes=")
    handle = prefix if isinstance(prefix, ForkHandle) else None
    trunk = list(handle.token_ids) if handle else front.prefix_token_ids(prefix)
    return _Plan(trunk=trunk, prompts=[trunk + _suffix_tokens(front, s) for s in suffixes], handle=handle)


def _tokens(front: Front, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return front.prefix_token_ids(prompt)  # as vLLM tokenizes a text prompt
    if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise ConfigError("each prompt must be a string or a list of token ids")


def _suffix_tokens(front: Front, suffix: Any) -> list[int]:
    if isinstance(suffix, str):
        return front.encode(suffix, add_special_tokens=False)
    if isinstance(suffix, Sequence) and all(isinstance(t, int) for t in suffix):
        return list(suffix)
    raise ConfigError("each suffix must be a string or a list of token ids")


def _common_prefix(token_lists: list[list[int]]) -> list[int]:
    first = token_lists[0]
    length = len(first)
    for other in token_lists[1:]:
        length = min(length, len(other))
        for i in range(length):
            if first[i] != other[i]:
                length = i
                break
    return first[:length]


def _params(front: Front, sampling_params: Any, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        sampling_params = front.default_sampling_params()
    if isinstance(sampling_params, Sequence):
        if len(sampling_params) != count:
            raise ConfigError(f"{len(sampling_params)} sampling params for {count} branches")
        return list(sampling_params)
    return [sampling_params] * count


# -- the parent engine --------------------------------------------------------------------------
def _in_parent(
    front: Front, plan: _Plan, params: list[SamplingParams], round_start: float, why: str
) -> list[BranchResult]:
    from vllm import SamplingParams

    caching, block_size = front.prefix_caching()
    with front.lock():
        if plan.handle is not None:
            plan.handle.hydrate(front)
            reason = f"{why}; trunk loaded from the given snapshot"
        elif not caching:
            reason = f"{why}; prefix caching is off: every branch recomputes the trunk"
        elif len(plan.trunk) < block_size:
            reason = f"{why}; the trunk is shorter than one {block_size}-token block"
        else:
            # One pass over the trunk fills the prefix cache; branches in the same batch would
            # otherwise each compute it (blocks are shared only once computed).
            warm = Request(token_ids=plan.trunk, params=SamplingParams(max_tokens=1, temperature=0.0))
            front.generate([warm], stream=False)
            reason = f"{why}; the parent's prefix cache holds the trunk (no copy)"
        trunk_s = time.perf_counter() - round_start
        requests = [Request(token_ids=p, params=sp) for p, sp in zip(plan.prompts, params, strict=True)]
        replies = [branch_reply(i, r) for i, r in enumerate(front.generate(requests))]
    results = []
    for reply in replies:
        timings = BranchTimings(
            trunk_s=trunk_s,
            ttft_s=reply["ttft_s"],
            generate_s=reply["generate_s"],
            first_token_s=trunk_s + reply["ttft_s"],
            total_s=trunk_s + reply["generate_s"],
        )
        results.append(
            _result(
                reply,
                worker="parent",
                placement="parent",
                reason=reason,
                transport="prefix-cache",
                attempts=1,
                snapshot_id=None,
                timings=timings,
            )
        )
        logger.debug("branch %d: parent engine (%s)", reply["index"], reason)
    return results


# -- the pool --------------------------------------------------------------------------------------
def _in_pool(
    front: Front,
    plan: _Plan,
    params: list[SamplingParams],
    pool: ForkPool,
    round_start: float,
    timeout_s: float | None,
    why: str,
) -> list[BranchResult]:
    spec = pool.spec  # raises if the pool is not started
    encoded = [encode_sampling(p) for p in params]
    with front.lock():
        if plan.handle is None:
            parent_spec = front.kv_spec()
            check_spec(parent_spec, spec, "the parent engine")  # before computing anything
            handle, owned = _fork_trunk(front, plan.trunk, parent_spec)
        else:
            handle, owned = plan.handle, None
    trunk_s = time.perf_counter() - round_start
    shipment: Shipment | None = None
    try:
        if handle is not None:
            check_spec(handle.spec, spec, f"the trunk snapshot {handle.path}")  # its manifest vs the workers
            shipment = _ship(pool, handle)
        ship_s = time.perf_counter() - round_start - trunk_s
        jobs = [
            {"index": i, "prompt_token_ids": p, "sampling": s}
            for i, (p, s) in enumerate(zip(plan.prompts, encoded, strict=True))
        ]
        deadline = round_start + timeout_s if timeout_s is not None else None
        outcome = dispatch(pool, jobs, shipment.ref if shipment else None, deadline)
    finally:
        if shipment is not None:
            shipment.cleanup()
        if owned is not None:
            _release(owned)
    return _collect(plan, outcome, handle, shipment, trunk_s, ship_s, round_start, pool, why)


def _fork_trunk(front: Front, trunk: list[int], spec: KVSpec) -> tuple[ForkHandle | None, Path | None]:
    """Snapshot the trunk; the file is removed after the round if this round created it."""
    bs = spec.block_size
    if len(trunk) < bs:
        return None, None  # nothing to ship: the workers compute the short trunk themselves
    path = snapshot_path(store_dir(), derive_snapshot(spec, trunk).snapshot_id)
    with _STORE_LOCK:
        if not path.exists() and not _STORE_REFS[path]:
            _STORE_OWNED.add(path)
        _STORE_REFS[path] += 1
    try:
        handle = fork(front, trunk)
    except BaseException:
        _release(path)
        raise
    return handle, path


def _release(path: Path) -> None:
    with _STORE_LOCK:
        _STORE_REFS[path] -= 1
        if _STORE_REFS[path] > 0:
            return
        del _STORE_REFS[path]
        if path in _STORE_OWNED:
            _STORE_OWNED.discard(path)
            path.unlink(missing_ok=True)


def _ship(pool: ForkPool, handle: ForkHandle) -> Shipment:
    if pool.transport == "ray":
        from ._ray import ship_through_object_store

        return ship_through_object_store(handle)
    return ship(handle, pool.transport, pool.run_dir())


def _collect(
    plan: _Plan,
    out: Outcome,
    handle: ForkHandle | None,
    shipment: Shipment | None,
    trunk_s: float,
    ship_s: float,
    round_start: float,
    pool: ForkPool,
    why: str,
) -> list[BranchResult]:
    transport = shipment.transport if shipment else "none"
    results: list[BranchResult | None] = []
    for index in range(len(plan.prompts)):
        if index in out.failures:
            results.append(None)
            continue
        task_reply, reply = out.replies[index]
        worker = task_reply["worker"]
        hydrate = task_reply["hydrate"] or {}
        batch_s = task_reply["generate"]["generate_s"]
        reply_s = task_reply["replied_at"] - round_start
        reason = f"{why}; " + _reason(pool, out, index, worker, transport, handle)
        timings = BranchTimings(
            trunk_s=trunk_s,
            ship_s=ship_s,
            queue_s=task_reply["queue_s"],
            hydrate_s=hydrate.get("hydrate_s", 0.0),
            ttft_s=reply["ttft_s"],
            generate_s=reply["generate_s"],
            first_token_s=max(0.0, reply_s - (batch_s - reply["ttft_s"])),
            total_s=reply_s,
        )
        results.append(
            _result(
                reply,
                worker=worker,
                placement="worker",
                reason=reason,
                transport=transport,
                attempts=out.attempts[index],
                snapshot_id=handle.id if handle else None,
                snapshot_nbytes=int(hydrate.get("nbytes", 0)),
                timings=timings,
            )
        )
        logger.debug("branch %d: %s (%s)", index, worker, reason)
    if out.failures:
        ordered = [out.failures[i] for i in sorted(out.failures)]
        first = ordered[0]
        first.failures = tuple(ordered)
        first.results = results
        raise first
    return results  # type: ignore[return-value]


def _reason(pool: ForkPool, out: Outcome, index: int, worker: str, transport: str, handle: Any) -> str:
    trunk = (
        f"trunk snapshot via {transport}"
        if handle is not None
        else "trunk shorter than one block: recomputed"
    )
    text = (
        f"pool of {pool.size} {pool.backend} workers: round-robin placed it on {out.planned[index]}; {trunk}"
    )
    if index in out.history:
        text += f"; moved to {worker} after " + "; then ".join(out.history[index])
    return text


def _result(reply: dict[str, Any], **fields: Any) -> BranchResult:
    completions = tuple(
        Completion(
            index=c["index"],
            text=c["text"],
            token_ids=tuple(c["token_ids"]),
            finish_reason=c["finish_reason"],
            stop_reason=c.get("stop_reason"),
        )
        for c in reply["completions"]
    )
    return BranchResult(
        index=reply["index"],
        completions=completions,
        num_prompt_tokens=reply["num_prompt_tokens"],
        num_cached_tokens=reply["num_cached_tokens"],
        **fields,
    )
