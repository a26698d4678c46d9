"""ChatThaw's output, the same in-process and against a server: the last chunk and the result.

Text streams as it comes, except when tools are bound: then the whole text is read once at the
end (a forced call as constrained JSON, a free answer for calls in the Hermes convention) and
the last chunk carries the calls, the usage and the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import InvalidToolCall, ToolCall, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

import thaw_agents

from ._tools import parse_forced_call

__all__ = ["aggregate", "last_chunk", "usage"]

# (text) -> (content, calls, invalid calls)
ToolReader = Callable[[str], tuple[str, list[ToolCall], list[InvalidToolCall]]]


def usage(input_tokens: int, output_tokens: int, cache_read: int) -> UsageMetadata:
    """LangChain usage with ``input_token_details.cache_read`` (tokens served from cache or snapshot)."""
    return UsageMetadata(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_token_details={"cache_read": cache_read},
    )


def last_chunk(
    text: str,
    *,
    buffered: bool,
    forced: bool,
    read_calls: ToolReader | None,
    usage_metadata: UsageMetadata,
    metadata: dict[str, Any],
) -> ChatGenerationChunk:
    """The chunk that ends a call: the tool calls read from ``text`` (when ``buffered``), usage, metadata.

    Args:
        text: the whole generated text (only read when ``buffered``).
        buffered: tools were bound, so no text was streamed before this chunk.
        forced: the call was forced by constrained decoding (``text`` is ``{"name", "arguments"}``).
        read_calls: reads free text into content and calls (vLLM's tool parser or the Hermes reader).

    Example:
        >>> last_chunk("hi", buffered=False, forced=False, read_calls=None,
        ...            usage_metadata=usage(3, 1, 0), metadata={}).message.usage_metadata["total_tokens"]
        4
    """
    content = ""
    chunks = []
    invalid: list[InvalidToolCall] = []
    metadata = dict(metadata)
    if buffered:
        if forced or read_calls is None:
            calls, invalid = parse_forced_call(text)
        else:
            content, calls, invalid = read_calls(text)
        chunks = [
            tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
            for i, c in enumerate(calls)
        ]
        if invalid:
            # Never let a truncated or malformed call be "repaired" into arguments by
            # LangChain's lenient chunk parser: report it as invalid, with the raw text.
            metadata["invalid_tool_calls"] = [dict(c) for c in invalid]
    message = AIMessageChunk(
        content=content,
        usage_metadata=usage_metadata,
        response_metadata=metadata,
        tool_call_chunks=chunks,
        chunk_position="last",
    )
    if invalid:
        message.invalid_tool_calls = list(message.invalid_tool_calls) + list(invalid)
    return ChatGenerationChunk(
        message=message, generation_info={"finish_reason": metadata.get("finish_reason")}
    )


def aggregate(chunks: Iterator[ChatGenerationChunk] | Sequence[ChatGenerationChunk]) -> ChatResult:
    """One ``ChatResult`` from a call's chunks (invalid tool calls restored from the metadata).

    Example:
        >>> aggregate([ChatGenerationChunk(message=AIMessageChunk(content="hi"))]).generations[0].text
        'hi'
    """
    final: ChatGenerationChunk | None = None
    for chunk in chunks:
        final = chunk if final is None else final + chunk
    if final is None:
        raise thaw_agents.EngineError("the engine returned no output")
    message = final.message
    metadata = dict(message.response_metadata)
    # Invalid calls travel in metadata through chunk merges (see last_chunk); restore them here.
    invalid = metadata.pop("invalid_tool_calls", None) or list(message.invalid_tool_calls)
    ai = AIMessage(
        content=message.content,
        additional_kwargs=message.additional_kwargs,
        response_metadata=metadata,
        usage_metadata=message.usage_metadata,
        tool_calls=message.tool_calls,
        invalid_tool_calls=invalid,
        id=message.id,
    )
    return ChatResult(generations=[ChatGeneration(message=ai, generation_info=final.generation_info)])
