"""``fork()``'s engine adapter for the server's ``EngineClient`` (an ``AsyncLLM``).

``fork`` is synchronous and runs in a worker thread; each engine call is sent to the
server's event loop, which owns the engine, and waited for there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any

from .._adapter import PrefixRun, thaw_report
from .._errors import ConfigError, EngineError

__all__ = ["ServerEngineAdapter"]

_TIMEOUT_S = 600.0


class ServerEngineAdapter:
    """The adapter protocol of :mod:`thaw_agents._adapter` over an async engine on ``loop``."""

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, describe: dict[str, Any]) -> None:
        self._engine = engine
        self._loop = loop
        self._describe = describe

    def _thaw_adapter(self) -> ServerEngineAdapter:
        return self

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_TIMEOUT_S)

    def describe(self) -> dict[str, Any]:
        return self._describe

    def prefix_token_ids(self, prefix: Any) -> list[int]:
        if isinstance(prefix, str):
            return list(self._engine.get_tokenizer().encode(prefix))
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

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> PrefixRun:
        async def run() -> PrefixRun:
            from vllm import SamplingParams, TokensPrompt
            from vllm.sampling_params import RequestOutputKind

            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                output_kind=RequestOutputKind.FINAL_ONLY,
                extra_args={"kv_transfer_params": kv_transfer_params},
            )
            result = PrefixRun(0)
            async for output in self._engine.generate(
                TokensPrompt(prompt_token_ids=token_ids), params, f"thaw-snapshot-{uuid.uuid4().hex}"
            ):
                if output.outputs and output.outputs[0].finish_reason == "error":
                    raise EngineError("the engine failed the snapshot request")
                result = PrefixRun(int(output.num_cached_tokens or 0), thaw_report(output.kv_transfer_params))
            return result

        return self._run(run())

    def save_result(self, snapshot_id: str) -> dict[str, Any] | None:
        """The engine's result for a save of ``snapshot_id``; None while it is being written."""
        return self._run(self._engine.collective_rpc("thaw_save_result", args=(snapshot_id,)))[0]
