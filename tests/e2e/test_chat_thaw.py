"""ChatThaw behaviour that does not depend on the model's intelligence, on the real engine."""

from __future__ import annotations

import asyncio
import warnings

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from vllm import SamplingParams, TokensPrompt

import thaw_agents
from thaw_agents.integrations.langchain import ChatThaw

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chat():
    model = ChatThaw(temperature=0, max_tokens=24)
    yield model
    model.close()


@tool
def get_weather(city: str, unit: str) -> str:
    """Get the current weather in a city, in celsius or fahrenheit."""
    return f"20 degrees {unit} in {city}"


def test_invoke_reports_usage_and_metadata(chat: ChatThaw) -> None:
    message = chat.invoke("Name a colour.")
    assert isinstance(message, AIMessage) and message.content
    usage = message.usage_metadata
    assert usage["input_tokens"] > 5 and 0 < usage["output_tokens"] <= 24
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert "cache_read" in usage["input_token_details"]
    meta = message.response_metadata
    assert meta["model_provider"] == "thaw" and meta["finish_reason"] in {"stop", "length"}
    assert meta["model_name"] == "SmolLM2-135M-Instruct"


def test_stream_yields_real_token_chunks(chat: ChatThaw) -> None:
    chunks = list(chat.stream("Count from one to ten in words."))
    assert len(chunks) >= 5
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata
    assert all(c.usage_metadata is None for c in chunks[:-1])
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == "".join(c.content for c in chunks)


def test_invoke_answers_what_stream_streams(chat: ChatThaw) -> None:
    """invoke asks vLLM for the final output only; stream reads every step: the same answer."""
    prompt, kw = "Count from one to five in words.", {"max_tokens": 16, "temperature": 0}
    chat.invoke(prompt, **kw)  # both calls below then find the same prompt blocks cached
    streamed = list(chat.stream(prompt, **kw))
    invoked = chat.invoke(prompt, **kw)
    assert invoked.content == "".join(c.content for c in streamed) and invoked.content
    assert invoked.usage_metadata == streamed[-1].usage_metadata
    assert invoked.response_metadata["finish_reason"] == streamed[-1].response_metadata["finish_reason"]


async def test_concurrent_calls_keep_their_own_parameters(chat: ChatThaw) -> None:
    lengths = [3, 5, 7, 9, 11, 13, 15, 17]
    results = await asyncio.gather(
        *[
            chat.ainvoke(f"Write a long story about the number {n}.", max_tokens=n, temperature=0.1 * i)
            for i, n in enumerate(lengths)
        ]
    )
    assert [r.usage_metadata["output_tokens"] for r in results] == lengths


def test_stop_sequence_per_call(chat: ChatThaw) -> None:
    message = chat.invoke("List three fruits, one per line, numbered.", stop=["2."], max_tokens=40)
    assert "2." not in message.content


def test_sync_batch_and_async_batch(chat: ChatThaw) -> None:
    outs = chat.batch(["Say hi.", "Say bye."])
    assert len(outs) == 2 and all(o.content for o in outs)
    outs = asyncio.run(chat.abatch(["Say yes.", "Say no."]))
    assert len(outs) == 2 and all(o.content for o in outs)


def test_forced_tool_call_is_always_valid(chat: ChatThaw) -> None:
    """Constrained decoding: even a 135M model returns a call matching the tool's schema."""
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    message = bound.invoke("What's the weather in Paris?", max_tokens=60)
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert all(isinstance(v, str) for v in call["args"].values())
    streamed = None
    for chunk in bound.stream("Weather in Rome?", max_tokens=60):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls and streamed.tool_calls[0]["name"] == "get_weather"


def test_unknown_tool_choice_is_refused(chat: ChatThaw) -> None:
    with pytest.raises(ValueError, match="not among the bound tools"):
        chat.bind_tools([get_weather], tool_choice="no_such_tool")


