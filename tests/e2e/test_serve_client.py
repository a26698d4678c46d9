"""Clients of ``thaw-agents serve``: the ``openai`` client, ``ChatOpenAI`` and ``ChatThaw(base_url=...)``.

All against the session's real server (the ``server`` fixture: default model, loopback, API key);
no mocks. A branch's ``cached_tokens`` / ``cache_read`` must cover the trunk snapshot's full blocks.
LangChain's standard suite against the server is in ``tests/integration_tests``.
"""

from __future__ import annotations

import asyncio
import operator
import warnings
from typing import Annotated, TypedDict

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel

import thaw_agents
from thaw_agents.integrations.langchain import ChatThaw
from thaw_agents.integrations.langgraph import fork_fanout, fork_sends

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ASPECTS = ["security", "performance", "style", "correctness"]
QUESTION = {"role": "user", "content": "Name one risk in this change."}


@pytest.fixture(scope="module")
def trunk(trunk_text: str) -> list[dict]:
    return [
        {"role": "system", "content": "You review pull requests."},
        {"role": "user", "content": "The change:\n" + trunk_text},
    ]


@pytest.fixture(scope="module")
def snapshot(server, trunk: list[dict]) -> dict:
    status, snap = server.request("POST", "/v1/thaw/snapshots", {"messages": trunk})
    assert status == 200, snap
    assert snap["num_snapshot_tokens"] >= 1000
    return snap


@pytest.fixture(scope="module")
def chat(server, store):
    """A ChatThaw against the server (``store``: a private local store for fetched snapshots)."""
    model = ChatThaw(base_url=server.url, api_key=server.api_key, temperature=0, max_tokens=12)
    yield model
    model.close()


def _extra(snapshot_id: str) -> dict:
    return {"kv_transfer_params": {"thaw": {"snapshot_id": snapshot_id}}}


