"""Lets ``thaw_agents.fork`` and ``ForkHandle.hydrate`` work on a ChatThaw's engine."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage, convert_to_messages

import thaw_agents

from . import _runtime
from ._messages import to_chat_dicts

if TYPE_CHECKING:
    from .langchain import ChatThaw

__all__ = ["ChatThawAdapter", "RemoteAdapter"]


class ChatThawAdapter:
    """The engine adapter protocol of :mod:`thaw_agents` over a ChatThaw's ``AsyncLLM``."""

    def __init__(self, chat: ChatThaw) -> None:
        self._chat = chat

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

    def prefix_token_ids(self, prefix: Any) -> list[int]:
        if isinstance(prefix, str):
            return self._chat.get_token_ids(prefix)
        if isinstance(prefix, Sequence) and prefix and all(isinstance(t, int) for t in prefix):
            return list(prefix)
        messages = prefix if all(isinstance(m, BaseMessage) for m in prefix) else convert_to_messages(prefix)

        async def render() -> list[int]:
            from vllm.renderers import ChatParams

            handle = await self._chat._handle()
            _, prompts = await handle.engine.renderer.render_chat_async(
                [to_chat_dicts(messages)], ChatParams(chat_template_kwargs={"add_generation_prompt": False})
            )
            return list(prompts[0]["prompt_token_ids"])

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

    def prefix_token_ids(self, prefix: Any) -> list[int]:
        if isinstance(prefix, str):
            return self._chat.get_token_ids(prefix)
        if isinstance(prefix, Sequence) and all(type(t) is int for t in prefix):
            return list(prefix)
        raise thaw_agents.ConfigError("a served engine's fork extends a handle by a string or token ids")

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> Any:
        return self.describe()
