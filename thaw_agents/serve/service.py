"""The served engine's snapshots: make, list, read, delete, import, and keep the store bounded.

One :class:`SnapshotService` per server process. It knows the engine's KV spec and store
(from the engine's ``thaw_describe``), counts which snapshots running requests use, and
evicts the least recently used snapshots when the store grows past its budget, never one
in use. "Last used" is kept in memory from the server's start; before a snapshot's first
use in this process it is the file's modification time (when it was written or imported).
The access time cannot serve: every header read updates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._container_reader import verify_regions
from .._errors import SnapshotNotFoundError, SnapshotWriteError
from .._fork import ForkHandle, fork
from .._kvspec import KVSpec
from .._manifest import KVManifest, check_compatible, read_kv_manifest
from .._store import SUFFIX, import_snapshot, partial_prefix, snapshot_path
from ..connector.manifests import ManifestCache
from .engine_adapter import ServerEngineAdapter

__all__ = ["SnapshotInfo", "SnapshotService", "default_budget_nbytes"]

logger = logging.getLogger(__name__)
MAX_BUDGET_ENV = "THAW_AGENTS_STORE_MAX_BYTES"


def default_budget_nbytes(store: Path) -> int:
    """A fifth of the store's file system, at most 200 GiB."""
    try:
        total = shutil.disk_usage(store).total
    except OSError:
        total = 50 << 30
    return min(total // 5, 200 << 30)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotInfo:
    id: str
    num_tokens: int
    num_snapshot_tokens: int
    nbytes: int
    parent: str | None
    created: float
    last_used: float
    in_use: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "thaw.snapshot",
            "num_tokens": self.num_tokens,
            "num_snapshot_tokens": self.num_snapshot_tokens,
            "nbytes": self.nbytes,
            "parent": self.parent,
            "created": int(self.created),
            "last_used": int(self.last_used),
            "in_use": self.in_use,
        }


