"""Tool calls: constrained schemas for forced calls, and parsing with vLLM's own tool parsers."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages.tool import InvalidToolCall, ToolCall

__all__ = [
    "forced_call_schema",
    "keep_first_call",
    "parse_forced_call",
    "parse_hermes_calls",
    "parse_tool_calls",
]

logger = logging.getLogger(__name__)

# (content, calls, invalid calls): what every tool-call reader returns.
Read = tuple[str, list[ToolCall], list[InvalidToolCall]]


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_call_schema(
    tools: Sequence[dict[str, Any]], tool_choice: Any, parallel_tool_calls: bool | None = None
) -> dict[str, Any] | None:
    """The JSON schema forced tool calls must match, or None when the model may answer freely.

    ``tool_choice``: ``"auto"``/None (free), ``"none"``, ``"required"`` (one or more calls of
    the tools: a JSON array of calls, as vLLM's server forces it), ``"any"``/True (one call of
    the tools), a tool name or ``{"type": "function", "function": {"name": ...}}`` (one call of
    that tool). ``parallel_tool_calls`` True or False overrides how many ``"required"`` and
    ``"any"`` allow. ``"any"`` stays one call by default because LangChain's standard tests
    expect exactly one from it, and a small model given room repeats its call.

    Example:
        >>> tool = {"type": "function", "function": {"name": "now"}}
        >>> forced_call_schema([tool], "required")["minItems"]
        1
        >>> forced_call_schema([tool], "now")["properties"]["name"]
        {'type': 'string', 'enum': ['now']}
    """
    if not tools or tool_choice in (None, "auto", "none", False):
        return None
    if tool_choice in ("required", "any", True):
        choices = [_call_schema(t) for t in tools]
        one = choices[0] if len(choices) == 1 else {"anyOf": choices}
        several = tool_choice == "required" if parallel_tool_calls is None else parallel_tool_calls
        return {"type": "array", "items": one, "minItems": 1} if several else one
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    for tool in tools:
        if tool["function"]["name"] == name:
            return _call_schema(tool)
    raise ValueError(f"tool_choice names {name!r}, which is not among the bound tools")


def parse_forced_call(text: str) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """A constrained-decoding output (one ``{"name", "arguments"}`` object or an array of them)
    as tool calls.

    Example:
        >>> call = '{"name": "now", "arguments": {}}'
        >>> len(parse_forced_call(f"[{call}, {call}]")[0])
        2
    """
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
        calls = [
            ToolCall(name=item["name"], args=dict(item["arguments"]), id=_call_id(), type="tool_call")
            for item in items
        ]
        if not calls:
            raise ValueError("no call in the output")
        return calls, []
    except (ValueError, KeyError, TypeError) as exc:
        return [], [
            InvalidToolCall(name=None, args=text, id=_call_id(), error=str(exc), type="invalid_tool_call")
        ]


def keep_first_call(read: Read) -> Read:
    """``parallel_tool_calls=False`` for calls read from free text: the first call only.

    (Forced calls need no trimming: their schema allows one.) The model's text is not cut,
    the calls after the first are dropped, as vLLM's server does.

    Example:
        >>> call = ToolCall(name="now", args={}, id="1", type="tool_call")
        >>> len(keep_first_call(("", [call, call], []))[1])
        1
    """
    content, calls, invalid = read
    if len(calls) + len(invalid) <= 1:
        return read
    logger.debug("parallel_tool_calls=False: keeping the first of %d calls", len(calls) + len(invalid))
    return (content, calls[:1], []) if calls else (content, [], invalid[:1])


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(
    text: str, tools: Sequence[dict[str, Any]], tokenizer: Any, parser_name: str
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split free text into content and tool calls with vLLM's ``parser_name`` tool parser."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    parser_cls = ToolParserManager.get_tool_parser(parser_name)
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": ""}], tools=list(tools), model="thaw"
    )
    parser = parser_cls(tokenizer)  # one per request: parsers keep streaming state
    info = parser.extract_tool_calls(text, request)
    if not info.tools_called:
        return text, [], []
    calls, invalid = _to_calls((c.function.name, c.function.arguments, c.id) for c in info.tool_calls)
    return info.content or "", calls, invalid


# vLLM's hermes parser's pattern: a call between tags, or an unterminated last one.
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def parse_hermes_calls(text: str) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split free text into content and tool calls in the Hermes convention, without vLLM.

    The same reading as vLLM's ``hermes`` tool parser (used by ChatThaw against a server,
    where vLLM need not be installed): text before the first ``<tool_call>`` is the content;
    if any call is not JSON with a name, nothing is a call and the whole text is content.

    Example:
        >>> parse_hermes_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')[1][0]["args"]
        {'a': 1}
    """
    if "<tool_call>" not in text:
        return text, [], []
    try:
        raw = [json.loads(a or b) for a, b in _HERMES.findall(text)]
        found = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False), None) for c in raw]
    except (ValueError, KeyError, TypeError):
        return text, [], []
    calls, invalid = _to_calls(found)
    return text[: text.find("<tool_call>")], calls, invalid


def _to_calls(found: Any) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """(name, JSON arguments, id or None) triples as LangChain tool calls; non-objects are invalid."""
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for name, arguments, call_id in found:
        raw = arguments or "{}"
        try:
            args = json.loads(raw)
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            calls.append(ToolCall(name=name, args=args, id=call_id or _call_id(), type="tool_call"))
        except ValueError as exc:
            invalid.append(
                InvalidToolCall(
                    name=name, args=raw, id=call_id or _call_id(), error=str(exc), type="invalid_tool_call"
                )
            )
    return calls, invalid
