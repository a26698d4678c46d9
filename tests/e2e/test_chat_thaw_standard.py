"""LangChain's standard integration suite for ChatThaw, on the real engine with the default model.

Every ChatThaw built here has the same engine configuration, so the whole suite shares one
``AsyncLLM``. Tests that need more than a 135M model can do are xfailed with that reason.
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from thaw_agents.integrations.langchain import ChatThaw

pytestmark = pytest.mark.e2e
SMALL_MODEL = "SmolLM2-135M answers too weakly for this check; the plumbing is tested separately"


class TestChatThawIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatThaw]:
        return ChatThaw

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
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def chat_model_params(self) -> dict:
        # A mild repetition penalty keeps the 135M model from looping inside JSON strings.
        return {"temperature": 0, "repetition_penalty": 1.2}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        """Two calls over one long system prompt: the second reads it from the prefix cache."""
        from helpers.texts import long_trunk

        llm = ChatThaw(temperature=0, max_tokens=8)
        messages = [("system", long_trunk(3)), ("human", "Summarise in one word.")]
        llm.invoke(messages)
        if stream:
            full = None
            for chunk in llm.stream(messages):
                full = chunk if full is None else full + chunk
            return full
        return llm.invoke(messages)

    @pytest.mark.xfail(reason=SMALL_MODEL + ": it picks wrong argument values for the forced call")
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=SMALL_MODEL + ": it picks wrong argument values for the forced call")
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=SMALL_MODEL + ": it does not use tool results to answer")
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=SMALL_MODEL + ": the forced call is valid but its argument is empty")
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=SMALL_MODEL + ": JSON mode gives valid JSON without the asked-for keys")
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(reason=SMALL_MODEL + ": the forced call is valid but it leaves the text empty")
    def test_unicode_tool_call_integration(self, model, *, tool_choice=None, force_tool_call=True) -> None:
        super().test_unicode_tool_call_integration(
            model, tool_choice=tool_choice, force_tool_call=force_tool_call
        )
