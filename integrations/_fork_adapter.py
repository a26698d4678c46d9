"""Lets ``thaw_agents.fork`` and ``ForkHandle.hydrate`` work on a ChatThaw's engine."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import thaw_agents
import thaw_agents.chat

from . import _runtime

if TYPE_CHECKING:
    from .langchain import ChatThaw

__all__ = ["ChatThawAdapter", "RemoteAdapter"]


class ChatThawAdapter:
    """The engine adapter protocol of :mod:`thaw_agents` over a ChatThaw's ``AsyncLLM``.

    ``tools``: the tools a bound ChatThaw (``llm.bind_tools(...)``) renders into every call;
    a message prefix forked through it is rendered with them unless ``fork`` names others.
    """

    def __init__(self, chat: ChatThaw, tools: Sequence[Any] | None = None) -> None:
        self._chat = chat
        self._tools = tools

    def describe(self) -> dict[str, Any]:
        """The engine's KV spec and snapshot store (``{"spec": ..., "store": ...}``)."""

        async def describe() -> dict[str, Any]:
            handle = await self._chat._handle()
            replies = await handle.engine.collective_rpc("thaw_describe")
            return replies[0]

        reply = _runtime.runtime.run(describe())
        if "error" in reply:
            raise thaw_agents.ConfigError(reply["error"])
        return reply

    def prefix_token_ids(self, prefix: Any, tools: Sequence[Any] | None = None) -> list[int]:
        if isinstance(prefix, str):
            return self._chat.get_token_ids(prefix)
        if isinstance(prefix, Sequence) and prefix and all(isinstance(t, int) for t in prefix):
            return list(prefix)
        tools = self._tools if tools is None else tools

        async def render() -> list[int]:
            # As a call renders its prompt (_request.prompt_token_ids), without the generation prompt.
            handle = await self._chat._handle()
            return await thaw_agents.chat.arender(
                handle.engine.renderer, prefix, tools, add_generation_prompt=False
            )

        return _runtime.runtime.run(render())

    def run_prefix(
        self, token_ids: list[int], kv_transfer_params: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | None]:
        """Run the prompt for one token: (tokens served from cache or snapshot, thaw report)."""

        async def run() -> tuple[int, dict[str, Any] | None]:
            from vllm import SamplingParams, TokensPrompt
            from vllm.sampling_params import RequestOutputKind

            handle = await self._chat._handle()
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                output_kind=RequestOutputKind.FINAL_ONLY,
                extra_args={"kv_transfer_params": kv_transfer_params},
            )
            cached, report = 0, None
            async for output in handle.engine.generate(
                TokensPrompt(prompt_token_ids=token_ids), params, f"thaw-fork-{uuid.uuid4().hex}"
            ):
                cached = int(output.num_cached_tokens or 0)
                transfer = output.kv_transfer_params
                if isinstance(transfer, dict) and isinstance(transfer.get("thaw"), dict):
                    report = transfer["thaw"]
                if output.outputs and output.outputs[0].finish_reason == "error":
                    raise thaw_agents.EngineError("the engine failed the thaw request")
            return cached, report

        return _runtime.runtime.run(run())

    def save_result(self, snapshot_id: str) -> dict[str, Any] | None:
        """The engine's result for a save of ``snapshot_id``; None while it is being written."""

        async def result() -> dict[str, Any] | None:
            handle = await self._chat._handle()
            return (await handle.engine.collective_rpc("thaw_save_result", args=(snapshot_id,)))[0]

        return _runtime.runtime.run(result())


class RemoteAdapter:
    """The engine adapter of a ``ChatThaw(base_url=...)``: its engine is on the server.

    ``thaw_agents.fork`` does not use it (it calls the ChatThaw's ``_thaw_remote_fork``, which
    snapshots on the server and fetches the file); :meth:`ForkHandle.fork` uses it to tokenize an
    extension with the served tokenizer. Hydrating a served engine from here is not possible: a
    local snapshot reaches the server by id (``fork=handle`` uploads it when the server lacks it).
    """

    def __init__(self, chat: ChatThaw) -> None:
        self._chat = chat

    def describe(self) -> dict[str, Any]:
        raise thaw_agents.ConfigError(
            f"the engine of this ChatThaw is on the server {self._chat.base_url}: snapshot there with "
            "thaw_agents.fork(chat, prefix) and start calls from it with fork=handle or its id "
            "(a local handle the server lacks is uploaded); hydrate() and with_fork() need a local engine"
        )

    def prefix_token_ids(self, prefix: Any, tools: Sequence[Any] | None = None) -> list[int]:
        if isinstance(prefix, str):
            return self._chat.get_token_ids(prefix)
        if isinstance(prefix, Sequence) and all(type(t) is int for t in prefix):
            return list(prefix)
        raise thaw_agents.ConfigError("a served engine's fork extends a handle by a string or token ids")

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> Any:
        return self.describe()