# -- the openai client -------------------------------------------------------------------------
def test_openai_client_sync_and_streaming_start_from_a_snapshot(server, trunk, snapshot) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key)
    reply = client.chat.completions.create(
        model=server.model,
        messages=[*trunk, QUESTION],
        max_tokens=8,
        temperature=0,
        extra_body=_extra(snapshot["id"]),
    )
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens_details.cached_tokens >= snapshot["num_snapshot_tokens"]
    report = reply.model_extra["kv_transfer_params"]["thaw"]
    assert report["snapshot_id"] == snapshot["id"] and "loaded_tokens" in report

    stream = client.chat.completions.create(
        model=server.model,
        messages=[*trunk, {"role": "user", "content": "Name one strength."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=_extra(snapshot["id"]),
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= snapshot["num_snapshot_tokens"]


def test_openai_client_gets_a_404_for_an_unknown_snapshot(server, trunk) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError, match=r"thaw-0+"):
        client.chat.completions.create(
            model=server.model, messages=trunk, max_tokens=2, extra_body=_extra("thaw-" + "0" * 32)
        )


# -- langchain-openai's ChatOpenAI ---------------------------------------------------------------
def test_chat_openai_with_extra_body_reads_the_snapshot(server, trunk, snapshot) -> None:
    llm = ChatOpenAI(
        base_url=server.url + "/v1",
        api_key=server.api_key,
        model=server.model,
        temperature=0,
        max_tokens=8,
        extra_body=_extra(snapshot["id"]),
    )
    reply = llm.invoke([*trunk, QUESTION])
    assert reply.usage_metadata["input_token_details"]["cache_read"] >= snapshot["num_snapshot_tokens"]
    full = None
    for chunk in llm.stream(
        [*trunk, {"role": "user", "content": "Name one test to add."}], stream_usage=True
    ):
        full = chunk if full is None else full + chunk
    assert full.usage_metadata["input_token_details"]["cache_read"] >= snapshot["num_snapshot_tokens"]


# -- ChatThaw(base_url=...) ----------------------------------------------------------------------
def test_chat_thaw_remote_invoke_stream_and_usage(chat: ChatThaw, server) -> None:
    assert chat.model_name == server.model
    reply = chat.invoke([("system", "You are terse."), ("human", "Name a prime number.")])
    assert isinstance(reply, AIMessage) and reply.content
    assert reply.response_metadata["model_provider"] == "thaw"
    assert reply.response_metadata["finish_reason"] in {"stop", "length"}
    usage = reply.usage_metadata
    assert (
        usage["output_tokens"] >= 1
        and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    )
    chunks = list(chat.stream("Count to five."))
    assert len(chunks) > 2 and "".join(c.content for c in chunks)
    assert chunks[-1].usage_metadata["input_tokens"] > 0
    assert chat.get_num_tokens("hello world") == 2


def test_chat_thaw_remote_cache_read_from_the_prefix_cache(chat: ChatThaw, trunk_text: str) -> None:
    messages = [("system", trunk_text), ("human", "One word.")]
    chat.invoke(messages)
    again = chat.invoke(messages)
    assert again.usage_metadata["input_token_details"]["cache_read"] >= 1000


def test_chat_thaw_remote_async_and_batch(chat: ChatThaw) -> None:
    async def run() -> list[AIMessage]:
        return await chat.abatch(["one", "two", "three"])

    # Two event loops in a row: the async HTTP client is per loop.
    for _ in range(2):
        replies = asyncio.run(run())
        assert len(replies) == 3 and all(r.content for r in replies)
    assert len(chat.batch(["a", "b"])) == 2


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_chat_thaw_remote_tools(chat: ChatThaw) -> None:
    forced = chat.bind_tools([add], tool_choice="add", max_tokens=48).invoke("What is 2 + 3?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "add"
    assert set(forced.tool_calls[0]["args"]) == {"a", "b"}
    chunks = list(chat.bind_tools([add], tool_choice="any", max_tokens=48).stream("Add 4 and 5."))
    assert chunks[-1].tool_call_chunks and chunks[-1].tool_call_chunks[0]["name"] == "add"
    free = chat.bind_tools([add], tool_choice="none").invoke("Say hi.")
    assert not free.tool_calls and free.content


class City(BaseModel):
    city: str


def test_chat_thaw_remote_structured_output(server) -> None:
    # The server's guided JSON may hold free whitespace (its --structured-outputs-config): room for it.
    chat = ChatThaw(base_url=server.url, api_key=server.api_key, temperature=0, max_tokens=64)
    answer = chat.with_structured_output(City).invoke("What is the capital of France?")
    assert isinstance(answer, City) and answer.city
    raw = chat.with_structured_output(City, include_raw=True).invoke("Capital of Italy?")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], City)
    assert isinstance(raw["raw"], AIMessage) and raw["raw"].usage_metadata["output_tokens"] > 0
    as_json = chat.with_structured_output(None, method="json_mode").invoke("A JSON object.")
    assert isinstance(as_json, dict)
    called = chat.with_structured_output(City, method="function_calling").invoke("Capital of Spain?")
    assert isinstance(called, City)


def test_chat_thaw_remote_fork_reads_the_snapshot(chat: ChatThaw, trunk, snapshot) -> None:
    for runnable in (chat, chat.bind(fork=snapshot["id"])):
        kwargs = {"fork": snapshot["id"]} if runnable is chat else {}
        reply = runnable.invoke([*trunk, QUESTION], **kwargs)
        assert reply.response_metadata["fork"] == snapshot["id"]
        assert reply.usage_metadata["input_token_details"]["cache_read"] >= snapshot["num_snapshot_tokens"]


def test_chat_thaw_remote_missing_fork_prefills_with_a_warning(chat: ChatThaw, trunk) -> None:
    missing = "thaw-" + "f" * 32
    with pytest.warns(RuntimeWarning, match=missing):
        reply = chat.invoke([*trunk, QUESTION], fork=missing)
    assert reply.content and reply.response_metadata["fork"] is None

    async def stream() -> list:
        return [c async for c in chat.astream([*trunk, QUESTION], fork=missing)]

    with pytest.warns(RuntimeWarning, match="prefilling"):
        chunks = asyncio.run(stream())
    assert chunks[-1].usage_metadata["output_tokens"] >= 1
    with pytest.warns(RuntimeWarning, match="not a snapshot id"):
        chat.invoke("hi", fork="../etc/passwd")


def test_fork_on_a_remote_chat_gives_a_real_handle(chat: ChatThaw, trunk, server, store) -> None:
    handle = thaw_agents.fork(chat, trunk)
    assert isinstance(handle, thaw_agents.ForkHandle)
    assert handle.path.parent == store and handle.path.exists()
    status, info = server.request("GET", f"/v1/thaw/snapshots/{handle.id}")
    assert status == 200 and info["num_snapshot_tokens"] == handle.num_snapshot_tokens
    assert handle.num_snapshot_tokens >= 1000
    reply = chat.invoke([*trunk, QUESTION], fork=handle)
    assert reply.usage_metadata["input_token_details"]["cache_read"] >= handle.num_snapshot_tokens

    child = thaw_agents.fork(chat, [*trunk, QUESTION], parent=handle)
    assert child.paths[0] == handle.path and len(child.paths) == 2
    assert child.token_ids[: handle.num_tokens] == handle.token_ids
    status, info = server.request("GET", f"/v1/thaw/snapshots/{child.id}")
    assert status == 200 and info["parent"] == handle.id
    with pytest.raises(thaw_agents.ConfigError, match="on the server"):
        handle.hydrate(chat)


def test_a_local_handle_the_server_lacks_is_uploaded(chat: ChatThaw, trunk, server) -> None:
    handle = thaw_agents.fork(chat, [*trunk, {"role": "user", "content": "Upload me."}])
    status, _ = server.request("DELETE", f"/v1/thaw/snapshots/{handle.id}")
    assert status == 200
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the file travels instead
        reply = chat.invoke([*trunk, {"role": "user", "content": "Upload me."}], fork=handle)
    assert reply.response_metadata["fork"] == handle.id
    assert server.request("GET", f"/v1/thaw/snapshots/{handle.id}")[0] == 200


def test_remote_errors_are_typed(server) -> None:
    wrong_key = ChatThaw(base_url=server.url, api_key="wrong", model=server.model, max_tokens=2)
    with pytest.raises(thaw_agents.ConfigError, match="API key"):
        wrong_key.invoke("hi")
    nobody = ChatThaw(base_url="http://127.0.0.1:9", api_key="k", model="m", max_tokens=2)
    with pytest.raises(thaw_agents.EngineError, match="cannot reach"):
        nobody.invoke("hi")
    with pytest.raises(thaw_agents.ConfigError, match="engine_kwargs"):
        ChatThaw(base_url=server.url, engine_kwargs={"max_model_len": 8})
    with pytest.raises(thaw_agents.ConfigError, match="http"):
        ChatThaw(base_url="localhost:8000")


# -- LangGraph -----------------------------------------------------------------------------------
class ReviewState(TypedDict):
    diff: str
    forks: Annotated[list[str], operator.add]
    cache_reads: Annotated[list[int], operator.add]


def test_fork_sends_over_http_in_a_langgraph_graph(chat: ChatThaw, trunk_text: str, server) -> None:
    def trunk_of(diff: str) -> list:
        return [SystemMessage("You review pull requests."), HumanMessage("The change:\n" + diff)]

    def route(state: ReviewState):
        return fork_sends(
            chat, trunk_of(state["diff"]), "review", [{"aspect": a, "diff": state["diff"]} for a in ASPECTS]
        )

    async def review(branch: dict) -> dict:
        messages = [*trunk_of(branch["diff"]), HumanMessage(f"Review only for {branch['aspect']}.")]
        reply = await chat.ainvoke(messages, fork=branch["fork"])
        return {
            "forks": [branch["fork"]],
            "cache_reads": [reply.usage_metadata["input_token_details"]["cache_read"]],
        }

    graph = StateGraph(ReviewState).add_node("review", review)
    graph = graph.add_conditional_edges(START, route, ["review"]).add_edge("review", END).compile()
    result = asyncio.run(graph.ainvoke({"diff": trunk_text, "forks": [], "cache_reads": []}))
    assert len(result["cache_reads"]) == 4 and len(set(result["forks"])) == 1
    fork_id = result["forks"][0]
    status, info = server.request("GET", f"/v1/thaw/snapshots/{fork_id}")
    assert status == 200 and info["num_snapshot_tokens"] >= 1000
    assert all(read >= info["num_snapshot_tokens"] for read in result["cache_reads"]), result["cache_reads"]


def test_fork_fanout_over_http(chat: ChatThaw, trunk) -> None:
    replies = asyncio.run(fork_fanout(chat, trunk, [f"Review for {a}." for a in ASPECTS[:2]]))
    for reply in replies:
        assert reply.response_metadata["placement"] == "server"
        assert reply.usage_metadata["input_token_details"]["cache_read"] >= 1000
    with pytest.raises(thaw_agents.ConfigError, match="pool"):
        asyncio.run(fork_fanout(chat, trunk, ["x"], pool=object()))  # type: ignore[arg-type]


def test_fork_fanout_over_http_with_bound_tools_reuses_the_trunk(chat: ChatThaw, trunk) -> None:
    # The tools are rendered into the system message, so a trunk snapshotted without them
    # would diverge from the branches' prompts within the first tokens.
    bound = chat.bind_tools([add])
    branches = ["Review for style.", "Review for security."]
    replies = asyncio.run(fork_fanout(bound, trunk, branches, max_tokens=4))
    for reply in replies:
        assert reply.response_metadata["placement"] == "server"
        assert reply.usage_metadata["input_token_details"]["cache_read"] >= 1000
