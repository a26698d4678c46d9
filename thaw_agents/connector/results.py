"""The worker half's save results: each recorded once, read by both of their consumers.

A finished save's result (``{"snapshot_id", "rank", "status": "written", "tokens", "blocks",
"nbytes", "ms"}`` or ``{"snapshot_id", "rank", "status": "failed", "error": {...}}``) is needed
twice:

* by the scheduler half, with the next step's worker metadata (:meth:`SaveResults.take_new`):
  it releases the blocks the save read, puts the result in the request's report when the
  request is still running, and logs a failure;
* by a front (``fork()``) whose request finished before the write, through the worker
  extension's ``thaw_save_result`` RPC (:meth:`SaveResults.latest`), which only the last
  few hundred saves keep answering.

Both read the same record; each reader gets its own copy.

Example:
    >>> results = SaveResults(keep=2)
    >>> results.queued("req-1", "thaw-a")
    >>> results.latest("thaw-a") is None  # still being written
    True
    >>> results.finished("req-1", {"status": "written", "nbytes": 8}, rank=0)
    >>> results.latest("thaw-a")
    {'status': 'written', 'nbytes': 8, 'rank': 0, 'snapshot_id': 'thaw-a'}
    >>> results.take_new()
    [('req-1', {'status': 'written', 'nbytes': 8, 'rank': 0, 'snapshot_id': 'thaw-a'})]
    >>> results.take_new()
    []
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Any

__all__ = ["SaveResults"]

Result = dict[str, Any]


class SaveResults:
    """Finished saves' results by request (for the scheduler) and by snapshot id (for fronts).

    Thread-safe: the engine step and a front's RPC may come from different threads.
    """

    def __init__(self, keep: int = 256) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._new: list[tuple[str, Result]] = []  # not yet sent to the scheduler half
        self._latest: OrderedDict[str, Result] = OrderedDict()  # snapshot id -> its latest result
        self._queued: Counter[str] = Counter()  # snapshot id -> its saves queued or running
        self._snapshot_of: dict[str, str] = {}  # request id -> the snapshot its queued save writes

    def queued(self, req_id: str, snapshot_id: str) -> None:
        """A save of ``snapshot_id`` is queued: an older result of that id is stale from now on."""
        with self._lock:
            self._queued[snapshot_id] += 1
            self._snapshot_of[req_id] = snapshot_id

    def finished(self, req_id: str, result: Result, *, rank: int) -> None:
        """Record the result of ``req_id``'s save (written by tensor-parallel ``rank``)."""
        with self._lock:
            sid = self._snapshot_of.pop(req_id, None)
            record = {**result, "rank": rank}
            if sid is not None:
                record["snapshot_id"] = sid  # the job's, even when the writer could not say
                self._queued[sid] -= 1
                if not self._queued[sid]:
                    del self._queued[sid]
                self._latest[sid] = record
                self._latest.move_to_end(sid)
                while len(self._latest) > self._keep:
                    self._latest.popitem(last=False)
            self._new.append((req_id, record))

    def take_new(self) -> list[tuple[str, Result]]:
        """(request id, result) of the saves finished since the last call."""
        with self._lock:
            new, self._new = self._new, []
        return [(req_id, dict(record)) for req_id, record in new]

    def latest(self, snapshot_id: str) -> Result | None:
        """The result of the latest save of ``snapshot_id`` among the last ``keep``; None while
        a save of it is queued or being written (or when none was recorded)."""
        with self._lock:
            if self._queued[snapshot_id]:
                return None
            record = self._latest.get(snapshot_id)
        return dict(record) if record is not None else None
