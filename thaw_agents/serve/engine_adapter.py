"""``fork()``'s engine front for the server's ``EngineClient`` (an ``AsyncLLM``).

``fork`` is synchronous and runs in a worker thread; each engine call is sent to the
server's event loop, which owns the engine, and waited for there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

from .._errors import ConfigError
from ..front import AsyncLLMFront

__all__ = ["ServerEngineAdapter"]

_TIMEOUT_S = 600.0


class ServerEngineAdapter(AsyncLLMFront):
    """The front of the server's engine on ``loop``, for ``fork`` in a worker thread.

    ``describe`` is the server's own ``thaw_describe`` reply (taken once at start-up).
    """

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, describe: dict[str, Any]) -> None:
        def run(coro: Coroutine[Any, Any, Any]) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(_TIMEOUT_S)

        super().__init__(engine, run=run)
        self._reply = describe

    def prefix_token_ids(self, prefix: Any, tools: Sequence[Any] | None = None) -> list[int]:
        # As the server's chat route renders a request's messages (vLLM's renderer, no tools).
        if isinstance(prefix, str):
            return self.encode(prefix)
        if isinstance(prefix, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prefix):
            return list(prefix)
        if isinstance(prefix, list) and prefix and all(isinstance(m, dict) for m in prefix):

            async def render() -> list[int]:
                from vllm.renderers import ChatParams

                _, prompts = await self._engine.renderer.render_chat_async(
                    [prefix], ChatParams(chat_template_kwargs={"add_generation_prompt": False})
                )
                return list(prompts[0]["prompt_token_ids"])

            return self._run(render())
        raise ConfigError("a snapshot is made of 'messages', a 'prompt' string or 'prompt_token_ids'")
