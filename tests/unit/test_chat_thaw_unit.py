"""LangChain's standard unit suite for ChatThaw (construction only: no engine starts here)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from thaw_agents.integrations.langchain import ChatThaw


class TestChatThawUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatThaw]:
        return ChatThaw

    @property
    def chat_model_params(self) -> dict:
        return {"temperature": 0}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        # One engine serves one model; a per-call model name would be a lie.
        return False


def test_construction_is_cheap_and_side_effect_free() -> None:
    from thaw_agents.integrations import _runtime

    before = dict(_runtime._engines)
    llm = ChatThaw(model="/nonexistent/model", temperature=0.3)
    assert llm.model_name == "/nonexistent/model"
    assert _runtime._engines == before  # nothing started


def test_identifying_and_ls_params() -> None:
    llm = ChatThaw(temperature=0.2, max_tokens=7, stop=["\n"])
    assert llm._identifying_params["temperature"] == 0.2
    params = llm._get_ls_params()
    assert params["ls_provider"] == "thaw" and params["ls_max_tokens"] == 7 and params["ls_stop"] == ["\n"]
