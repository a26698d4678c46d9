"""LangGraph fan-out from a shared trunk: ``fork_fanout`` and ``fork_sends``.

The trunk (shared messages) is computed and snapshotted once; every branch starts from its KV
instead of prefilling it again. A fork travels through graph state as a plain string (its id),
so checkpointers can serialise it; a branch resumed after the snapshot is gone falls back to
prefill with a warning.

Example (map-reduce with ``Send``, the way LangGraph users already write it):

.. code-block:: python

    import operator
    from typing import Annotated, TypedDict

    from langgraph.graph import END, START, StateGraph
    from thaw_agents.integrations.langgraph import ChatThaw, fork_sends, trunk_of

    llm = ChatThaw(temperature=0, max_tokens=128)
    ASPECTS = ["security", "performance", "style", "correctness"]

    class State(TypedDict):
        diff: str
        reviews: Annotated[list[str], operator.add]

    def trunk(state: State) -> list:
        return [("system", "You review pull requests."), ("human", state["diff"])]

    def route(state: State):
        branches = [{"aspect": a, "diff": state["diff"]} for a in ASPECTS]
        return fork_sends(llm, trunk(state), "review", branches)

    async def review(branch: dict) -> dict:  # async nodes: the branches overlap in one engine batch
        messages = trunk(branch) + [("human", f"Review only for {branch['aspect']}.")]
        reply = await llm.ainvoke(messages, fork=branch["fork"])
        return {"reviews": [reply.content]}

    graph = StateGraph(State).add_node("review", review)
    graph = graph.add_conditional_edges(START, route, ["review"]).add_edge("review", END).compile()
    await graph.ainvoke({"diff": open("change.diff").read(), "reviews": []})

Prefer async branch nodes (as above): LangGraph then runs the ``Send`` branches concurrently and
the engine batches them; with sync nodes they overlapped poorly in our measurements.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.runnables import RunnableBinding
from langgraph.types import Send

import thaw_agents

from ._remote import RemoteSnapshot
from .langchain import ChatThaw

__all__ = ["ChatThaw", "fork_fanout", "fork_fanout_sync", "fork_sends", "trunk_of"]

logger = logging.getLogger(__name__)

MessagesLike = Sequence[BaseMessage | tuple[str, str] | dict[str, Any] | str]


def trunk_of(state: Mapping[str, Any] | Any, key: str = "messages") -> list[BaseMessage]:
    """The messages of a dict, list or model state (a small convenience for routing functions)."""
    if isinstance(state, Mapping):
        value = state[key]
    elif isinstance(state, Sequence):
        value = state
    else:
        value = getattr(state, key)
    return list(convert_to_messages(value))


def _as_branch(suffix: str | MessagesLike) -> list[BaseMessage]:
    if isinstance(suffix, str):
        return [HumanMessage(suffix)]
    return list(convert_to_messages(suffix))


def _snapshot(
    llm: ChatThaw, prefix: list[BaseMessage], tools: Any = None
) -> thaw_agents.ForkHandle | RemoteSnapshot | None:
    """Fork the trunk, or None (and a warning) when it cannot be snapshotted here.

    Against a server (``ChatThaw(base_url=...)``) the trunk is snapshotted there and only its id
    comes back: the branches run on that server and name it, so downloading the file (what
    ``thaw_agents.fork`` does, to give a handle that can be saved or hydrated elsewhere) would
    cost a transfer of the whole KV per round for nothing.

    ``tools``: the branches' tools when the call passes them; otherwise a bound ChatThaw's own.
    The trunk is rendered with them, as the branches' prompts are, or they would not reuse it.
    """
    if tools is None and isinstance(llm, RunnableBinding):
        tools = llm.kwargs.get("tools")
    try:
        if llm.base_url is not None:
            return llm._remote_chat().snapshot(prefix, tools=tools)
        return thaw_agents.fork(llm, prefix, tools=tools)
    except thaw_agents.ThawError as exc:
        logger.warning("fork_fanout: the trunk could not be snapshotted (%s); branches prefill", exc)
        return None


async def fork_fanout(
    llm: ChatThaw,
    prefix_messages: MessagesLike,
    suffixes: Iterable[str | MessagesLike],
    *,
    pool: thaw_agents.ForkPool | None = None,
    placement: str = "auto",
    **params: Any,
) -> list[AIMessage]:
    """Run one branch per suffix from a shared trunk computed once; results in input order.

    The trunk is snapshotted once; every branch is sent to the engine at the same time (its
    continuous batching turns them into batched steps), each starting from the snapshot. Each
    message's ``response_metadata`` says where it ran (``placement``) and from which fork, and
    ``usage_metadata["input_token_details"]["cache_read"]`` how many prompt tokens were served
    from cache or snapshot rather than prefilled.

    Args:
        llm: the ChatThaw to run on.
        prefix_messages: the shared trunk.
        suffixes: per branch, a human message text or a list of messages appended to the trunk.
        pool: a started :class:`thaw_agents.ForkPool` (same model and KV layout) whose warm
            workers can run the branches, loading the trunk from the snapshot. Without one, or
            for calls with tools or structured output, they run in ``llm``'s own engine. Not
            with a ChatThaw against a server (``base_url``): its branches run on that server,
            which batches them, each starting from the trunk's snapshot by id.
        placement: with a pool, ``"auto"`` runs the branches in ``llm``'s engine when it has
            room for them and on the pool otherwise (the rule of
            :func:`thaw_agents.fork_completions`); ``"pool"`` or ``"parent"`` force one.
        **params: per-call sampling parameters for every branch (``max_tokens``, ``temperature``...).

    Example:
        >>> replies = await fork_fanout(llm, trunk, ["Security?", "Style?"])  # doctest: +SKIP
    """
    prefix = list(convert_to_messages(prefix_messages))
    branches = [_as_branch(s) for s in suffixes]
    from thaw_agents.pool._placement import check_placement

    check_placement(placement, pool)  # before the trunk is snapshotted
    if pool is not None and llm.base_url is not None:
        raise thaw_agents.ConfigError(
            "a ForkPool runs branches in local workers; a ChatThaw with base_url runs them on its "
            "server. Drop pool= (or use an in-process ChatThaw)."
        )
    start = time.perf_counter()
    handle = await asyncio.to_thread(_snapshot, llm, prefix, params.get("tools"))
    fork_s = time.perf_counter() - start
    decided = None
    pooled_ok = pool is not None and placement != "parent" and handle is not None
    if pooled_ok and not ({"tools", "structured_outputs"} & params.keys()):
        assert pool is not None and handle is not None
        pooled, decided = await _on_pool(llm, pool, handle, prefix, branches, params, fork_s, placement)
        if pooled is not None:
            return pooled
    where = "engine" if llm.base_url is None else "server"
    reason = "the branches fit in the trunk's own engine; its prefix cache and the snapshot serve the trunk"
    if llm.base_url is not None:
        reason = f"the trunk's engine is the server {llm.base_url}; its snapshot serves the trunk by id"
    if pool is not None:
        reason = decided or (
            "placement='parent'"
            if placement == "parent"
            else "a pool is attached, but these calls need the parent engine (tools, structured output)"
        )
    logger.debug("fork_fanout: %d branches on %s (%s)", len(branches), where, reason)

    async def run(branch: list[BaseMessage]) -> AIMessage:
        started = time.perf_counter()
        message = await llm.ainvoke([*prefix, *branch], fork=handle, **params)
        message.response_metadata.update(
            {
                "placement": where,
                "placement_reason": reason,
                "fork": handle.id if handle else None,
                "branch_s": time.perf_counter() - started,
                "fork_s": fork_s,
            }
        )
        return message

    return list(await asyncio.gather(*(run(b) for b in branches)))


def fork_fanout_sync(
    llm: ChatThaw,
    prefix_messages: MessagesLike,
    suffixes: Iterable[str | MessagesLike],
    *,
    pool: thaw_agents.ForkPool | None = None,
    placement: str = "auto",
    **params: Any,
) -> list[AIMessage]:
    """The synchronous twin of :func:`fork_fanout` (callable from any thread, even inside a loop).

    Example:
        >>> replies = fork_fanout_sync(llm, trunk, ["Security?", "Style?"])   # doctest: +SKIP
    """
    from ._runtime import runtime

    return runtime.run(
        fork_fanout(llm, prefix_messages, list(suffixes), pool=pool, placement=placement, **params)
    )


async def _on_pool(
    llm: ChatThaw,
    pool: thaw_agents.ForkPool,
    handle: thaw_agents.ForkHandle,
    prefix: list[BaseMessage],
    branches: list[list[BaseMessage]],
    params: dict[str, Any],
    fork_s: float,
    placement: str,
) -> tuple[list[AIMessage] | None, str | None]:
    """Run the branches on the pool's workers; (None, why) when they run in the parent instead."""
    from vllm import SamplingParams

    from thaw_agents.chat import to_openai_messages
    from thaw_agents.front import front_for
    from thaw_agents.pool._placement import decide

    from ._request import SAMPLING_FIELDS, prompt_token_ids

    engine = (await llm._handle()).engine
    suffixes: list[list[int]] = []
    for branch in branches:
        ids = await prompt_token_ids(engine, to_openai_messages([*prefix, *branch]))
        if tuple(ids[: handle.num_tokens]) != handle.token_ids:
            logger.warning("fork_fanout: a branch does not start with the trunk's tokens; using the engine")
            return None, "a branch does not start with the trunk's tokens: the parent engine"
        suffixes.append(ids[handle.num_tokens :])
    values = llm._default_sampling()
    values.update({k: v for k, v in params.items() if k in SAMPLING_FIELDS and v is not None})
    stop = params.get("stop", llm.stop)
    sampling = SamplingParams(**values, stop=list(stop or []))
    trunk = list(handle.token_ids)
    decision = await asyncio.to_thread(
        decide,
        front_for(llm),
        trunk,
        [trunk + s for s in suffixes],
        [sampling] * len(suffixes),
        pool,
        placement,
    )
    if decision.target == "parent":
        return None, decision.reason
    results = await asyncio.to_thread(
        thaw_agents.fork_completions,
        llm,
        prefix=handle,
        suffixes=suffixes,
        sampling_params=sampling,
        pool=pool,
        placement="pool",  # decided above
    )
    messages = []
    for result in results:
        completion = result.completions[0]
        output = len(completion.token_ids)
        messages.append(
            AIMessage(
                content=completion.text,
                usage_metadata={
                    "input_tokens": result.num_prompt_tokens,
                    "output_tokens": output,
                    "total_tokens": result.num_prompt_tokens + output,
                    "input_token_details": {"cache_read": result.num_cached_tokens},
                },
                response_metadata={
                    "model_name": llm.model_name,
                    "model_provider": "thaw",
                    "finish_reason": completion.finish_reason,
                    "placement": "pool",
                    "worker": result.worker,
                    # the round's own "placement='pool'" replaced by the decision made here
                    "placement_reason": f"{decision.reason}; {result.reason.split('; ', 1)[-1]}",
                    "fork": handle.id,
                    "fork_s": fork_s,
                    "ttft_s": result.timings.ttft_s,
                },
            )
        )
    logger.debug("fork_fanout: %d branches on the pool", len(messages))
    return messages, decision.reason


def fork_sends(
    llm: ChatThaw,
    prefix_messages: MessagesLike,
    node: str,
    branch_args: Iterable[Mapping[str, Any]],
    *,
    fork_key: str = "fork",
) -> list[Send]:
    """``Send`` packets for a map step, after snapshotting the shared trunk once.

    Use it as (or inside) the routing function of a conditional edge. Each packet is
    ``Send(node, {**args, fork_key: <snapshot id>})``; the branch node passes that id to its
    ChatThaw call (``llm.invoke(messages, fork=state["fork"])``), whose prompt starts with the
    same trunk. The id is a plain string, so checkpointers serialise it; if the snapshot is
    gone when a branch runs (a resume on another machine), the branch prefills with a warning.
    With ``ChatThaw(base_url=...)`` the trunk is snapshotted on the server (one HTTP request)
    and the branches carry its id; no file comes to this machine.

    Example:
        >>> def route(state):                                                    # doctest: +SKIP
        ...     return fork_sends(llm, trunk(state), "review",
        ...                       [{"aspect": a, "diff": state["diff"]} for a in ASPECTS])
    """
    prefix = list(convert_to_messages(prefix_messages))
    handle = _snapshot(llm, prefix)
    fork_id = handle.id if handle else None
    return [Send(node, {**dict(args), fork_key: fork_id}) for args in branch_args]
