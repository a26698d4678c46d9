"""Tool calls: constrained schemas for forced calls, and parsing with vLLM's own tool parsers."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages.tool import InvalidToolCall, ToolCall

__all__ = ["forced_call_schema", "parse_forced_call", "parse_hermes_calls", "parse_tool_calls"]

logger = logging.getLogger(__name__)


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_call_schema(tools: Sequence[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema a forced tool call must match, or None when the model may answer freely.

    ``tool_choice``: ``"auto"``/None (free), ``"none"``, ``"required"``/``"any"``/True (one of the
    tools), a tool name, or ``{"type": "function", "function": {"name": ...}}``.
    """
    if not tools or tool_choice in (None, "auto", "none", False):
        return None
    if tool_choice in ("required", "any", True):
        choices = [_call_schema(t) for t in tools]
        return choices[0] if len(choices) == 1 else {"anyOf": choices}
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    for tool in tools:
        if tool["function"]["name"] == name:
            return _call_schema(tool)
    raise ValueError(f"tool_choice names {name!r}, which is not among the bound tools")


def parse_forced_call(text: str) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """A constrained-decoding output ``{"name", "arguments"}`` as a tool call."""
    try:
        data = json.loads(text)
        call = ToolCall(name=data["name"], args=dict(data["arguments"]), id=_call_id(), type="tool_call")
        return [call], []
    except (ValueError, KeyError, TypeError) as exc:
        return [], [
            InvalidToolCall(name=None, args=text, id=_call_id(), error=str(exc), type="invalid_tool_call")
        ]


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
