"""Chat messages and tools as prompt token ids: the one converter and renderer of thaw-agents.

``fork(llm, messages, tools=...)``, ``ChatThaw`` (in-process and against a server) and
``fork_fanout`` render a conversation here, so a trunk forked by one is served to the others
token for token. Two steps:

1. :func:`to_openai_messages`: LangChain messages, ``(role, text)`` tuples or OpenAI chat
   dicts become OpenAI-style chat dicts. Assistant ``tool_calls`` stay on the assistant
   message; ``role: "tool"`` messages stay tool messages.
2. :func:`render` / :func:`arender`: those dicts and the tools go through vLLM's renderer,
   that is the model's own chat template, with ``tools`` passed to the template, exactly
   as vLLM's chat path does. ``add_generation_prompt=False`` renders a prefix (a trunk to
   fork), ``True`` a call.

A template that does not take tools (SmolLM2's, the default model's, among them) would drop
them and print tool messages as an unknown role. For such templates the conversation is first
written in the Hermes convention (:func:`hermes_messages`): the tools described in the system
message, calls as ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` in the assistant's
text, results as a user ``<tool_response>``; vLLM's ``hermes`` tool parser reads such calls
back. Which path a tokenizer takes is decided once per tokenizer (:func:`template_takes_tools`).

The tools are part of the prefix either way: a trunk forked with the tools a branch binds is
served to that branch for every full block.

Example:
    >>> to_openai_messages([{"role": "user", "content": "Hi"}])
    [{'role': 'user', 'content': 'Hi'}]
    >>> ids = render(llm.renderer, [("system", "Be terse.")], add_generation_prompt=False)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from ._errors import ConfigError, DependencyError

__all__ = [
    "arender",
    "hermes_messages",
    "render",
    "template_takes_tools",
    "to_openai_messages",
    "to_openai_tools",
]

_LANGCHAIN = ("langchain-core", 'pip install "thaw-agents[langgraph]"')


def to_openai_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-style chat dicts from LangChain messages, ``(role, text)`` tuples or chat dicts.

    With ``langchain-core`` installed every message goes through its
    ``convert_to_openai_messages`` (dicts too, so a history given as dicts to ``fork`` and as
    LangChain messages to ChatThaw becomes the same dicts); without it, only chat dicts are
    accepted and copied as they are.

    Raises:
        ConfigError: no messages, or content that is not text (images, audio...).
        DependencyError: LangChain messages without ``langchain-core`` installed.

    Example:
        >>> to_openai_messages([{"role": "tool", "tool_call_id": "1", "content": "20 C"}])
        [{'role': 'tool', 'tool_call_id': '1', 'content': '20 C'}]
    """
    items = list(messages)
    if not items:
        raise ConfigError("there are no messages to render")
    try:
        from langchain_core.messages import convert_to_openai_messages
    except ImportError:
        if not all(isinstance(m, Mapping) for m in items):
            raise DependencyError(*_LANGCHAIN, purpose="LangChain messages") from None
        chat = [dict(m) for m in items]
    else:
        try:
            chat = convert_to_openai_messages(items, text_format="string")
        except KeyError as exc:  # langchain-core's answer to a tool message without its call's id
            raise ConfigError(
                f"a message lacks the field {exc}: a tool message needs the tool_call_id of its call"
            ) from exc
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ConfigError(f"these messages cannot be converted to chat messages: {exc}") from exc
    for message in chat:
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            kinds = sorted({str(b.get("type")) for b in content if isinstance(b, Mapping)})
            raise ConfigError(f"only text content can be rendered; got content blocks of type {kinds}")
    return chat


def to_openai_tools(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """OpenAI tool dicts (``{"type": "function", "function": {...}}``), or None for no tools.

    Accepts OpenAI tool dicts, and with ``langchain-core`` installed anything its
    ``convert_to_openai_tool`` takes (LangChain tools, pydantic models, typed functions).

    Example:
        >>> to_openai_tools([{"type": "function", "function": {"name": "now"}}])
        [{'type': 'function', 'function': {'name': 'now'}}]
    """
    if not tools:
        return None
    try:
        from langchain_core.utils.function_calling import convert_to_openai_tool
    except ImportError:
        if not all(_is_openai_tool(t) for t in tools):
            raise DependencyError(*_LANGCHAIN, purpose="tools other than OpenAI tool dicts") from None
        return [dict(t) for t in tools]
    try:
        return [convert_to_openai_tool(t) for t in tools]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"these tools cannot be described to the model: {exc}") from exc


def _is_openai_tool(tool: Any) -> bool:
    return isinstance(tool, Mapping) and tool.get("type") == "function" and "function" in tool


