"""fork_fanout and fork_sends in real LangGraph graphs, on the real engine."""

from __future__ import annotations

import asyncio
import operator
import warnings
from typing import Annotated, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

import thaw_agents
from thaw_agents.integrations.langgraph import ChatThaw, fork_fanout, fork_fanout_sync, fork_sends

pytestmark = pytest.mark.e2e
ASPECTS = ["security", "performance", "style"]


@pytest.fixture(scope="module")
def chat():
    model = ChatThaw(temperature=0, max_tokens=12)
    yield model
    model.close()


@pytest.fixture(scope="module")
def trunk(trunk_text: str) -> list:
    return [SystemMessage("You review pull requests."), HumanMessage("The change:\n" + trunk_text)]


def test_fork_fanout_serves_every_branch_from_the_trunk(chat: ChatThaw, trunk: list) -> None:
    replies = asyncio.run(fork_fanout(chat, trunk, [f"Review for {a}." for a in ASPECTS]))
    assert len(replies) == len(ASPECTS) and all(isinstance(r, AIMessage) for r in replies)
    for reply in replies:
        assert reply.response_metadata["placement"] == "engine"
        assert reply.response_metadata["fork"].startswith("thaw-")
        assert reply.usage_metadata["input_token_details"]["cache_read"] >= 1000


def test_fork_fanout_sync_twin_matches_solo_runs(chat: ChatThaw, trunk: list) -> None:
    """Greedy branches equal the same branches run alone (one request at a time)."""
    suffixes = ["Summarise in five words.", "Name one risk."]
    fanned = fork_fanout_sync(chat, trunk, suffixes)
    solo = [chat.invoke([*trunk, HumanMessage(s)]) for s in suffixes]
    assert [m.usage_metadata["output_tokens"] for m in fanned] == [
        m.usage_metadata["output_tokens"] for m in solo
    ]


class ReviewState(TypedDict):
    diff: str
    reviews: Annotated[list[str], operator.add]
    cache_reads: Annotated[list[int], operator.add]


def _graph(chat: ChatThaw, checkpointer=None):
    def trunk(diff: str) -> list:
        return [SystemMessage("You review pull requests."), HumanMessage("The change:\n" + diff)]

    def route(state: ReviewState):
        return fork_sends(
            chat, trunk(state["diff"]), "review", [{"aspect": a, "diff": state["diff"]} for a in ASPECTS]
        )

    def review(branch: dict) -> dict:
        reply = chat.invoke(
            [*trunk(branch["diff"]), HumanMessage(f"Review for {branch['aspect']}.")], fork=branch["fork"]
        )
        return {
            "reviews": [reply.content],
            "cache_reads": [reply.usage_metadata["input_token_details"]["cache_read"]],
        }

    builder = StateGraph(ReviewState).add_node("review", review)
    builder = builder.add_conditional_edges(START, route, ["review"]).add_edge("review", END)
    return builder.compile(checkpointer=checkpointer)


def test_fork_sends_in_a_map_reduce_graph(chat: ChatThaw, trunk_text: str) -> None:
    out = _graph(chat).invoke({"diff": trunk_text, "reviews": [], "cache_reads": []})
    assert len(out["reviews"]) == len(ASPECTS)
    assert all(n >= 1000 for n in out["cache_reads"])


def test_checkpointed_graphs_run_and_streams_carry_branch_tokens(
    chat: ChatThaw, trunk_text: str, tmp_path
) -> None:
    from langgraph.checkpoint.sqlite import SqliteSaver

    with SqliteSaver.from_conn_string(str(tmp_path / "ck.sqlite")) as saver:
        for checkpointer in (InMemorySaver(), saver):
            graph = _graph(chat, checkpointer)
            config = {"configurable": {"thread_id": f"t-{type(checkpointer).__name__}"}}
            # subgraphs=True: each item is (namespace, (token chunk, metadata)).
            tokens = [
                chunk
                for _namespace, (chunk, meta) in graph.stream(
                    {"diff": trunk_text, "reviews": [], "cache_reads": []},
                    config,
                    stream_mode="messages",
                    subgraphs=True,
                )
                if meta.get("langgraph_node") == "review"
            ]
            assert len(tokens) >= len(ASPECTS)
            state = graph.get_state(config).values
            assert len(state["reviews"]) == len(ASPECTS)


