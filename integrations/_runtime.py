"""One background event loop thread owning every ChatThaw engine, shared by equal configurations.

vLLM's ``AsyncLLM`` belongs to the event loop it was created on: used from another loop it is
dead. So one daemon thread runs a long-lived loop; sync callers and callers on other loops
submit coroutines to it and wait (``run``), or pull an async stream through it (``iterate``,
``aiterate``). Engines are keyed by their full engine configuration and reference counted;
the last ``release`` shuts an engine down, and interpreter exit shuts down whatever is left.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["EngineHandle", "Runtime", "runtime"]


class Runtime:
    """The background loop thread (created on first use)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._thread or not self._thread.is_alive():
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    ready.set()
                    loop.run_forever()

                self._thread = threading.Thread(target=main, name="thaw-agents-engine-loop", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the background loop and wait for it (from any thread but that one)."""
        if self.in_loop_thread():
            raise RuntimeError("a synchronous ChatThaw call from inside its own engine loop would deadlock")
        return self.submit(coro).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` from another event loop."""
        if self._loop is not None and asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def iterate(self, agen_factory: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Iterate an async generator that lives on the background loop, synchronously."""
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()

        async def pump() -> None:
            try:
                async for item in agen_factory():
                    items.put(("item", item))
                    if stop.is_set():
                        break
            except BaseException as exc:  # delivered to the consumer thread
                items.put(("error", exc))
            else:
                items.put(("done", None))

        future = self.submit(pump())
        try:
            while True:
                kind, value = items.get()
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            stop.set()
            if not future.done():
                future.cancel()

    async def aiterate(self, agen_factory: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
        """Iterate an async generator on the background loop from another event loop."""
        if self._loop is not None and asyncio.get_running_loop() is self._loop:
            async for item in agen_factory():
                yield item
            return
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        caller = asyncio.get_running_loop()

        async def pump() -> None:
            try:
                async for item in agen_factory():
                    caller.call_soon_threadsafe(items.put_nowait, ("item", item))
            except BaseException as exc:
                caller.call_soon_threadsafe(items.put_nowait, ("error", exc))
            else:
                caller.call_soon_threadsafe(items.put_nowait, ("done", None))

        future = self.submit(pump())
        try:
            while True:
                kind, value = await items.get()
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            if not future.done():
                future.cancel()


runtime = Runtime()


@dataclass
class EngineHandle:
    """A shared ``AsyncLLM`` and what ChatThaw needs beside it."""

    key: str
    engine: Any  # vllm.v1.engine.async_llm.AsyncLLM
    model_name: str
    max_model_len: int
    refs: int = 0
    closed: bool = False


_engines: dict[str, Future[EngineHandle]] = {}
_engines_lock = threading.Lock()


def config_key(engine_kwargs: dict[str, Any]) -> str:
    return json.dumps(engine_kwargs, sort_keys=True, default=str)


async def _start(key: str, engine_kwargs: dict[str, Any]) -> EngineHandle:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(**engine_kwargs)
    engine = AsyncLLM.from_engine_args(args)
    config = engine.vllm_config.model_config
    handle = EngineHandle(
        key=key,
        engine=engine,
        model_name=config.served_model_name or config.model,
        max_model_len=config.max_model_len,
    )
    # vLLM keeps a reference to this frame; with the engine among its locals, release_key could
    # not finalise the engine, and AsyncLLM.__del__ failed later during interpreter teardown.
    del engine, config
    return handle


def acquire(engine_kwargs: dict[str, Any]) -> Future[EngineHandle]:
    """The shared engine for this configuration, starting it on first use (a future)."""
    key = config_key(engine_kwargs)
    with _engines_lock:
        future = _engines.get(key)
        if future is None or (future.done() and (future.exception() or future.result().closed)):
            future = runtime.submit(_start(key, engine_kwargs))
            _engines[key] = future
        return future


def release_key(key: str) -> None:
    """Shut the engine for ``key`` down (ChatThaw.close on the last user)."""
    with _engines_lock:
        future = _engines.pop(key, None)
    if future is None or not future.done() or future.exception():
        return
    handle = future.result()
    handle.closed = True

    async def stop() -> None:
        # Stop the output handler first: killed engine processes would otherwise surface as an
        # EngineDeadError logged from it during interpreter exit.
        handler = getattr(handle.engine, "output_handler", None)
        if handler is not None and not handler.done():
            handler.cancel()
            with contextlib.suppress(BaseException):
                await handler
        handle.engine.shutdown()

    try:
        # Shut down on the loop that owns the engine, then drop it.
        runtime.run(stop(), timeout=60)
    except Exception as exc:  # pragma: no cover - best effort at shutdown
        logger.debug("engine shutdown: %s", exc)
    handle.engine = None
    gc.collect()  # finalise the AsyncLLM now, not during interpreter teardown


def shutdown_all() -> None:
    for key in list(_engines):
        release_key(key)


atexit.register(shutdown_all)

_ = Awaitable  # re-exported type for callers' annotations
