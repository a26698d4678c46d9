"""``ForkPool``: warm vLLM engines in worker processes (or Ray actors) that run branches.

Each worker slot has a driver thread in the parent that owns its worker: it boots the
engine, then takes tasks (one round's branches for that worker) from its queue one at a
time: hydrate the trunk snapshot, generate the branches as one batch, each step under its
own timeout. A worker that dies or stops answering is killed and replaced by the same
thread; the task it held fails with :class:`WorkerDiedError` / :class:`PoolTimeoutError`
and tasks queued behind it are handed back unrun, so the round retries them elsewhere.

Example:
    >>> from thaw_agents import ForkPool, fork_completions, make_llm
    >>> llm = make_llm()                                                      # doctest: +SKIP
    >>> with ForkPool(workers=2) as pool:                                     # doctest: +SKIP
    ...     results = fork_completions(llm, prompts, SamplingParams(max_tokens=64), pool)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from .._errors import ConfigError, PoolError
from .._kvspec import KVSpec
from ._results import WorkerInfo
from ._service import PRIVATE_STORE_ENV
from ._slots import Limits, Task, WorkerSlot
from ._transport import check_transport, clean_stale, make_run_dir, runtime_root
from ._worker import CPUS_ENV

__all__ = ["ForkPool"]

logger = logging.getLogger(__name__)
Backend = Literal["local", "ray"]
_POOLS: weakref.WeakSet[ForkPool] = weakref.WeakSet()


class ForkPool:
    """Warm worker engines that hydrate a trunk snapshot and run branches.

    Each worker is its own process (or Ray actor) with one vLLM engine built by
    :func:`thaw_agents.make_llm`; :func:`fork_completions` hands it a share of a round's
    branches, round-robin by branch index over the ready workers, and a worker runs its share
    as one batch. On CPU the workers are pinned to separate cores unless you pinned them
    (``VLLM_CPU_OMP_THREADS_BIND`` in ``worker_env``). A round goes to the workers when the
    parent engine has no room for it, or with ``placement="pool"``: on one host the parent is
    the better place while it has room (see the README's "ForkPool rounds").

    Failures: every step has a timeout; a worker that dies or stops answering is killed and
    replaced, and its branches run once more on another worker (``BranchResult.attempts``);
    errors are :class:`PoolError` subclasses naming the branch, the worker and the stage.

    Args:
        model: the model every worker runs (None: the default model). It must be the
            parent's model, with the same dtype, block size and KV layout: a round refuses a
            parent that differs (:class:`SnapshotMismatchError`) before any branch runs.
        workers: how many workers (default: one per device, else 1).
        devices: one worker per device (``CUDA_VISIBLE_DEVICES`` per worker); ignored on CPU.
        backend: ``"local"`` (processes on this host) or ``"ray"`` (Ray actors).
        transport: ``"auto"`` (``"shm"`` locally, ``"ray"`` on Ray), ``"shm"``, ``"store"``,
            ``"ray"``, or a shared directory / fsspec URI for durable or cross-host hand-off.
        boot_timeout_s, hydrate_timeout_s, generate_timeout_s: limits per step and worker.
        worker_env: extra environment variables for every worker.
        ray_address: the Ray cluster to join (None: ``RAY_ADDRESS`` or a new local Ray).
        ray_actor_options: options for each actor (default ``num_cpus=1``, ``num_gpus=1`` on GPU).
        progress: show a progress bar while booting (None: when stderr is a terminal).
        **engine_overrides: engine arguments for :func:`thaw_agents.engine_kwargs` (plain
            JSON values: they travel to the workers as JSON).

    Example:
        >>> pool = ForkPool(workers=2, max_model_len=4096).start()       # doctest: +SKIP
        >>> [w.state for w in pool.workers]                              # doctest: +SKIP
        ['ready', 'ready']
        >>> pool.close()                                                 # doctest: +SKIP
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        workers: int | None = None,
        devices: Sequence[int | str] | None = None,
        backend: Backend = "local",
        *,
        transport: str = "auto",
        boot_timeout_s: float = 600.0,
        hydrate_timeout_s: float = 120.0,
        generate_timeout_s: float = 600.0,
        worker_env: Mapping[str, str] | None = None,
        ray_address: str | None = None,
        ray_actor_options: Mapping[str, Any] | None = None,
        progress: bool | None = None,
        **engine_overrides: Any,
    ) -> None:
        if backend not in ("local", "ray"):
            raise ConfigError(f"backend must be 'local' or 'ray', not {backend!r}")
        if devices is not None and backend == "ray":
            raise ConfigError(
                "with backend='ray' Ray places the workers: pass ray_actor_options, not devices"
            )
        if devices is not None and workers is not None and workers != len(devices):
            raise ConfigError(f"one worker per device: {len(devices)} devices but workers={workers}")
        count = len(devices) if devices is not None else (1 if workers is None else workers)
        if count < 1:
            raise ConfigError("a pool needs at least one worker")
        for name, value in (
            ("boot", boot_timeout_s),
            ("hydrate", hydrate_timeout_s),
            ("generate", generate_timeout_s),
        ):
            if not value > 0:
                raise ConfigError(f"{name}_timeout_s must be positive")
        try:
            json.dumps(engine_overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"engine overrides must be plain JSON values (they travel to the workers): {exc}"
            ) from exc
        self.backend: Backend = backend
        self.transport = check_transport(transport, backend)
        self.boot_timeout_s = float(boot_timeout_s)
        self.hydrate_timeout_s = float(hydrate_timeout_s)
        self.generate_timeout_s = float(generate_timeout_s)
        self._model = model
        self._model_path: str | None = None
        self._overrides = dict(engine_overrides)
        self._devices = [str(d).removeprefix("cuda:") for d in devices] if devices is not None else None
        self._count = count
        self._worker_env = dict(worker_env or {})
        self._ray_address = ray_address
        self._ray_options = dict(ray_actor_options or {})
        self._progress = progress
        self._slots: list[WorkerSlot] = []
        self._spec: KVSpec | None = None
        self._lock = threading.Lock()
        self._started = False
        self._closing = False
        self._owns_ray = False
        self._run_dir: Path | None = None

    # -- public surface ------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._count

    @property
    def spec(self) -> KVSpec:
        """The workers' KV spec (what a parent must match)."""
        if self._spec is None:
            raise PoolError("the pool is not started: call start() or use it as a context manager")
        return self._spec

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def workers(self) -> list[WorkerInfo]:
        """Each worker's name, state, pid, device and history (a snapshot of now)."""
        return [slot.info() for slot in self._slots]

    def __repr__(self) -> str:
        states = ",".join(s.state for s in self._slots) or "not started"
        return (
            f"ForkPool(backend={self.backend!r}, workers={self._count}, "
            f"transport={self.transport!r}, {states})"
        )

    def __enter__(self) -> ForkPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> ForkPool:
        """Boot every worker in parallel (progress bar on a terminal); return the pool.

        Raises:
            PoolError, PoolTimeoutError: a worker failed to boot in time (the pool is closed).
        """
        with self._lock:
            if self._started:
                return self
            self._started = True
        from ..models import resolve_model

        model_path = resolve_model(self._model)  # prepared once here, not by N workers at once
        root = runtime_root()
        clean_stale(root)
        self._run_dir = make_run_dir(root)
        if self.backend == "ray":
            from ._ray import connect

            self._owns_ray = connect(self._ray_address)
        binds = self._cpu_binds()
        boot = {"op": "boot", "model": model_path, "overrides": self._overrides}
        limits = Limits(
            boot_s=self.boot_timeout_s, hydrate_s=self.hydrate_timeout_s, generate_s=self.generate_timeout_s
        )
        for index in range(self._count):
            device = self._devices[index] if self._devices else None
            name = f"{self.backend}-{index}"
            env = self._env_for(name, device, binds[index])
            self._slots.append(
                WorkerSlot(
                    index,
                    name,
                    device,
                    make_worker=lambda slot, env=env: self._new_worker(slot, env),
                    boot_message={**boot, "name": name},
                    limits=limits,
                )
            )
        _POOLS.add(self)
        for slot in self._slots:
            slot.start()
        self._wait_booted()
        failed = [s for s in self._slots if s.state != "ready"]
        if failed:
            self.close()
            raise failed[0].error or PoolError("a worker failed to boot", worker=failed[0].name, stage="boot")
        specs = {json.dumps(s.worker.spec_json, sort_keys=True) for s in self._slots}
        if len(specs) != 1:
            self.close()
            raise ConfigError("the workers disagree on their KV spec (different hosts or devices?)")
        self._spec = KVSpec.from_json(self._slots[0].worker.spec_json)
        for slot in self._slots:
            slot.spec = self._spec
        logger.info("pool ready: %d %s workers (%s)", self._count, self.backend, self._spec.model_name)
        return self

    def close(self) -> None:
        """Stop every worker (gracefully, then by force) and remove the pool's files."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for slot in self._slots:
            slot.closing = True
        stoppers = [threading.Thread(target=slot.stop, daemon=True) for slot in self._slots]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(timeout=60)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
        if self._owns_ray:
            import ray

            ray.shutdown()
        _POOLS.discard(self)
        logger.info("pool closed")

    # -- used by rounds (package-private) ------------------------------------------------------
    def ready_slots(self) -> list[int]:
        return [s.index for s in self._slots if s.state == "ready"]

    def usable_slots(self) -> list[int]:
        """Slots that are ready or will be soon (booting a replacement)."""
        return [s.index for s in self._slots if s.state in ("ready", "booting", "replacing")]

    def slot_name(self, index: int) -> str:
        return self._slots[index].name

    def queued(self, index: int) -> int:
        return self._slots[index].queued

    def submit(self, index: int, task: Task) -> Future[dict[str, Any]]:
        if self._closing:
            raise PoolError("the pool is closed")
        return self._slots[index].submit(task)

    def run_dir(self) -> Path:
        if self._run_dir is None:
            raise PoolError("the pool is not started: call start() or use it as a context manager")
        return self._run_dir

    # -- workers ---------------------------------------------------------------------------------
    def _cpu_binds(self) -> list[str | None]:
        """On CPU, split this process's cores between the workers (unless the user pinned them)."""
        from .._engine import is_cpu_platform

        pinned_already = {"VLLM_CPU_OMP_THREADS_BIND", CPUS_ENV} & {*os.environ, *self._worker_env}
        if pinned_already or not is_cpu_platform() or (self.backend == "ray" and not self._owns_ray):
            return [None] * self._count
        if hasattr(os, "sched_getaffinity"):
            cores = sorted(os.sched_getaffinity(0))
        else:
            cores = list(range(os.cpu_count() or 1))
        if self._count >= len(cores):
            return [str(cores[i % len(cores)]) for i in range(self._count)]
        per = len(cores) // self._count
        return [",".join(map(str, cores[i * per : (i + 1) * per])) for i in range(self._count)]

    def _env_for(self, name: str, device: str | None, bind: str | None) -> dict[str, str]:
        from .._engine import is_cpu_platform
        from .._store import store_dir

        env = dict(os.environ) if self.backend == "local" else {}
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if self.transport == "store":  # same host: the workers read the parent's store in place
            env["THAW_AGENTS_STORE"] = str(store_dir())
        elif self.backend == "local":
            # Each round's snapshot lands in shared memory; a store of the worker's own beside it
            # (same file system) takes it in by a hard link, not a copy.
            env["THAW_AGENTS_STORE"] = str(self.run_dir() / f"store-{name}")
            env[PRIVATE_STORE_ENV] = "1"
        else:  # a Ray actor keeps its store in its own shared-memory folder (see _ray.py)
            env[PRIVATE_STORE_ENV] = "1"
        if device is not None:
            if is_cpu_platform():
                logger.info("devices are ignored on the CPU backend")
            else:
                env["CUDA_VISIBLE_DEVICES"] = device
        if bind is not None:  # the worker pins its whole process there (see _worker.pin_process)
            env["VLLM_CPU_OMP_THREADS_BIND"] = bind
            env[CPUS_ENV] = bind
            env["OMP_NUM_THREADS"] = str(len(bind.split(",")))
        env.update(self._worker_env)
        return env

    def _new_worker(self, slot: WorkerSlot, env: dict[str, str]) -> Any:
        if self.backend == "ray":
            from .._engine import is_cpu_platform
            from ._ray import RayWorker

            options = dict(self._ray_options) or ({"num_cpus": 1} if is_cpu_platform() else {"num_gpus": 1})
            return RayWorker(slot.name, env=env, actor_options=options)
        from ._local import LocalWorker

        log_path = self.run_dir() / f"{slot.name}.{slot.generation}.log"
        return LocalWorker(slot.name, env=env, log_path=log_path)

    def _wait_booted(self) -> None:
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        show = self._progress if self._progress is not None else sys.stderr.isatty()
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True, disable=not show) as bar:
            task = bar.add_task(f"booting {self._count} {self.backend} workers", total=self._count)
            while True:
                done = sum(slot.booted.is_set() for slot in self._slots)
                bar.update(task, completed=done)
                if done == self._count:
                    return
                time.sleep(0.2)


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        try:
            pool.close()
        except Exception:  # interpreter shutdown: best effort
            logger.debug("closing a pool at exit failed", exc_info=True)