def test_resumed_branch_with_a_deleted_snapshot_prefills_with_a_warning(
    chat: ChatThaw, trunk_text: str
) -> None:
    """The fork id survives in checkpointed state; the snapshot does not: fall back, never fail."""
    from langgraph.types import Send

    trunk = [SystemMessage("You review pull requests."), HumanMessage("The change:\n" + trunk_text)]
    handle = thaw_agents.fork(chat, trunk)
    branch = fork_sends(chat, trunk, "review", [{"aspect": "style"}])[0]
    assert isinstance(branch, Send) and branch.arg["fork"] == handle.id
    handle.delete()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reply = chat.invoke([*trunk, HumanMessage("Review for style.")], fork=branch.arg["fork"])
    assert reply.content is not None
    assert any("prefilling instead" in str(w.message) for w in caught)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random model in float32: greedy decoding on CPU is batch-invariant there."""
    from helpers.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    model = ChatThaw(
        model=str(folder),
        temperature=0,
        max_tokens=8,
        engine_kwargs={"dtype": "float32", "max_model_len": 2048, "kv_cache_memory_bytes": 256 << 20},
    )
    yield model
    model.close()


def test_eight_concurrent_graphs_have_no_cross_talk(tiny_fp32: ChatThaw) -> None:
    """Eight fan-outs at once, each from its own trunk: every reply equals its solo run."""
    trunks = [[SystemMessage(f"Case {i}: " + "context words " * (40 + 7 * i))] for i in range(8)]
    suffixes = [[f"Question {i}.{j}" for j in range(2)] for i in range(8)]
    solo = [
        [tiny_fp32.invoke([*t, HumanMessage(s)]).content for s in sfx]
        for t, sfx in zip(trunks, suffixes, strict=True)
    ]

    async def all_of_them() -> list[list[AIMessage]]:
        return await asyncio.gather(
            *(fork_fanout(tiny_fp32, t, sfx) for t, sfx in zip(trunks, suffixes, strict=True))
        )

    concurrent = [[m.content for m in replies] for replies in asyncio.run(all_of_them())]
    assert concurrent == solo
    assert len({tuple(x) for x in solo}) > 1  # the branches really differ


def test_fork_fanout_places_branches_on_an_attached_pool(tiny_fp32: ChatThaw) -> None:
    """With a pool attached the branches run on its workers from the snapshot: same answers."""
    trunk = [SystemMessage("Pool case: " + "shared context words " * 60)]
    suffixes = ["First question.", "Second question."]
    solo = [tiny_fp32.invoke([*trunk, HumanMessage(s)]).content for s in suffixes]
    engine_args = tiny_fp32.engine_kwargs
    with thaw_agents.ForkPool(model=tiny_fp32.model, workers=1, **engine_args) as pool:
        replies = fork_fanout_sync(tiny_fp32, trunk, suffixes, pool=pool, placement="pool")
        # Left to choose, two short branches fit the parent engine: they run there and say why.
        chosen = fork_fanout_sync(tiny_fp32, trunk, suffixes, pool=pool)
        with pytest.raises(thaw_agents.ConfigError, match="placement must be"):
            fork_fanout_sync(tiny_fp32, trunk, suffixes, pool=pool, placement="gpu")
    assert [r.response_metadata["placement"] for r in chosen] == ["engine", "engine"]
    assert all(r.response_metadata["placement_reason"].startswith("auto: parent has room") for r in chosen)
    assert [r.response_metadata["placement"] for r in replies] == ["pool", "pool"]
    assert all(r.response_metadata["placement_reason"].startswith("placement='pool'; ") for r in replies)
    assert all(r.response_metadata["worker"].startswith("local-") for r in replies)
    snapshot_tokens = thaw_agents.fork(tiny_fp32, trunk).num_snapshot_tokens
    # Every branch is served mostly from the snapshot (the worker may recompute a trailing block).
    served = [r.usage_metadata["input_token_details"]["cache_read"] for r in replies + chosen]
    assert all(n >= snapshot_tokens - 32 for n in served)
    assert [r.content for r in replies] == solo
