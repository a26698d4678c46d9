"""``ForkPool(backend="ray")``: workers as Ray actors, snapshots through Ray's object store.

Each actor is its own Ray worker process holding one :class:`EngineService` (one vLLM
engine). A round puts the bytes of each snapshot file into the object store once
(``ray.put``); every actor fetches them (from its node's store, copied across nodes by Ray
on demand), writes them to an owner-only local file and hydrates from that file, exactly as
a local worker does. A dead actor surfaces as ``RayActorError`` (mapped to
:class:`WorkerDiedError`); a call past its timeout gets the actor killed.

Example:
    >>> with ForkPool(workers=2, backend="ray") as pool:         # doctest: +SKIP
    ...     results = fork_completions(llm, prompts, params, pool)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import DependencyError, PoolTimeoutError, WorkerDiedError
from .._store import SUFFIX
from ._transport import Shipment, clean_stale, make_run_dir, runtime_root

if TYPE_CHECKING:
    from .._fork import ForkHandle

__all__ = ["RayWorker", "connect", "ship_through_object_store"]

logger = logging.getLogger(__name__)
_ACTOR_CLASS: Any = None


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise DependencyError("ray", "pip install 'thaw-agents[ray]'", "ForkPool(backend='ray')") from exc
    return ray


def connect(address: str | None) -> bool:
    """Connect to Ray (``address``, ``RAY_ADDRESS``, or a new local Ray); True if this call did."""
    ray = _ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a local Ray for this pool only
    ray.init(address=address, **kwargs)
    logger.info("connected to Ray at %s", address or os.environ.get("RAY_ADDRESS") or "a new local instance")
    return True


class _PoolActor:
    """The actor body: materialise snapshot bytes as local files, then defer to the service."""

    def __init__(self, name: str) -> None:
        from ._service import PRIVATE_STORE_ENV, EngineService
        from ._worker import pin_process

        pin_process()  # before the engine starts its threads (a local Ray: cores split as locally)

        root = runtime_root()
        clean_stale(root)
        self._dir = make_run_dir(root, "ray")
        if os.environ.get(PRIVATE_STORE_ENV):  # snapshots land in self._dir: a store beside them
            os.environ["THAW_AGENTS_STORE"] = str(self._dir / "store")
        self._service = EngineService(name)

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("op") == "shutdown":
            self._service.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            return {"id": message.get("id"), "ok": True}
        snapshot = message.get("snapshot")
        if snapshot and "objects" in snapshot:
            message = {**message, "snapshot": self._materialise(snapshot)}
        reply = self._service.handle(message)
        if snapshot and "objects" in snapshot and (message["op"] == "generate" or not reply.get("ok")):
            shutil.rmtree(self._dir / snapshot["id"], ignore_errors=True)  # this task is done with it
        return reply

    def _materialise(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        import ray

        folder = self._dir / snapshot["id"]
        folder.mkdir(mode=0o700, exist_ok=True)
        leaf = folder
        for item in snapshot["objects"]:  # root first: ancestors sit beside the leaf under their ids
            leaf = folder / item["name"]
            if not leaf.exists():
                partial = leaf.with_suffix(".partial")
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(ray.get(item["ref"]))
                os.replace(partial, leaf)
        refless = {k: v for k, v in snapshot.items() if k != "objects"}
        return {**refless, "uri": str(leaf)}


def _actor_class() -> Any:
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = _ray().remote(_PoolActor)
    return _ACTOR_CLASS


def ship_through_object_store(handle: ForkHandle) -> Shipment:
    """Put every file of the snapshot chain into the object store (once per round)."""
    ray = _ray()
    objects = [
        {"name": manifest.snapshot_id + SUFFIX, "ref": ray.put(Path(path).read_bytes())}
        for path, manifest in zip(handle.paths, handle.manifests, strict=True)
    ]
    return Shipment(
        ref={"id": handle.id, "nbytes": handle.nbytes, "transport": "ray", "objects": objects},
        transport="ray",
        nbytes=handle.nbytes,
        _cleanup=objects.clear,  # dropping the refs lets Ray free the objects
    )


class RayWorker:
    """One pool worker as a Ray actor (same interface as :class:`LocalWorker`)."""

    kind = "ray"

    def __init__(self, name: str, *, env: dict[str, str], actor_options: dict[str, Any]) -> None:
        self.name = name
        self._env = env
        self._options = actor_options
        self._actor: Any = None
        self._dead = False
        self.pid: int | None = None
        self.log_path: Path | None = None
        self.spec_json: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self._actor is not None and not self._dead

    def spawn(self) -> None:
        options = {"max_restarts": 0, "max_concurrency": 1, **self._options}
        runtime_env = dict(options.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {**self._env, **dict(runtime_env.get("env_vars") or {})}
        self._actor = _actor_class().options(runtime_env=runtime_env, **options).remote(self.name)

    def call(self, message: dict[str, Any], *, timeout_s: float, stage: str) -> dict[str, Any]:
        ray = _ray()
        from ray.exceptions import GetTimeoutError, RayActorError

        if not self.alive:
            raise WorkerDiedError(f"the actor is gone ({stage})", worker=self.name, stage=stage)
        try:
            reply = ray.get(self._actor.handle.remote({**message, "id": 0}), timeout=timeout_s)
        except GetTimeoutError:
            raise PoolTimeoutError(
                f"{stage} took longer than {timeout_s:.0f} s",
                timeout_s=timeout_s,
                worker=self.name,
                stage=stage,
            ) from None
        except RayActorError as exc:
            self._dead = True
            raise WorkerDiedError(
                f"the Ray actor died during {stage}: {exc}", worker=self.name, stage=stage
            ) from None
        if stage == "boot" and reply.get("ok"):
            self.pid = reply.get("pid")
        return reply

    def kill(self) -> None:
        if self._actor is not None:
            try:
                _ray().kill(self._actor, no_restart=True)
            except Exception:  # already gone
                logger.debug("ray.kill(%s) failed", self.name, exc_info=True)
        self._dead = True

    def close(self, timeout_s: float = 15.0) -> None:
        if self.alive:
            with contextlib.suppress(WorkerDiedError, PoolTimeoutError):
                self.call({"op": "shutdown"}, timeout_s=timeout_s, stage="shutdown")
        self.kill()
