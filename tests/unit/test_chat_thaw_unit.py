"""ChatThaw without an engine: construction, tool binding, forced-call schemas, serialisation.

(LangChain's standard unit suite is in tests/unit_tests.)
"""

from __future__ import annotations

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from thaw_agents.integrations.langchain import ChatThaw


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


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


@tool
def get_time(city: str) -> str:
    """Get the local time in a city."""
    return f"noon in {city}"


def _forced(bound) -> dict:
    from thaw_agents.integrations._request import chat_request

    request = chat_request([HumanMessage("Weather in Oslo?")], bound.kwargs)
    assert request.forced
    return request.structured["json"]


def test_required_tool_choice_allows_several_calls_unless_parallel_is_off() -> None:
    llm = ChatThaw(temperature=0)
    several = _forced(llm.bind_tools([get_weather, get_time], tool_choice="required"))
    assert several["type"] == "array" and several["minItems"] == 1 and "maxItems" not in several
    one = _forced(llm.bind_tools([get_weather, get_time], tool_choice="required", parallel_tool_calls=False))
    assert one["anyOf"][0]["properties"]["name"]["enum"] == ["get_weather"]
    assert _forced(llm.bind_tools([get_weather], tool_choice="any"))["type"] == "object"
    any_several = _forced(llm.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=True))
    assert any_several["type"] == "array"
    named = _forced(llm.bind_tools([get_weather, get_time], tool_choice="get_time"))
    assert named["properties"]["name"]["enum"] == ["get_time"]


def test_forced_output_reads_one_or_several_calls() -> None:
    from thaw_agents.integrations._tools import parse_forced_call

    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    calls, invalid = parse_forced_call(f"[{call}, {call.replace('Oslo', 'Bergen')}]")
    assert [c["args"]["city"] for c in calls] == ["Oslo", "Bergen"] and invalid == []
    assert parse_forced_call(call)[0][0]["args"] == {"city": "Oslo"}
    calls, invalid = parse_forced_call("[]")
    assert calls == [] and len(invalid) == 1


def test_parallel_tool_calls_false_keeps_the_first_free_text_call() -> None:
    from thaw_agents.integrations._request import chat_request
    from thaw_agents.integrations._tools import keep_first_call, parse_hermes_calls

    bound = ChatThaw().bind_tools([get_weather, get_time], parallel_tool_calls=False)
    request = chat_request([HumanMessage("Weather and time in Oslo?")], bound.kwargs)
    assert request.single_call and not request.forced
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"city": "Oslo"}}</tool_call>'
    )
    assert len(parse_hermes_calls(text)[1]) == 2
    _, calls, invalid = keep_first_call(parse_hermes_calls(text))
    assert [c["name"] for c in calls] == ["get_weather"] and invalid == []
    assert not chat_request([HumanMessage("Hi")], ChatThaw().bind_tools([get_weather]).kwargs).single_call


def test_serialisation_keeps_the_api_key_out() -> None:
    from langchain_core.load import dumpd, dumps, load

    assert ChatThaw.is_lc_serializable()
    llm = ChatThaw(base_url="http://127.0.0.1:8000", api_key="sk-secret-123", temperature=0.5)
    assert "sk-secret-123" not in dumps(llm)
    data = dumpd(llm)
    assert data["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["THAW_AGENTS_API_KEY"]}
    again = load(
        data,
        secrets_map={"THAW_AGENTS_API_KEY": "sk-secret-123"},
        valid_namespaces=["thaw_agents"],
        allowed_objects=[ChatThaw],
    )
    assert isinstance(again, ChatThaw) and again.temperature == 0.5
    assert again.api_key.get_secret_value() == "sk-secret-123"
    # A bound model serialises as LangChain's own RunnableBinding.
    assert dumpd(llm.bind_tools([get_weather]))["id"][-1] == "RunnableBinding"
