"""In-process ChatThaw: one call on the vLLM ``AsyncLLM`` that the background loop owns."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk

import thaw_agents
from thaw_agents.front import AsyncLLMFront, Request

from ._output import last_chunk, usage
from ._request import chat_request, is_validation_error, prompt_token_ids, resolve_fork, sampling_params
from ._tools import keep_first_call, parse_tool_calls

if TYPE_CHECKING:
    from .langchain import ChatThaw

__all__ = ["engine_chunks"]

logger = logging.getLogger("thaw_agents.integrations.langchain")


async def engine_chunks(
    llm: ChatThaw, messages: list[BaseMessage], stop: list[str] | None, *, stream: bool = True, **kwargs: Any
) -> AsyncIterator[ChatGenerationChunk]:
    """One in-process call on ChatThaw's engine (run on the background loop): LangChain chunks,
    text as it comes unless tools are bound, the last one with calls, usage and metadata.

    ``stream=False`` (``invoke``/``ainvoke``) asks vLLM for the final output only: no output,
    delta or chunk per step, so a call costs the loop about as much as one in ``LLM.chat``."""
    handle = await llm._handle()
    chat, tools, tool_choice, structured, forced, single_call = chat_request(messages, kwargs)
    try:
        prompt_ids = await prompt_token_ids(handle.engine, chat, tools)
    except thaw_agents.ThawError:
        raise
    except Exception as exc:  # vLLM validates the context length while rendering
        if not is_validation_error(exc):
            raise
        raise thaw_agents.ConfigError(f"the messages cannot be sent to the engine: {exc}") from exc
    max_tokens = kwargs.get("max_tokens", llm.max_tokens) or 0
    if len(prompt_ids) + max(max_tokens, 1) > handle.max_model_len:
        raise thaw_agents.ConfigError(
            f"the prompt has {len(prompt_ids)} tokens and asks for {max_tokens} more, beyond the "
            f"engine's context of {handle.max_model_len}; shorten the messages or lower max_tokens"
        )
    params = sampling_params(
        llm._default_sampling(),
        stop if stop is not None else kwargs.get("stop", llm.stop),
        kwargs,
        structured,
    )
    fork = resolve_fork(kwargs.get("fork", llm.fork))
    if fork is not None:
        if tuple(prompt_ids[: fork.num_tokens]) == fork.token_ids:
            params = thaw_agents.with_fork(params, fork)
        else:
            logger.warning("fork %s does not prefix this prompt; prefilling", fork.id)
    buffer_output = bool(tools) and tool_choice != "none"
    text_parts: list[str] = []
    num_output = 0
    cached = 0
    finish_reason: str | None = None
    timeout = kwargs.get("timeout", llm.timeout)
    request = Request(token_ids=prompt_ids, params=params)
    front = AsyncLLMFront(handle.engine)
    timeout_s = float(timeout) if timeout else None
    if not stream:
        (result,) = await front.agenerate([request], timeout_s=timeout_s, stream=False)
        (completion,) = result.completions
        cached, num_output, finish_reason = (
            result.num_cached_tokens,
            len(completion.token_ids),
            completion.finish_reason,
        )
        text_parts.append(completion.text)
        if completion.text and not buffer_output:
            yield ChatGenerationChunk(message=AIMessageChunk(content=completion.text))
    else:
        # aclosing: a caller that stops reading aborts the request now, not when it is collected.
        async with contextlib.aclosing(front.astream(request, timeout_s=timeout_s)) as deltas:
            async for delta in deltas:
                cached = delta.num_cached_tokens
                num_output += len(delta.token_ids)
                finish_reason = delta.finish_reason or finish_reason
                if delta.text:
                    text_parts.append(delta.text)
                    if not buffer_output:
                        yield ChatGenerationChunk(message=AIMessageChunk(content=delta.text))
    metadata = {
        "model_name": llm.model_name,
        "finish_reason": finish_reason,
        "model_provider": "thaw",
        "fork": fork.id if fork is not None else None,
    }

    def read_calls(text: str) -> tuple[str, list[Any], list[Any]]:
        read = parse_tool_calls(text, tools, handle.engine.get_tokenizer(), llm.tool_parser)
        return keep_first_call(read) if single_call else read

    yield last_chunk(
        "".join(text_parts),
        buffered=buffer_output,
        forced=forced,
        read_calls=read_calls,
        usage_metadata=usage(len(prompt_ids), num_output, cached),
        metadata=metadata,
    )