def test_tool_parser_reads_scripted_text(chat: ChatThaw) -> None:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from thaw_agents.integrations._tools import parse_tool_calls

    tools = [convert_to_openai_tool(get_weather)]
    from thaw_agents.integrations._request import local_tokenizer

    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    text = f"Let me check.<tool_call>{call}</tool_call>"
    content, calls, invalid = parse_tool_calls(
        text, tools, local_tokenizer(chat._engine_args()["model"]), "hermes"
    )
    assert calls[0]["name"] == "get_weather" and calls[0]["args"] == {"city": "Oslo", "unit": "celsius"}
    assert invalid == [] and "Let me check." in content


def _tool_history(trunk_text: str, tag: str) -> list:
    """A conversation with one tool call and its (long) result, unique per ``tag``."""
    call = {"name": "get_weather", "args": {"city": "Oslo", "unit": "celsius"}, "id": "call_1"}
    return [
        SystemMessage(f"You are a weather assistant ({tag})."),
        HumanMessage("Weather in Oslo? Also read the attached notes."),
        AIMessage("", tool_calls=[call]),
        ToolMessage(f"20 degrees celsius in Oslo. Notes: {trunk_text}", tool_call_id="call_1"),
        AIMessage("It is 20 degrees celsius in Oslo."),
    ]


def test_required_tool_choice_returns_valid_calls(chat: ChatThaw) -> None:
    """``tool_choice="required"``: one or more calls, each matching the schema; with
    ``parallel_tool_calls=False`` exactly one."""
    several = chat.bind_tools([get_weather], tool_choice="required").invoke("Weather in Oslo?", max_tokens=80)
    assert several.tool_calls and several.invalid_tool_calls == []
    assert all(set(c["args"]) == {"city", "unit"} for c in several.tool_calls)
    one = chat.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False)
    message = one.invoke("Weather in Oslo?", max_tokens=60)
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "get_weather"


def test_fork_of_a_tool_history_serves_chatthaw_every_snapshot_token(
    chat: ChatThaw, llm, trunk_text: str
) -> None:
    """fork(vllm.LLM, history as OpenAI dicts) and ChatThaw (LangChain messages) render the
    same tokens: ChatThaw's engine loads the whole snapshot of the tool-call history."""
    from langchain_core.messages import convert_to_openai_messages

    history = _tool_history(trunk_text, "history")
    handle = thaw_agents.fork(llm, convert_to_openai_messages(history))
    assert handle.num_snapshot_tokens >= 1024
    message = chat.invoke([*history, HumanMessage("And tomorrow?")], fork=handle.id, max_tokens=2)
    assert message.usage_metadata["input_token_details"]["cache_read"] >= handle.num_snapshot_tokens


def test_tool_calling_branch_from_a_trunk_forked_with_the_same_tools(
    chat: ChatThaw, llm, trunk_text: str
) -> None:
    """A trunk forked with the tools a branch binds serves the branch every full block; the
    bound model forks with its tools just as fork(..., tools=) does."""
    trunk = _tool_history(trunk_text, "tools")
    agent = chat.bind_tools([get_weather], tool_choice="get_weather")
    handle = thaw_agents.fork(llm, trunk, tools=[get_weather])  # another engine: the snapshot serves it
    message = agent.invoke([*trunk, HumanMessage("And in Bergen?")], fork=handle.id, max_tokens=60)
    assert message.usage_metadata["input_token_details"]["cache_read"] >= handle.num_snapshot_tokens
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert thaw_agents.fork(agent, trunk).token_ids == handle.token_ids


class Rating(BaseModel):
    """A rating of a text."""

    stars: int = Field(ge=1, le=5)
    verdict: str = Field(pattern="^(good|bad)$")


def test_structured_output_is_enforced(chat: ChatThaw) -> None:
    structured = chat.with_structured_output(Rating)
    result = structured.invoke("Rate this sentence: 'The cat sat.'", max_tokens=40)
    assert isinstance(result, Rating) and 1 <= result.stars <= 5
    raw = chat.with_structured_output(Rating, include_raw=True).invoke("Rate 'hello'.", max_tokens=40)
    assert isinstance(raw["parsed"], Rating) and raw["parsing_error"] is None
    as_tool = chat.with_structured_output(Rating, method="function_calling").invoke(
        "Rate 'x'.", max_tokens=60
    )
    assert isinstance(as_tool, Rating)


