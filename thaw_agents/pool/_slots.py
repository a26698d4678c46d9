"""One worker position of a pool: its current worker, its task queue, and the thread driving both.

The slot's thread boots the worker, then runs tasks one at a time (hydrate, then generate the
task's branches as one batch), each step under its own timeout. When the worker dies or stops
answering, the thread kills it, hands the queued tasks back unrun (:class:`NotRun`), fails the
task it held with :class:`Lost` (both retried elsewhere by the round), and boots a replacement.
Every task future is resolved: by a reply, an error, or the pool closing.

Example:
    >>> slot = WorkerSlot(0, "local-0", None, make_worker=make, boot_message=boot,  # doctest: +SKIP
    ...                   limits=limits)
    >>> slot.start()                                                             # doctest: +SKIP
    >>> slot.submit(Task(branches=branches, snapshot=None)).result()             # doctest: +SKIP
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import PoolError, PoolTimeoutError, WorkerDiedError
from .._kvspec import KVSpec
from ._results import WorkerInfo

__all__ = ["Limits", "Lost", "NotRun", "Task", "WorkerSlot", "remote_error"]

logger = logging.getLogger(__name__)
_GRACE_S = 10.0  # the worker enforces generate_timeout_s itself; the parent waits this much longer


class NotRun(Exception):
    """A task was handed back unrun (its worker was replaced): run it elsewhere, no attempt spent."""


class Lost(Exception):
    """A task's worker died or stopped answering mid-task (retryable once elsewhere)."""

    def __init__(self, error: PoolError) -> None:
        self.error = error
        super().__init__(str(error))


@dataclass(frozen=True, slots=True)
class Limits:
    boot_s: float
    hydrate_s: float
    generate_s: float


@dataclass(slots=True)
class Task:
    """One round's branches for one worker (plain data), and the future of the reply."""

    branches: list[dict[str, Any]]
    snapshot: dict[str, Any] | None
    future: Future[dict[str, Any]] = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.perf_counter)


