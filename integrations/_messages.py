"""LangChain messages -> the chat dicts vLLM's renderer takes, and tools -> a system prompt.

Small models' chat templates (SmolLM2's among them) ignore ``tools=``; the tools are then
described in the system message in the Hermes convention, which vLLM's ``hermes`` tool
parser reads back: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

__all__ = ["render_tools_prompt", "to_chat_dicts"]


def _text(content: str | list[Any]) -> str:
    """Text of a message's content; non-text blocks are refused with a clear error."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") in {"text", "text-plain"}:
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in {"tool_use", "tool_call"}:
            continue  # carried as tool_calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatThaw handles text only; got a content block of type {kind!r}")
    return "".join(parts)


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """OpenAI-style chat dicts, tool calls and tool results included."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": _text(message.content)})
        elif isinstance(message, HumanMessage):
            entry: dict[str, Any] = {"role": "user", "content": _text(message.content)}
            if message.name:
                entry["name"] = message.name
            out.append(entry)
        elif isinstance(message, AIMessage):
            entry = {"role": "assistant", "content": _text(message.content)}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {
                        "id": call.get("id") or f"call_{i}",
                        "type": "function",
                        "function": {"name": call["name"], "arguments": json.dumps(call["args"])},
                    }
                    for i, call in enumerate(message.tool_calls)
                ]
                # Templates that ignore tool_calls still show the model what it called.
                calls = "".join(
                    f"<tool_call>{json.dumps({'name': c['name'], 'arguments': c['args']})}</tool_call>"
                    for c in message.tool_calls
                )
                entry["content"] = (entry["content"] + "\n" + calls).strip()
            out.append(entry)
        elif isinstance(message, ToolMessage):
            status = " (error)" if getattr(message, "status", "success") == "error" else ""
            out.append(
                {
                    "role": "user",
                    "content": f"<tool_response name={message.name or 'tool'!s}{status}>\n"
                    f"{_text(message.content)}\n</tool_response>",
                }
            )
        elif isinstance(message, FunctionMessage):
            out.append(
                {"role": "user", "content": f"<tool_response>\n{_text(message.content)}\n</tool_response>"}
            )
        elif isinstance(message, ChatMessage):
            out.append({"role": message.role, "content": _text(message.content)})
        else:
            raise ValueError(f"unsupported message type {type(message).__name__}")
    return out


def render_tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """A system-prompt section describing ``tools`` (OpenAI tool dicts) in the Hermes convention."""
    specs = "\n".join(json.dumps(tool["function"]) for tool in tools)
    return (
        "You can call functions. Their signatures, one JSON object per line:\n"
        f"<tools>\n{specs}\n</tools>\n"
        "To call a function, answer with one line per call:\n"
        '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>'
    )


def with_tools(chat: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``chat`` with the tools described in its system message (one is added if missing)."""
    if not tools:
        return chat
    section = render_tools_prompt(tools)
    if chat and chat[0]["role"] == "system":
        return [{**chat[0], "content": f"{chat[0]['content']}\n\n{section}"}, *chat[1:]]
    return [{"role": "system", "content": section}, *chat]