def test_cache_read_reports_the_prefix_cache(chat: ChatThaw, trunk_text: str) -> None:
    messages = [SystemMessage(trunk_text), HumanMessage("One word?")]
    chat.invoke(messages, max_tokens=2)
    second = chat.invoke(messages, max_tokens=2)
    assert second.usage_metadata["input_token_details"]["cache_read"] >= 1000


def test_fork_from_llm_serves_chatthaw_from_the_snapshot(chat: ChatThaw, llm, trunk_text: str) -> None:
    """A trunk forked in a vllm.LLM engine is loaded by ChatThaw's engine from the snapshot."""
    trunk = [SystemMessage("You review code. " + trunk_text)]
    handle = thaw_agents.fork(llm, [{"role": "system", "content": trunk[0].content}])
    message = chat.invoke([*trunk, HumanMessage("Any bug?")], fork=handle.id, max_tokens=4)
    assert message.usage_metadata["input_token_details"]["cache_read"] >= handle.num_snapshot_tokens
    assert message.response_metadata["fork"] == handle.id


def test_fork_from_chatthaw_hydrates_into_llm(chat: ChatThaw, llm) -> None:
    prefix = [SystemMessage("You are a travel agent. " + "Flights, hotels and trains. " * 60)]
    handle = thaw_agents.fork(chat, prefix)
    assert handle.num_snapshot_tokens >= 256
    llm.reset_prefix_cache()
    assert handle.hydrate(llm) == handle.num_snapshot_tokens
    prompt = TokensPrompt(prompt_token_ids=[*handle.token_ids, 13])
    out = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == handle.num_snapshot_tokens


def test_a_snapshot_hydrated_into_chatthaw_serves_its_next_call(chat: ChatThaw, llm) -> None:
    """hydrate() on ChatThaw's AsyncLLM engine runs nothing; the next call loads the prefix."""
    prefix = [SystemMessage("You are a ship's navigator. " + "Charts, tides and stars. " * 60)]
    handle = thaw_agents.fork(llm, prefix)
    assert handle.hydrate(chat) == handle.num_snapshot_tokens >= 256
    message = chat.invoke([*prefix, HumanMessage("Where are we?")], max_tokens=2)
    assert message.usage_metadata["input_token_details"]["cache_read"] >= handle.num_snapshot_tokens


def test_missing_fork_falls_back_with_a_warning(chat: ChatThaw) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = chat.invoke("Hello", fork="thaw-" + "f" * 32, max_tokens=3)
    assert message.content is not None
    assert any("prefilling instead" in str(w.message) for w in caught)


def test_bad_input_gives_clear_errors_and_the_engine_keeps_serving(chat: ChatThaw) -> None:
    with pytest.raises(thaw_agents.ConfigError, match="context length"):
        chat.invoke("word " * 9000)
    with pytest.raises(thaw_agents.ConfigError, match="sampling"):
        chat.invoke("Hi", temperature=-1.0)
    closed = ChatThaw(temperature=0)
    closed.close()
    with pytest.raises(thaw_agents.EngineError, match="closed"):
        closed.invoke("Hi")
    assert chat.invoke("Say ok.", max_tokens=3).content


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(thaw_agents.ConfigError, match="failed to start"):
        ChatThaw(model="/nonexistent/model-folder").invoke("Hi")


def test_get_token_ids_uses_the_model_tokenizer(chat: ChatThaw, llm) -> None:
    assert chat.get_token_ids("Hello world") == llm.get_tokenizer().encode("Hello world")


def test_langgraph_messages_stream_mode(chat: ChatThaw) -> None:
    from langgraph.graph import END, START, MessagesState, StateGraph

    def respond(state: MessagesState) -> dict:
        return {"messages": [chat.invoke(state["messages"])]}

    graph = StateGraph(MessagesState).add_node("respond", respond)
    graph = graph.add_edge(START, "respond").add_edge("respond", END).compile()
    pieces = [
        chunk for chunk, _meta in graph.stream({"messages": [("user", "Say hello.")]}, stream_mode="messages")
    ]
    assert len(pieces) >= 2 and "".join(p.content for p in pieces)
