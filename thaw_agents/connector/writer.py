"""The worker half's background snapshot writer: saves leave the engine step.

``wait_for_save`` hands each save to a :class:`SaveWriter` and returns; one thread per worker
hashes and writes the snapshots in order while vLLM keeps stepping. vLLM may free a request's
blocks while its save still reads them (the request finished, or was preempted): they keep
their bytes until vLLM allocates them again, and the step that does so first waits for the
saves reading them (``handle_preemptions``, told by the scheduler half which ones).

The queue is bounded: when ``capacity`` saves are waiting, the next ``submit`` waits for room
(a burst of forks slows the step down instead of piling up host copies of their blocks).

The thread runs at the lowest CPU priority (``nice`` 19) and may use every core of the
process: on a small machine the engine's threads come first and the write takes what they leave
idle. (vLLM pins the engine's thread to one core and a thread inherits its creator's mask; left
there, the writer would take about a tenth of that core at ``nice`` 10, and every OpenMP team
in the step would wait for the thread it slowed.) The engine's own idle moments, between steps,
keep a save moving on a busy engine; on an idle one it runs at full speed.

Example:
    >>> writer = SaveWriter()
    >>> writer.submit("req-1", lambda: {"status": "written"})
    >>> writer.wait({"req-1"})
    True
    >>> writer.take_done()
    [('req-1', {'status': 'written'})]
    >>> writer.shutdown()
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .._errors import error_json
from .._threads import process_cpus

__all__ = ["SaveWriter", "error_result"]

logger = logging.getLogger(__name__)

Result = dict[str, Any]
_STOP = object()
# How much lower than the engine the writer runs (0 = the same; 19 = the lowest).
WRITER_NICENESS = 19


def error_result(snapshot_id: str, exc: BaseException) -> Result:
    """A failed save's result: the error as plain JSON (:func:`~thaw_agents._errors.error_json`)."""
    return {"snapshot_id": snapshot_id, "status": "failed", "error": error_json(exc)}


class SaveWriter:
    """One background thread running save jobs in submission order."""

    def __init__(self, capacity: int = 4, *, niceness: int = WRITER_NICENESS) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self._niceness = niceness
        self._lock = threading.Condition()
        self._pending: dict[str, int] = {}  # request id -> jobs queued or running
        self._done: list[tuple[str, Result]] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, req_id: str, job: Callable[[], Result]) -> None:
        """Queue ``job`` (it returns the save's result; an exception is turned into one)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the snapshot writer is shut down")
            self._pending[req_id] = self._pending.get(req_id, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="thaw-save-writer", daemon=True)
                self._thread.start()
        self._queue.put((req_id, job))

    def busy(self, req_id: str) -> bool:
        """Whether a save of ``req_id`` is queued or being written."""
        with self._lock:
            return req_id in self._pending

    def wait(self, req_ids: Iterable[str], timeout: float | None = None) -> bool:
        """Block until no save of ``req_ids`` is queued or running; False on timeout."""
        wanted = set(req_ids)
        with self._lock:
            return self._lock.wait_for(lambda: not wanted & self._pending.keys(), timeout)

    def take_done(self) -> list[tuple[str, Result]]:
        """(request id, result) of the saves finished since the last call, in order."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def shutdown(self, timeout: float = 120.0) -> None:
        """Finish the queued saves (their blocks are still held), then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout)
        if thread.is_alive():
            logger.error("thaw: the snapshot writer did not finish within %.0f s of shutdown", timeout)

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed: run as is
            os.sched_setaffinity(0, process_cpus())
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._niceness)
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            req_id, job = item
            try:
                result = job()
            except BaseException as exc:  # a job reports its own errors; this is a last resort
                logger.exception("thaw: request %s: the save job failed", req_id)
                result = error_result("", exc)
            with self._lock:
                self._done.append((req_id, result))
                left = self._pending.get(req_id, 1) - 1
                if left:
                    self._pending[req_id] = left
                else:
                    self._pending.pop(req_id, None)
                self._lock.notify_all()
