"""The front of a vLLM ``AsyncLLM``: one async generator per request.

``AsyncLLM`` belongs to the event loop it was created on. The async methods (``a``-prefixed)
run on that loop; the synchronous ones (what ``fork`` and ``hydrate`` call) hand their
coroutine to ``run``, the caller's way of running a coroutine on the engine's loop and
waiting for it (ChatThaw's background loop, the server's loop).

Example:
    >>> front = AsyncLLMFront(engine)                                          # doctest: +SKIP
    >>> async for delta in front.astream(Request(token_ids=ids, params=params), timeout_s=30):
    ...     print(delta.text, end="")                                          # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from .._errors import ConfigError, EngineError
from ._base import (
    ANNOUNCE_PROMPT,
    Collector,
    Delta,
    Front,
    Request,
    RequestTimeoutError,
    Result,
    announce_params,
    deltas,
    describe_reply,
    engine_failure,
    engine_params,
)
from ._capacity import Capacity, read_capacity

__all__ = ["AsyncLLMFront"]

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, Any]], Any]


class AsyncLLMFront(Front):
    """The front of an ``AsyncLLM`` (or of one that an async ``factory`` returns when first needed).

    Args:
        engine: the ``AsyncLLM``; or None with ``factory``.
        run: runs a coroutine on the engine's loop and returns its result, from another thread;
            needed by the synchronous methods only.
        factory: awaited for the engine on first use (ChatThaw starts its engine lazily).
        tools: the tools a message prefix is rendered with when ``prefix_token_ids`` names none
            (a ChatThaw bound with ``bind_tools``).
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        run: Runner | None = None,
        factory: Callable[[], Awaitable[Any]] | None = None,
        tools: Sequence[Any] | None = None,
    ) -> None:
        if (engine is None) == (factory is None):
            raise ConfigError("pass an AsyncLLM or a factory of one")
        self._engine = engine
        self._factory = factory
        self._run_on_loop = run
        self._tools = tools

    async def engine(self) -> Any:
        """The ``AsyncLLM`` (started by the factory on first use)."""
        if self._engine is None:
            assert self._factory is not None
            self._engine = await self._factory()
        return self._engine

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._run_on_loop is None:
            coro.close()
            raise ConfigError("this AsyncLLM front has no loop runner: use its async methods (a...)")
        return self._run_on_loop(coro)

    # -- requests -------------------------------------------------------------------------------
    async def astream(self, request: Request, *, timeout_s: float | None = None) -> AsyncIterator[Delta]:
        """The request's outputs as they come, one :class:`Delta` per sample and step.

        Raises:
            RequestTimeoutError: past ``timeout_s`` (the request was aborted).
            EngineError: the engine failed the request or died.
            ConfigError: vLLM refused the request.

        Stopping the iteration early, or cancelling its task, aborts the request.
        """
        from vllm.sampling_params import RequestOutputKind

        async for output in self._outputs(request, RequestOutputKind.DELTA, timeout_s):
            for delta in deltas(output):
                yield delta

    async def agenerate(
        self, requests: Sequence[Request], *, timeout_s: float | None = None, stream: bool = True
    ) -> list[Result]:
        """:meth:`generate` on the engine's loop: the requests run concurrently, results in order."""
        start = time.perf_counter()
        return list(await asyncio.gather(*(self._one(r, start, timeout_s, stream) for r in requests)))

    def generate(
        self, requests: Sequence[Request], *, timeout_s: float | None = None, stream: bool = True
    ) -> list[Result]:
        return self._run(self.agenerate(requests, timeout_s=timeout_s, stream=stream))

    def announce(self, kv_transfer_params: dict[str, Any]) -> None:
        self._run(self.aannounce(kv_transfer_params))

    async def aannounce(self, kv_transfer_params: dict[str, Any]) -> None:
        """:meth:`announce` on the engine's loop."""
        from vllm import TokensPrompt

        engine = await self.engine()
        request_id = f"thaw-{uuid.uuid4().hex}"
        prompt = TokensPrompt(prompt_token_ids=list(ANNOUNCE_PROMPT))
        await engine.add_request(request_id, prompt, announce_params(kv_transfer_params))
        await engine.abort(request_id)

    async def _one(self, request: Request, start: float, timeout_s: float | None, stream: bool) -> Result:
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        collector = Collector(len(request.token_ids), start)
        async for output in self._outputs(request, kind, timeout_s):
            collector.add(output, timed=stream)
        if collector.error:
            raise EngineError("the engine failed this request (finish_reason='error'); see the engine log")
        return collector.result()

    async def _outputs(self, request: Request, kind: Any, timeout_s: float | None) -> AsyncIterator[Any]:
        """The request's ``RequestOutput`` values; engine failures as typed errors; a timeout,
        a cancellation or an early stop aborts the request."""
        from vllm import TokensPrompt

        engine = await self.engine()
        request_id = f"thaw-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + float(timeout_s)
        params = engine_params(request, kind)
        params.skip_clone = True  # a private copy already: AsyncLLM need not deep-copy it again
        stream = engine.generate(TokensPrompt(prompt_token_ids=list(request.token_ids)), params, request_id)
        try:
            if deadline is None:  # no task per output (wait_for makes one): this is the hot path
                async for output in stream:
                    yield output
                return
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    output = await asyncio.wait_for(anext(stream), remaining)
                except StopAsyncIteration:
                    return
                yield output
        except asyncio.TimeoutError as exc:
            await engine.abort(request_id)
            raise RequestTimeoutError(f"the request timed out after {timeout_s} s and was aborted") from exc
        except (asyncio.CancelledError, GeneratorExit):
            await engine.abort(request_id)
            raise
        except Exception as exc:
            failure = engine_failure(exc)
            if failure is None:
                raise
            raise failure from exc
        finally:
            await stream.aclose()

    # -- tokens and RPCs --------------------------------------------------------------------------
    def _engine_now(self) -> Any:
        """The engine, from a thread other than its loop's (started there if it is not yet)."""
        return self._engine if self._engine is not None else self._run(self.engine())

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self._engine_now().get_tokenizer()
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def prefix_token_ids(self, prefix: Any, tools: Sequence[Any] | None = None) -> list[int]:
        return super().prefix_token_ids(prefix, self._tools if tools is None else tools)

    def _render(self, messages: list[Any], tools: Sequence[Any] | None) -> list[int]:
        return self._run(self.arender(messages, tools))

    async def arender(self, messages: list[Any], tools: Sequence[Any] | None) -> list[int]:
        """Chat messages and tools as a prefix's token ids (no generation prompt)."""
        from ..chat import arender

        engine = await self.engine()
        return await arender(engine.renderer, messages, tools, add_generation_prompt=False)

    async def arpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """One of thaw's worker RPCs (``thaw_describe``, ``thaw_save_result``): every worker's reply."""
        engine = await self.engine()
        return list(await engine.collective_rpc(method, args=args))

    def _rpc(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        return self._run(self.arpc(method, args))

    async def adescribe(self) -> dict[str, Any]:
        """:meth:`describe` on the engine's loop."""
        if self._reply is None:
            self._reply = describe_reply(await self.arpc("thaw_describe"))
        return self._reply

    def capacity(self) -> Capacity:
        return read_capacity(self._engine_now())

    def _model_config(self) -> Any:
        return self._engine_now().model_config

    def _cache_config(self) -> Any:
        return self._engine_now().vllm_config.cache_config
