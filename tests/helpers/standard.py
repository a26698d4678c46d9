"""What ChatThaw's LangChain standard-suite classes share: its capabilities and the weak-model xfails.

Both the in-process and the remote (``base_url=``) integration classes, and the unit class, take
their capability flags from :class:`ChatThawCapabilities`; the integration classes add
:class:`SmallModelIntegration` for the cache-read hook and the xfails the 135M default model earns.
List a mixin before the ``langchain_tests`` base so its overrides win::

    class TestChatThaw(SmallModelIntegration, ChatModelIntegrationTests):
        pass
"""

from __future__ import annotations

from typing import Any

import pytest

from thaw_agents import ChatThaw

__all__ = ["SMALL_MODEL", "ChatThawCapabilities", "SmallModelIntegration"]

SMALL_MODEL = "SmolLM2-135M answers too weakly for this check; the plumbing is tested separately"


class ChatThawCapabilities:
    """The model class, its parameters and what it supports, as the standard suites ask."""

    @property
    def connection_params(self) -> dict[str, Any]:
        """Where the model runs: ``{}`` in process, ``{"base_url": ..., "api_key": ...}`` remote."""
        return {}

    @property
    def chat_model_class(self) -> type[ChatThaw]:
        return ChatThaw

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # A mild repetition penalty keeps the 135M model from looping inside JSON strings.
        return {**self.connection_params, "temperature": 0, "repetition_penalty": 1.2}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    @property
    def supports_model_override(self) -> bool:
        return False


class SmallModelIntegration(ChatThawCapabilities):
    """The integration suite's cache-read hook, and xfails for what a 135M model cannot answer."""

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> Any:
        """Two calls over one long system prompt: the second reads it from the prefix cache."""
        from helpers.texts import long_trunk

        llm = ChatThaw(**self.connection_params, temperature=0, max_tokens=8)
        messages = [("system", long_trunk(3)), ("human", "Summarise in one word.")]
        llm.invoke(messages)
        if stream:
            full = None
            for chunk in llm.stream(messages):
                full = chunk if full is None else full + chunk
            return full
        return llm.invoke(messages)

    @pytest.mark.xfail(reason=SMALL_MODEL + ": it picks wrong argument values for the forced call")
    def test_tool_calling(self, model: Any) -> None:
        super().test_tool_calling(model)  # type: ignore[misc]

    @pytest.mark.xfail(reason=SMALL_MODEL + ": it picks wrong argument values for the forced call")
    async def test_tool_calling_async(self, model: Any) -> None:
        await super().test_tool_calling_async(model)  # type: ignore[misc]

    @pytest.mark.xfail(reason=SMALL_MODEL + ": it does not use tool results to answer")
    def test_agent_loop(self, model: Any) -> None:
        super().test_agent_loop(model)  # type: ignore[misc]

    @pytest.mark.xfail(reason=SMALL_MODEL + ": the forced call is valid but its argument is empty")
    def test_bind_runnables_as_tools(self, model: Any) -> None:
        super().test_bind_runnables_as_tools(model)  # type: ignore[misc]

    @pytest.mark.xfail(reason=SMALL_MODEL + ": JSON mode gives valid JSON without the asked-for keys")
    def test_json_mode(self, model: Any) -> None:
        super().test_json_mode(model)  # type: ignore[misc]

    @pytest.mark.xfail(reason=SMALL_MODEL + ": the forced call is valid but it leaves the text empty")
    def test_unicode_tool_call_integration(
        self, model: Any, *, tool_choice: Any = None, force_tool_call: bool = True
    ) -> None:
        super().test_unicode_tool_call_integration(  # type: ignore[misc]
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )
