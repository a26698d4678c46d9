"""Hand a round's branches to the pool's workers and gather them back, retrying once.

Placement is round-robin over the ready workers by branch index, so a round's batches are the
same whether it runs alone or beside other rounds (greedy output on CPU bf16 depends on the
batch). A task whose worker died or hung (:class:`Lost`) is retried once on another worker; a
task handed back unrun (:class:`NotRun`, its worker was being replaced) moves without spending
its attempt. Engine errors (a prompt too long, a bad snapshot) are not retried.

Example:
    >>> out = dispatch(pool, jobs, shipment.ref, deadline=None)     # doctest: +SKIP
    >>> out.replies[0][1]["completions"][0]["text"], out.attempts[0]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from .._errors import PoolError, PoolTimeoutError
from ._pool import ForkPool
from ._slots import Lost, NotRun, Task

__all__ = ["Outcome", "dispatch"]

logger = logging.getLogger(__name__)
_MAX_HANDBACKS = 4  # unrun hand-backs per task before the round gives up on it


@dataclass(slots=True)
class Outcome:
    replies: dict[int, tuple[dict[str, Any], dict[str, Any]]]  # branch -> (task reply, branch reply)
    attempts: dict[int, int]
    history: dict[int, list[str]]
    failures: dict[int, PoolError]
    planned: dict[int, str]


def dispatch(
    pool: ForkPool, jobs: list[dict[str, Any]], snapshot: dict[str, Any] | None, deadline: float | None
) -> Outcome:
    ready = pool.ready_slots() or pool.usable_slots()
    if not ready:
        raise PoolError("no worker is ready or booting: the pool has lost every worker", stage="dispatch")
    groups: dict[int, list[dict[str, Any]]] = {}
    for job in jobs:  # deterministic: the same round gets the same batches, alone or not
        groups.setdefault(ready[job["index"] % len(ready)], []).append(job)
    out = Outcome(replies={}, attempts={}, history={}, failures={}, planned={})
    live: dict[futures.Future[dict[str, Any]], tuple[int, list[dict[str, Any]], int, int]] = {}
    for slot, group in groups.items():
        for job in group:
            out.planned[job["index"]] = pool.slot_name(slot)
            out.attempts[job["index"]] = 1
        live[pool.submit(slot, Task(branches=group, snapshot=snapshot))] = (slot, group, 1, 0)
    while live:
        remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
        done, _ = futures.wait(live, timeout=remaining, return_when=futures.FIRST_COMPLETED)
        if not done:
            for future, (slot, group, _, _) in live.items():
                future.cancel()
                for job in group:
                    out.failures[job["index"]] = PoolTimeoutError(
                        "the round ran past its timeout_s",
                        worker=pool.slot_name(slot),
                        branch=job["index"],
                        stage="round",
                        timeout_s=None,
                    )
            break
        for future in done:
            slot, group, attempt, handbacks = live.pop(future)
            error = future.exception()
            if error is None:
                task_reply = future.result()
                by_index = {b["index"]: b for b in task_reply["generate"]["branches"]}
                for job in group:
                    out.replies[job["index"]] = (task_reply, by_index[job["index"]])
                continue
            retry = isinstance(error, NotRun) and handbacks < _MAX_HANDBACKS
            retry = retry or (isinstance(error, Lost) and attempt == 1)
            target = _other_slot(pool, slot) if retry else None
            if target is None:
                cause = error.error if isinstance(error, Lost) else error
                for job in group:
                    out.failures[job["index"]] = _for_branch(cause, job["index"], pool.slot_name(slot))
                continue
            next_attempt = attempt + (1 if isinstance(error, Lost) else 0)
            for job in group:
                out.attempts[job["index"]] = next_attempt
                out.history.setdefault(job["index"], []).append(f"{pool.slot_name(slot)}: {error}")
            logger.warning(
                "branches %s: %s; retrying on %s", [j["index"] for j in group], error, pool.slot_name(target)
            )
            task = Task(branches=group, snapshot=snapshot)
            live[pool.submit(target, task)] = (
                target,
                group,
                next_attempt,
                handbacks + isinstance(error, NotRun),
            )
    return out


def _other_slot(pool: ForkPool, failed: int) -> int | None:
    """A ready worker other than ``failed`` (least queued first); else any that will be ready."""
    others = [i for i in pool.ready_slots() if i != failed]
    if others:
        return min(others, key=pool.queued)
    usable = pool.usable_slots()
    return min(usable, key=pool.queued) if usable else None


def _for_branch(error: BaseException, branch: int, worker: str) -> PoolError:
    """A copy of ``error`` (same class and fields) that names ``branch``."""
    if not isinstance(error, PoolError):
        return PoolError(f"{type(error).__name__}: {error}", worker=worker, branch=branch, stage="dispatch")
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    PoolError.__init__(
        copy,
        error.message,
        worker=error.worker or worker,
        branch=branch,
        stage=error.stage,
        remote_type=error.remote_type,
    )
    return copy