class WorkerSlot:
    """A worker position: keeps its name across replacements (``generation`` counts them)."""

    def __init__(
        self,
        index: int,
        name: str,
        device: str | None,
        *,
        make_worker: Callable[[WorkerSlot], Any],
        boot_message: dict[str, Any],
        limits: Limits,
    ) -> None:
        self.index = index
        self.name = name
        self.device = device
        self.state = "booting"
        self.generation = 0
        self.tasks_done = 0
        self.boot_s: float | None = None
        self.error: PoolError | None = None
        self.worker: Any = None
        self.spec: KVSpec | None = None  # the pool's spec, once known: a replacement must match it
        self.booted = threading.Event()
        self.closing = False
        self._make_worker = make_worker
        self._boot_message = boot_message
        self._limits = limits
        self._queue: queue.Queue[Task | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drive, name=f"thaw-pool-{name}", daemon=True)

    # -- used by the pool and the rounds ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, task: Task) -> Future[dict[str, Any]]:
        task.submitted_at = time.perf_counter()
        self._queue.put(task)
        if self.closing:  # raced with stop(): nobody will run it
            self._fail_queued(lambda: PoolError("the pool was closed", worker=self.name))
        return task.future

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            name=self.name,
            state=self.state,
            pid=self.worker.pid if self.worker is not None else None,
            device=self.device,
            generation=self.generation,
            tasks_done=self.tasks_done,
            boot_s=self.boot_s,
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close the worker (gracefully, then by force) and fail whatever is still queued."""
        self.closing = True
        self._queue.put(None)
        if self.worker is not None:
            closer = threading.Thread(target=self.worker.close, daemon=True)
            closer.start()
            closer.join(timeout=timeout_s)
            self.worker.kill()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.state = "closed"
        self._fail_queued(lambda: PoolError("the pool was closed", worker=self.name))

    # -- the slot's thread ------------------------------------------------------------------------
    def _drive(self) -> None:
        self._boot()
        while True:
            try:
                task = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self.closing:
                    return
                if self.state == "ready" and not self.worker.alive:
                    self._replace(WorkerDiedError("the worker exited while idle", worker=self.name))
                continue
            if task is None:
                return
            if not task.future.set_running_or_notify_cancel():
                continue
            if self.state != "ready":
                task.future.set_exception(NotRun(f"worker {self.name} is {self.state}"))
                continue
            try:
                task.future.set_result(self._run(task))
                self.tasks_done += 1
            except Lost as lost:
                task.future.set_exception(lost)
                if not self.closing:
                    self._replace(lost.error)
            except PoolError as exc:
                task.future.set_exception(exc)
            except Exception as exc:  # a bug here must not leave a round waiting
                logger.exception("pool worker %s: unexpected failure", self.name)
                task.future.set_exception(PoolError(f"unexpected failure: {exc!r}", worker=self.name))

    def _boot(self) -> None:
        start = time.perf_counter()
        worker = self._make_worker(self)
        self.worker = worker
        try:
            worker.spawn()
            reply = worker.call(self._boot_message, timeout_s=self._limits.boot_s, stage="boot")
            if not reply.get("ok"):
                raise remote_error(reply, worker=self.name, stage="boot", log_path=worker.log_path)
            worker.spec_json = reply["spec"]
            if self.spec is not None and KVSpec.from_json(reply["spec"]).differences(self.spec):
                raise PoolError(
                    "the new engine's KV spec differs from the pool's", worker=self.name, stage="boot"
                )
        except Exception as exc:
            worker.kill()
            error = (
                exc
                if isinstance(exc, PoolError)
                else PoolError(f"could not start: {exc!r}", worker=self.name)
            )
            error.stage = "boot"
            self.state, self.error = "failed", error
            logger.error("pool worker %s failed to boot: %s", self.name, error)
        else:
            self.boot_s = time.perf_counter() - start
            self.state, self.error = "ready", None
            logger.info("pool worker %s ready (pid %s) in %.1f s", self.name, worker.pid, self.boot_s)
        finally:
            self.booted.set()

    def _run(self, task: Task) -> dict[str, Any]:
        started = time.perf_counter()
        hydrate = None
        if task.snapshot is not None:
            message = {"op": "hydrate", "snapshot": task.snapshot}
            hydrate = self._call(message, self._limits.hydrate_s, "hydrate")
        message = {
            "op": "generate",
            "snapshot": task.snapshot,
            "branches": task.branches,
            "timeout_s": self._limits.generate_s,
        }
        generate = self._call(message, self._limits.generate_s + _GRACE_S, "generate")
        return {
            "worker": self.name,
            "pid": self.worker.pid,
            "generation": self.generation,
            "hydrate": hydrate,
            "generate": generate,
            "queue_s": started - task.submitted_at,
            "replied_at": time.perf_counter(),
        }

    def _call(self, message: dict[str, Any], timeout_s: float, stage: str) -> dict[str, Any]:
        try:
            reply = self.worker.call(message, timeout_s=timeout_s, stage=stage)
        except (WorkerDiedError, PoolTimeoutError) as exc:
            raise Lost(exc) from None
        if not reply.get("ok"):
            raise remote_error(reply, worker=self.name, stage=stage)
        return reply

    def _replace(self, cause: PoolError) -> None:
        logger.warning("pool worker %s (pid %s) lost: %s; replacing it", self.name, self.worker.pid, cause)
        self.state = "replacing"
        self.worker.kill()
        self._fail_queued(lambda: NotRun(f"worker {self.name} was replaced"))
        if self.closing:
            return
        self.generation += 1
        self.booted.clear()
        self._boot()

    def _fail_queued(self, make_error: Callable[[], Exception]) -> None:
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                return
            if task is None:
                continue
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(make_error())


def remote_error(
    reply: dict[str, Any], *, worker: str, stage: str, log_path: Path | None = None
) -> PoolError:
    """The typed error for a worker's ``{"ok": false}`` reply."""
    error = reply.get("error") or {}
    kind = str(error.get("type", "Error"))
    text = f"{kind} in the worker during {error.get('stage', stage)}: {error.get('message', 'no message')}"
    if log_path is not None:
        text += f" (log: {log_path})"
    cls = PoolTimeoutError if kind == "RequestTimeoutError" else PoolError
    return cls(
        text, worker=worker, stage=error.get("stage", stage), remote_type=kind, branch=error.get("branch")
    )
