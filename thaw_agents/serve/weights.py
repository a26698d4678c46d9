"""Named weights snapshots behind one served engine: which one is loaded, and fair switching.

``thaw-agents serve MODEL --weights NAME=FILE ...`` registers weights files of MODEL's
architecture; the first is swapped in at start. A completion request whose ``model`` is a
registered name runs on those weights (:mod:`.model_select` rewrites ``model`` to the engine's
served name and holds a :meth:`WeightsService.use` lease around the request).

Switching, in arrival order and without starvation: a request for the loaded weights runs at
once unless requests for other weights are already waiting; those queue in arrival order.
When the head of the queue wants other weights, the server waits for the requests of the
loaded weights to finish, swaps (:func:`thaw_agents.aswap_weights`, the verified restore),
then admits every consecutive waiting request for the new weights together.

``POST /v1/thaw/weights`` registers more at run time: a file inside one of the allowed folders
(the folders of the ``--weights`` files and ``--weights-dir``), checked before it is listed: a
valid weights file with the same tensors, dtypes and shapes as the served model's.

Example:
    >>> service = WeightsService(engine, {"policy-a": "/w/a.thaw"}, ["/w"])   # doctest: +SKIP
    >>> async with service.use("policy-a"):                                  # doctest: +SKIP
    ...     ...  # the engine now serves policy-a's weights
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import ConfigError, SnapshotMismatchError
from ..weights import WeightsManifest, read_weights_manifest, weights_fingerprint

__all__ = ["WEIGHTS_ENV", "WeightsService", "parse_weights_args"]

logger = logging.getLogger(__name__)
WEIGHTS_ENV = "THAW_AGENTS_SERVE_WEIGHTS"  # JSON {"names": {name: path}, "folders": [...]}
_MAX_NAME = 128


def _check_name(name: str) -> str:
    if not name or len(name) > _MAX_NAME or not all(c.isalnum() or c in "-_.:/" for c in name):
        raise ConfigError(f"weights name {name[:80]!r}: use 1-{_MAX_NAME} letters, digits and - _ . : / only")
    return name


def parse_weights_args(values: list[str]) -> dict[str, str]:
    """``["NAME=FILE", ...]`` -> ``{name: absolute path}``; each file's header is read (a
    typed error before the server starts when one is missing or not a weights file)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise ConfigError(f"--weights {value!r}: write NAME=FILE")
        if _check_name(name) in out:
            raise ConfigError(f"--weights: the name {name!r} is given twice")
        path = os.path.abspath(os.path.expanduser(path))
        read_weights_manifest(path)
        out[name] = path
    return out


@dataclass(slots=True)
class _Entry:
    name: str
    path: str
    manifest: WeightsManifest
    registered: float = field(default_factory=time.time)