class SnapshotService:
    """Snapshots of one served engine (see the module docstring)."""

    def __init__(self, engine: Any, describe: dict[str, Any], *, max_nbytes: int | None = None) -> None:
        self.engine = engine
        self.spec = KVSpec.from_json(describe["spec"])
        self.store = Path(describe["store"])
        self._describe = describe
        self.max_nbytes = max_nbytes if max_nbytes is not None else default_budget_nbytes(self.store)
        self.manifests = ManifestCache(self.store)
        self._in_use: Counter[str] = Counter()
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()
        self.evicted: list[dict[str, Any]] = []  # the most recent evictions, for the list route

    @classmethod
    async def create(cls, engine: Any) -> SnapshotService:
        replies = await engine.collective_rpc("thaw_describe")
        reply = replies[0] if replies else {"error": "no workers"}
        if "error" in reply:
            raise RuntimeError(f"thaw-agents serve: {reply['error']}")
        budget = os.environ.get(MAX_BUDGET_ENV)
        return cls(engine, reply, max_nbytes=int(budget) if budget else None)

    def weights_changed(self, fingerprint: str) -> None:
        """The engine's weights were swapped: snapshots must now match ``fingerprint``."""
        self.spec = dataclasses.replace(self.spec, model_fingerprint=fingerprint)
        self._describe = {**self._describe, "spec": self.spec.to_json()}

    # -- use tracking ----------------------------------------------------------------------
    def chain(self, snapshot_id: str) -> list[KVManifest]:
        """The validated chain of ``snapshot_id``, checked against the served engine.

        Raises:
            SnapshotNotFoundError (404), SnapshotMismatchError (409), other SnapshotError (422).
        """
        if not snapshot_path(self.store, snapshot_id).exists():
            raise SnapshotNotFoundError(f"snapshot {snapshot_id} is not in this server's store")
        chain = self.manifests.chain(snapshot_id)
        for manifest in chain:
            check_compatible(manifest.spec, self.spec, path=manifest.snapshot_id)
        return chain

    def acquire(self, ids: list[str]) -> None:
        now = time.time()
        with self._lock:
            self._in_use.update(ids)
            self._last_used.update(dict.fromkeys(ids, now))

    def release(self, ids: list[str]) -> None:
        with self._lock:
            self._in_use.subtract(ids)
            self._in_use += Counter()  # drop zero counts

    def in_use(self, snapshot_id: str) -> bool:
        with self._lock:
            return self._in_use[snapshot_id] > 0

    # -- operations --------------------------------------------------------------------------
    async def make(self, prefix: Any, parent: str | None) -> dict[str, Any]:
        """``fork()`` on the served engine: the same semantics as in-process."""
        loop = asyncio.get_running_loop()
        adapter = ServerEngineAdapter(self.engine, loop, self._describe)

        def run() -> ForkHandle:
            parent_handle = None
            if parent is not None:
                self.chain(parent)  # 404 / 409 before any engine work
                parent_handle = ForkHandle.from_id(parent, store=self.store)
            return fork(adapter, prefix, parent=parent_handle)

        handle = await asyncio.to_thread(run)
        self.acquire([handle.id])
        self.release([handle.id])
        await asyncio.to_thread(self.enforce_budget)
        return {
            "id": handle.id,
            "object": "thaw.snapshot",
            "num_tokens": handle.num_tokens,
            "num_snapshot_tokens": handle.num_snapshot_tokens,
            "nbytes": handle.path.stat().st_size,
        }

    def info(self, snapshot_id: str) -> SnapshotInfo:
        path = snapshot_path(self.store, snapshot_id)
        manifest = self.manifests.read(path, snapshot_id)
        st = path.stat()
        bs = manifest.spec.block_size
        return SnapshotInfo(
            id=snapshot_id,
            num_tokens=manifest.end_block * bs + len(manifest.tail_token_ids),
            num_snapshot_tokens=manifest.end_block * bs,
            nbytes=st.st_size,
            parent=manifest.parent.snapshot_id if manifest.parent else None,
            created=st.st_mtime,
            last_used=self._last_used.get(snapshot_id, st.st_mtime),
            in_use=self.in_use(snapshot_id),
        )

    def list(self) -> list[SnapshotInfo]:
        out = []
        for path in self.store.glob("thaw-*" + SUFFIX):
            try:
                out.append(self.info(path.name.removesuffix(SUFFIX)))
            except Exception as exc:  # an unreadable file is not listed; say so in the log
                logger.warning("thaw serve: %s is not a usable snapshot: %s", path.name, exc)
        return sorted(out, key=lambda info: info.last_used, reverse=True)

    def delete(self, snapshot_id: str) -> None:
        path = snapshot_path(self.store, snapshot_id)
        if not path.exists():
            raise SnapshotNotFoundError(f"snapshot {snapshot_id} is not in this server's store")
        path.unlink(missing_ok=True)

    def content_path(self, snapshot_id: str) -> Path:
        self.chain(snapshot_id)  # a file that is not what its name says is never served
        return snapshot_path(self.store, snapshot_id)

    async def import_stream(self, chunks: Any) -> dict[str, Any]:
        """Store a ``.thaw`` file sent as the request body, verified and checked against the engine."""
        tmp = self.store / f"{partial_prefix()}{os.urandom(8).hex()}.partial"
        written = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    written += len(chunk)
                    if written > self.max_nbytes:
                        raise SnapshotWriteError(
                            f"the upload is larger than the store's budget of {self.max_nbytes:,} bytes"
                        )
                    await asyncio.to_thread(out.write, chunk)

            def check() -> dict[str, Any]:
                manifest = read_kv_manifest(tmp)
                check_compatible(manifest.spec, self.spec, path=manifest.snapshot_id)
                verify_regions(manifest.container)
                if manifest.parent is not None:
                    self.chain(manifest.parent.snapshot_id)  # its parent must be here first
                import_snapshot(manifest, self.store)
                return self.info(manifest.snapshot_id).to_json()

            info = await asyncio.to_thread(check)
        finally:
            tmp.unlink(missing_ok=True)
        await asyncio.to_thread(self.enforce_budget)
        return info

    # -- the budget ----------------------------------------------------------------------------
    def enforce_budget(self) -> list[str]:
        """Remove least recently used snapshots (never one in use) until the store fits its budget."""
        infos = self.list()
        total = sum(info.nbytes for info in infos)
        removed: list[str] = []
        for info in sorted(infos, key=lambda i: i.last_used):
            if total <= self.max_nbytes:
                break
            if self.in_use(info.id):
                continue
            with contextlib.suppress(FileNotFoundError):
                snapshot_path(self.store, info.id).unlink()
                total -= info.nbytes
                removed.append(info.id)
                self.evicted = [
                    *self.evicted[-99:],
                    {"id": info.id, "nbytes": info.nbytes, "at": int(time.time())},
                ]
                logger.info(
                    "thaw serve: evicted snapshot %s (%d bytes, last used %s) to keep the store under %d",
                    info.id,
                    info.nbytes,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.last_used)),
                    self.max_nbytes,
                )
        return removed