# Whether a tokenizer's chat template takes ``tools``; decided once per tokenizer.
_TAKES_TOOLS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_TOOLS_WORD = re.compile(r"\btools\b")


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` (its source names them).

    A tokenizer without a Jinja template (or none at all) counts as not taking tools: the
    Hermes prompt is used.
    """
    with contextlib.suppress(TypeError, KeyError):
        return _TAKES_TOOLS[tokenizer]
    try:
        source = tokenizer.get_chat_template(None, tools=[])
    except Exception:  # no template, or not a Hugging Face tokenizer
        source = None
    takes = isinstance(source, str) and bool(_TOOLS_WORD.search(source))
    with contextlib.suppress(TypeError):  # not weak-referenceable: decided again next time
        _TAKES_TOOLS[tokenizer] = takes
    return takes


def _tools_section(tools: Sequence[dict[str, Any]]) -> str:
    specs = "\n".join(json.dumps(tool["function"]) for tool in tools)
    return (
        "You can call functions. Their signatures, one JSON object per line:\n"
        f"<tools>\n{specs}\n</tools>\n"
        "To call a function, answer with one line per call:\n"
        '<tool_call>{"name": <function name>, "arguments": <arguments object>}</tool_call>'
    )


def _arguments(raw: Any) -> Any:
    """A call's arguments as an object (OpenAI dicts carry them as a JSON string)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return raw  # shown as written: the model sees what it produced
    return {} if raw is None else raw


def hermes_messages(
    chat: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """``chat`` written for a template without tools, in the Hermes convention.

    The tools are described at the end of the system message (a system message is added
    when there is none); an assistant's calls become ``<tool_call>`` lines after its text;
    a tool result becomes a user ``<tool_response name=...>`` message.

    Example:
        >>> chat = [{"role": "assistant", "content": "", "tool_calls": [
        ...     {"id": "1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        ...     {"role": "tool", "tool_call_id": "1", "content": "noon"}]
        >>> for message in hermes_messages(chat, None):
        ...     print(message["role"], message["content"])
        assistant <tool_call>{"name": "now", "arguments": {}}</tool_call>
        user <tool_response name=now>
        noon
        </tool_response>
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in chat:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            lines = []
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                names[str(call.get("id"))] = str(function.get("name"))
                body = {"name": function.get("name"), "arguments": _arguments(function.get("arguments"))}
                lines.append(f"<tool_call>{json.dumps(body, ensure_ascii=False)}</tool_call>")
            text = f"{message.get('content') or ''}\n{''.join(lines)}".strip()
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            name = message.get("name") or names.get(str(message.get("tool_call_id"))) or "tool"
            result = f"<tool_response name={name}>\n{message.get('content') or ''}\n</tool_response>"
            out.append({"role": "user", "content": result})
        else:
            out.append(dict(message))
    if tools:
        section = _tools_section(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def _request(
    renderer: Any, messages: Sequence[Any], tools: Sequence[Any] | None, add_generation_prompt: bool
) -> tuple[list[dict[str, Any]], Any]:
    from vllm.renderers import ChatParams

    chat = to_openai_messages(messages)
    specs = to_openai_tools(tools)
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if template_takes_tools(renderer.get_tokenizer()):
        if specs:
            kwargs["tools"] = specs  # vLLM hands chat_template_kwargs["tools"] to the template
    else:
        chat = hermes_messages(chat, specs)
    return chat, ChatParams(chat_template_kwargs=kwargs)


def render(
    renderer: Any,
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    add_generation_prompt: bool,
) -> list[int]:
    """The prompt token ids of ``messages`` (and ``tools``) through vLLM's ``renderer``.

    Args:
        renderer: ``vllm.LLM(...).renderer`` (see :func:`arender` for ``AsyncLLM``).
        messages: LangChain messages, tuples or OpenAI chat dicts (:func:`to_openai_messages`).
        tools: OpenAI tool dicts, LangChain tools, pydantic models or functions.
        add_generation_prompt: False for a prefix to fork, True for a call to answer.

    Raises:
        ConfigError: messages or tools that cannot be rendered.

    Example:
        >>> render(llm.renderer, history, [get_weather], add_generation_prompt=False)  # doctest: +SKIP
    """
    chat, params = _request(renderer, messages, tools, add_generation_prompt)
    _, prompts = renderer.render_chat([chat], params)
    return list(prompts[0]["prompt_token_ids"])


async def arender(
    renderer: Any,
    messages: Sequence[Any],
    tools: Sequence[Any] | None = None,
    *,
    add_generation_prompt: bool,
) -> list[int]:
    """The async twin of :func:`render`, for an ``AsyncLLM``'s renderer.

    Example:
        >>> await arender(engine.renderer, history, add_generation_prompt=True)  # doctest: +SKIP
    """
    chat, params = _request(renderer, messages, tools, add_generation_prompt)
    _, prompts = await renderer.render_chat_async([chat], params)
    return list(prompts[0]["prompt_token_ids"])
