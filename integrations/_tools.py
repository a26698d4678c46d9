"""Tool calls: constrained schemas for forced calls, and parsing with vLLM's own tool parsers."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages.tool import InvalidToolCall, ToolCall

__all__ = ["forced_call_schema", "parse_forced_call", "parse_tool_calls"]

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
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for call in info.tool_calls:
        raw = call.function.arguments or "{}"
        try:
            args = json.loads(raw)
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
            calls.append(
                ToolCall(name=call.function.name, args=args, id=call.id or _call_id(), type="tool_call")
            )
        except ValueError as exc:
            invalid.append(
                InvalidToolCall(
                    name=call.function.name,
                    args=raw,
                    id=call.id or _call_id(),
                    error=str(exc),
                    type="invalid_tool_call",
                )
            )
    return info.content or "", calls, invalid
