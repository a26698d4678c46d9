"""The engine fronts of a ChatThaw, through which ``thaw_agents.fork`` and ``ForkHandle.hydrate``
work on its engine (``ChatThaw._thaw_adapter()`` returns one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import thaw_agents
from thaw_agents.front import AsyncLLMFront, Front, Request, Result

from . import _runtime

if TYPE_CHECKING:
    from .langchain import ChatThaw

__all__ = ["ChatThawAdapter", "RemoteAdapter"]


class ChatThawAdapter(AsyncLLMFront):
    """The front of a ChatThaw's ``AsyncLLM``, run on ChatThaw's background loop (the engine
    starts on first use).

    ``tools``: the tools a bound ChatThaw (``llm.bind_tools(...)``) renders into every call;
    a message prefix forked through it is rendered with them unless ``fork`` names others.
    """

    def __init__(self, chat: ChatThaw, tools: Sequence[Any] | None = None) -> None:
        async def engine() -> Any:
            return (await chat._handle()).engine

        super().__init__(factory=engine, run=_runtime.runtime.run, tools=tools)


class RemoteAdapter(Front):
    """The front of a ``ChatThaw(base_url=...)``: its engine is on the server.

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

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._chat.get_token_ids(text)

    def _render(self, messages: list[Any], tools: Sequence[Any] | None) -> list[int]:
        raise thaw_agents.ConfigError("a served engine's fork extends a handle by a string or token ids")

    def generate(
        self, requests: Sequence[Request], *, timeout_s: float | None = None, stream: bool = True
    ) -> list[Result]:
        self.describe()  # raises: requests go to the server through ChatThaw's own calls
        return []

    def _rpc(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        self.describe()
        return []

    def announce(self, kv_transfer_params: dict[str, Any]) -> None:
        self.describe()
