"""The engine side of a pool worker: one vLLM engine, driven by plain-data requests.

The same :class:`EngineService` runs inside a local worker process (``_worker.py``, JSON
lines over pipes) and inside a Ray actor (``_ray.py``). :meth:`EngineService.handle`
never raises: every failure comes back as an ``{"ok": false, "error": ...}`` reply that
names the stage and, where known, the branch.

Test hook: with ``THAW_AGENTS_POOL_TEST_HOOK=<dir>`` set, a worker about to generate claims
``<dir>/hang`` (renames it to ``hang.<pid>``, so exactly one worker takes it) and sleeps the
number of seconds written in it: the tests use it to make a worker hang, or to kill it
mid-round. Nothing happens when the variable is unset.

Example:
    >>> service = EngineService("local-0")                                  # doctest: +SKIP
    >>> service.handle({"id": 1, "op": "boot", "model": None, "overrides": {}})   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .._errors import ConfigError, EngineError
from ..front import LLMFront, Request, RequestTimeoutError
from ._protocol import BranchJob, SnapshotRef, branch_reply, decode_sampling, error_data

__all__ = ["TEST_HOOK_ENV", "EngineService"]

logger = logging.getLogger(__name__)
TEST_HOOK_ENV = "THAW_AGENTS_POOL_TEST_HOOK"
# Set by the pool when this worker's snapshot store is its own (in the pool's shared-memory
# folder): snapshots shipped for a round are hard-linked in there and removed after it.
PRIVATE_STORE_ENV = "THAW_AGENTS_POOL_PRIVATE_STORE"


class EngineService:
    """One worker's engine and the handles of the snapshots it hydrated."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._front: LLMFront | None = None
        self._spec: Any = None
        self._handles: dict[str, Any] = {}

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """Answer one request; failures become error replies, never exceptions."""
        op = message.get("op", "")
        reply: dict[str, Any] = {"id": message.get("id")}
        try:
            method = {"boot": self.boot, "hydrate": self.hydrate, "generate": self.generate}.get(op)
            if method is None:
                raise ConfigError(f"unknown pool operation {op!r}")
            reply.update(method(message))
            reply["ok"] = True
        except Exception as exc:
            logger.exception("pool worker %s: %s failed", self.name, op)
            reply.update(ok=False, error=error_data(exc, stage=op))
        return reply

    # -- operations ----------------------------------------------------------------------
    def boot(self, message: dict[str, Any]) -> dict[str, Any]:
        from .. import _engine

        if self._front is not None:
            raise EngineError("this worker already runs an engine")
        start = time.perf_counter()
        self._front = LLMFront(_engine.make_llm(message.get("model"), **dict(message.get("overrides") or {})))
        self._spec = self._front.kv_spec()
        boot_s = time.perf_counter() - start
        logger.info("pool worker %s: engine ready in %.1f s", self.name, boot_s)
        return {"spec": self._spec.to_json(), "pid": os.getpid(), "boot_s": boot_s}

    def hydrate(self, message: dict[str, Any]) -> dict[str, Any]:
        """Open the snapshot for this engine: every header and checksum, then the KV spec.

        No engine pass: the first branch request copies the blocks into the KV cache itself
        (the connector loads synchronously, before that request's forward pass), and vLLM
        registers them in its prefix cache as it allocates them, so the batch's other requests
        reuse them. A separate one-token hydrate request would cost a whole engine step.
        """
        from .._fork import ForkHandle
        from .._manifest import check_compatible

        ref: SnapshotRef = message["snapshot"]
        start = time.perf_counter()
        handle = ForkHandle.load(ref["uri"])  # reads and checksums every byte before any is used
        check_compatible(handle.spec, self._engine_spec(), path=str(handle.path))
        self._handles[ref["uri"]] = handle
        hydrate_s = time.perf_counter() - start
        logger.debug(
            "pool worker %s: opened %s (%d blocks) in %.3f s",
            self.name,
            handle.id,
            handle.num_blocks,
            hydrate_s,
        )
        return {
            "num_snapshot_tokens": handle.num_snapshot_tokens,
            "hydrate_s": hydrate_s,
            "nbytes": handle.nbytes,
        }

    def generate(self, message: dict[str, Any]) -> dict[str, Any]:
        """Run the branches as one batch; every request names the snapshot, so whichever
        request needs a block first loads it and the others find it in the prefix cache."""
        from .._fork import ForkHandle, with_fork

        ref: SnapshotRef | None = message.get("snapshot")
        handle = None
        if ref:
            handle = self._handles.pop(ref["uri"], None) or ForkHandle.load(ref["uri"], verify=False)
        branches: list[BranchJob] = message["branches"]
        requests = []
        for branch in branches:
            sp = decode_sampling(branch["sampling"])
            params = with_fork(sp, handle) if handle is not None else sp
            requests.append(Request(token_ids=branch["prompt_token_ids"], params=params))
        _test_hook(self.name)
        start = time.perf_counter()
        try:
            results = self._engine().generate(requests, timeout_s=message.get("timeout_s"))
        except RequestTimeoutError as exc:
            raise RequestTimeoutError(f"generate ran past its timeout in the worker: {exc}") from None
        finally:
            if handle is not None:
                self._release(handle)
        replies = [branch_reply(b["index"], r) for b, r in zip(branches, results, strict=True)]
        return {"branches": replies, "generate_s": time.perf_counter() - start}

    # -- helpers ---------------------------------------------------------------------------
    def _release(self, handle: Any) -> None:
        """Remove a round's snapshot from a private store once no pending round uses it."""
        if not os.environ.get(PRIVATE_STORE_ENV):
            return
        in_use = {path for other in self._handles.values() for path in other.paths}
        for path in handle.paths:
            if path not in in_use:
                path.unlink(missing_ok=True)

    def _engine(self) -> LLMFront:
        if self._front is None:
            raise EngineError("the worker has no engine yet (boot first)")
        return self._front

    def _engine_spec(self) -> Any:
        self._engine()
        return self._spec

    def close(self) -> None:
        front, self._front = self._front, None
        if front is not None:
            try:
                front.llm.llm_engine.engine_core.shutdown()
            except Exception:  # the process is exiting anyway
                logger.debug("pool worker %s: engine shutdown failed", self.name, exc_info=True)


def _test_hook(name: str) -> None:
    folder = os.environ.get(TEST_HOOK_ENV)
    if not folder:
        return
    hang = Path(folder) / "hang"
    claimed = Path(folder) / f"hang.{os.getpid()}"
    try:
        os.rename(hang, claimed)  # atomic: exactly one worker claims it
    except OSError:
        return
    seconds = float(claimed.read_text().strip() or "3600")
    logger.warning("pool worker %s: test hook sleeps %.0f s before generating", name, seconds)
    time.sleep(seconds)
