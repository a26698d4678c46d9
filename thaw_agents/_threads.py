"""Checksum work on every core the process may use.

Checking a snapshot's regions is ``os.preadv`` plus BLAKE3, both of which release the GIL, so
a few threads check a large file in a fraction of the time one does (92 MB: 42 ms on one thread,
22-25 ms on two, 2-core Xeon); the engine's load reads and checks its blocks the same way (57 ->
37 ms). :func:`in_parts` splits a list into contiguous parts and runs them on one shared pool.

The pool's threads may run on every core any thread of the process may use
(:func:`process_cpus`, also the save writer's mask). vLLM's CPU worker pins each of its OpenMP
threads to one core, the engine's own thread included, and a thread inherits its creator's
mask: a helper started from a pinned thread (an in-process engine's caller) would otherwise
share that thread's single core. In vLLM's CPU worker process the connector asks for one core
per thread instead (:func:`pin_one_core_each`), as vLLM pins its own: while the worker loads,
vLLM's engine-core process busy-waits for it (``sched_yield`` in a loop), and threads free to
move kept meeting it; pinned, they did not (92 MB load on two cores: 52-88 -> 36-40 ms, the
engine core's CPU time in that request 41-100 -> 10-14 ms).

Example:
    >>> in_parts(lambda part: sum(part), list(range(100)))  # one result per part, in order
    [1225, 3725]
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["in_parts", "pin_one_core_each", "process_cpus"]

T = TypeVar("T")
R = TypeVar("R")

_MAX_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_threads = 1
_pool_lock = threading.Lock()
_one_core_each = False


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def process_cpus() -> set[int]:
    """The cores any thread of this process may run on (all cores where that is unknown)."""
    cpus: set[int] = set()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no per-thread masks
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError, ValueError):  # the thread ended meanwhile
                cpus |= os.sched_getaffinity(int(tid))
    return cpus or set(range(os.cpu_count() or 1))


def _pin(cpus: set[int]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, cpus)


def _pin_next(cpus: list[int], started: Iterator[int]) -> None:
    _pin({cpus[next(started) % len(cpus)]})


def pin_one_core_each() -> None:
    """From now on the pool runs each of its threads on one core of its own (the process's
    cores in order), instead of letting them move across all of them. For a process whose
    own threads are pinned that way (vLLM's CPU worker); an existing pool is replaced."""
    global _pool, _one_core_each
    with _pool_lock:
        _one_core_each = True
        old, _pool = _pool, None
    if old is not None:
        old.shutdown(wait=False)


def _shared_pool() -> tuple[ThreadPoolExecutor, int]:
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None:
            cpus = process_cpus()
            _pool_threads = min(len(cpus), _MAX_THREADS)
            if _one_core_each:
                initializer, initargs = _pin_next, (sorted(cpus), itertools.count())
            else:
                initializer, initargs = _pin, (cpus,)
            _pool = ThreadPoolExecutor(
                _pool_threads, thread_name_prefix="thaw-io", initializer=initializer, initargs=initargs
            )
        return _pool, _pool_threads


def in_parts(fn: Callable[[list[T]], R], items: Sequence[T], *, min_part: int = 4) -> list[R]:
    """``fn`` over contiguous parts of ``items`` (at least ``min_part`` each), in parallel on
    the shared pool; the results in order. One part (run here) when that is all there is.
    ``fn`` must release the GIL for its heavy work, and must not call :func:`in_parts`."""
    items = list(items)
    pool, threads = _shared_pool()
    parts = max(1, min(threads, len(items) // max(1, min_part)))
    if parts == 1:
        return [fn(items)]
    size = -(-len(items) // parts)
    return list(pool.map(fn, [items[i : i + size] for i in range(0, len(items), size)]))