class WeightsService:
    """The served engine's named weights (see the module docstring)."""

    def __init__(
        self,
        engine: Any,
        names: dict[str, str],
        folders: list[str],
        *,
        served_name: str = "",
        on_swap: Any = None,
    ) -> None:
        self.engine = engine
        self.served_name = served_name  # what vLLM's server calls the engine's model
        self.folders = [os.path.realpath(f) for f in folders]
        self._entries: dict[str, _Entry] = {}
        for name, path in names.items():
            self._entries[name] = _Entry(name, path, read_weights_manifest(path))
        self._first = next(iter(self._entries), None)
        self.loaded: str | None = None
        self.swaps = 0
        self._on_swap = on_swap  # called with the new fingerprint after every swap
        self._active = 0  # admitted requests not finished, all for ``loaded``
        self._swapping = False
        self._queue: deque[tuple[str, asyncio.Future[None]]] = deque()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    async def start(self) -> None:
        """Swap the first registered weights in (the engine started on the model's own)."""
        if self._first is not None:
            await self._swap(self._first)

    # -- registry ------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        return [
            {
                "id": e.name,
                "object": "model",
                "created": int(e.registered),
                "owned_by": "thaw-agents",
                "loaded": e.name == self.loaded,
                "fingerprint": weights_fingerprint(e.manifest),
                "nbytes": e.manifest.nbytes,
            }
            for e in self._entries.values()
        ]

    def register(self, name: str, path: str) -> dict[str, Any]:
        """Add ``name`` -> ``path`` (inside an allowed folder, the served architecture).

        Raises:
            ConfigError: a bad name, a name taken, or a path outside the allowed folders.
            SnapshotError: not a weights file, or other tensors (``SnapshotMismatchError``).
        """
        _check_name(name)
        if name in self._entries:
            raise ConfigError(f"the weights name {name!r} is registered already")
        real = os.path.realpath(path) if os.path.isabs(path) else ""
        if not real or not any(Path(real).is_relative_to(folder) for folder in self.folders):
            raise ConfigError(
                "path must be an absolute path inside the server's weights folders "
                f"({', '.join(self.folders) or 'none: start the server with --weights-dir'})"
            )
        manifest = read_weights_manifest(real)
        reference = next(iter(self._entries.values()), None)
        if reference is not None:
            _same_tensors(reference.manifest, manifest)
        self._entries[name] = _Entry(name, real, manifest)
        return next(m for m in self.list() if m["id"] == name)

    # -- leases ----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[None]:
        """Hold the engine on ``name``'s weights for one request (swapping first if needed)."""
        await self._acquire(name)
        try:
            yield
        finally:
            self._active -= 1
            self._advance()

    async def _acquire(self, name: str) -> None:
        if not self._queue and not self._swapping and name == self.loaded:
            self._active += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((name, future))
        self._advance()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._active -= 1  # admitted just as the client went away
            with contextlib.suppress(ValueError):
                self._queue.remove((name, future))
            self._advance()
            raise

    def _advance(self) -> None:
        while self._queue and self._queue[0][1].done():  # cancelled waiters
            self._queue.popleft()
        if self._swapping or not self._queue:
            return
        head = self._queue[0][0]
        if head == self.loaded:
            while self._queue and self._queue[0][0] == head:
                _, future = self._queue.popleft()
                if not future.done():
                    self._active += 1
                    future.set_result(None)
            return
        if self._active == 0:
            self._swapping = True
            asyncio.get_running_loop().create_task(self._swap_for_queue(head))

    async def _swap_for_queue(self, name: str) -> None:
        try:
            await self._swap(name)
        except Exception as exc:  # every waiter for these weights gets the error
            logger.error("thaw serve: swapping in %s failed: %s", name, exc)
            for waiter_name, future in list(self._queue):
                if waiter_name == name and not future.done():
                    future.set_exception(exc)
            self._queue = deque(item for item in self._queue if item[0] != name)
        finally:
            self._swapping = False
            self._advance()

    async def _swap(self, name: str) -> None:
        from ..front import AsyncLLMFront
        from ..weights import aswap_weights

        entry = self._entries[name]
        result = await aswap_weights(AsyncLLMFront(self.engine), entry.path)
        self.loaded = name
        self.swaps += 1
        if self._on_swap is not None:
            self._on_swap(result.fingerprint)
        logger.info(
            "thaw serve: %s loaded (%.3f s restore, %.3f s swap)", name, result.restore_s, result.total_s
        )


def _same_tensors(reference: WeightsManifest, other: WeightsManifest) -> None:
    mine = {e.name: (e.dtype, e.shape) for e in reference.tensors}
    theirs = {e.name: (e.dtype, e.shape) for e in other.tensors}
    if mine != theirs:
        differ = sorted(set(mine) ^ set(theirs)) or sorted(n for n in mine if mine[n] != theirs[n])
        raise SnapshotMismatchError(
            "tensors",
            f"the served model's {len(mine)} tensors",
            f"{len(theirs)} tensors, differing at {differ[:3]}",
            path=other.path,
            hint="register weights of the served model's architecture and dtype",
        )
