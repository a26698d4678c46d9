"""thaw_agents.chat: one converter and renderer, through vLLM's renderer and the real tokenizer.

No engine starts here: vLLM's renderer is built from the model's config and tokenizer alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

import thaw_agents
from thaw_agents import chat
from thaw_agents.models import default_model


@tool
def get_weather(city: str, unit: str) -> str:
    """Get the current weather in a city, in celsius or fahrenheit."""
    return f"20 degrees {unit} in {city}"


CALL = {"name": "get_weather", "args": {"city": "Oslo", "unit": "c"}, "id": "call_1"}
HISTORY = [
    SystemMessage("You are a weather assistant."),
    HumanMessage("Weather in Oslo?"),
    AIMessage("", tool_calls=[CALL]),
    ToolMessage("20 degrees c in Oslo", tool_call_id="call_1"),
    AIMessage("It is 20 degrees in Oslo."),
]
HISTORY_DICTS = [
    {"role": "system", "content": "You are a weather assistant."},
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "20 degrees c in Oslo"},
    {"role": "assistant", "content": "It is 20 degrees in Oslo."},
]

# A small template that takes tools, in the shape of Qwen2.5's and Llama 3.1's: the tools in
# the system turn, calls as JSON, tool results in their own turn.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t['function']['name'] }};"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}CALL {{ c['function']['name'] }} "
    "{{ c['function']['arguments']['city'] }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _renderer(folder: Path):
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.registry import renderer_from_config

    return renderer_from_config(VllmConfig(model_config=ModelConfig(model=str(folder))))


@pytest.fixture(scope="module")
def renderer():
    """vLLM's renderer for the default model (SmolLM2: its template does not take tools)."""
    return _renderer(default_model(progress=False))


@pytest.fixture(scope="module")
def tools_renderer(tmp_path_factory: pytest.TempPathFactory):
    """vLLM's renderer for the default model's config and tokenizer with a template that takes tools."""
    folder = tmp_path_factory.mktemp("tools-template")
    source = default_model(progress=False)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    (folder / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return _renderer(folder)


def _text(renderer, ids: list[int]) -> str:
    return renderer.get_tokenizer().decode(ids)


def test_dicts_and_langchain_messages_convert_alike() -> None:
    as_dicts = chat.to_openai_messages(HISTORY_DICTS)
    assert as_dicts == chat.to_openai_messages(HISTORY)
    assert as_dicts[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert as_dicts[3] == {"role": "tool", "tool_call_id": "call_1", "content": "20 degrees c in Oslo"}
    assert chat.to_openai_messages([("human", "Hi")]) == [{"role": "user", "content": "Hi"}]


def test_bad_messages_are_typed_errors() -> None:
    with pytest.raises(thaw_agents.ConfigError, match="no messages"):
        chat.to_openai_messages([])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(thaw_agents.ConfigError, match="only text"):
        chat.to_openai_messages([HumanMessage([{"type": "text", "text": "What is it?"}, image])])


def test_tools_convert_like_bind_tools() -> None:
    assert chat.to_openai_tools([get_weather]) == [convert_to_openai_tool(get_weather)]
    assert chat.to_openai_tools(None) is None and chat.to_openai_tools([]) is None


def test_the_default_template_does_not_take_tools(renderer, tools_renderer) -> None:
    assert chat.template_takes_tools(renderer.get_tokenizer()) is False
    assert chat.template_takes_tools(tools_renderer.get_tokenizer()) is True


def test_a_fork_prefix_starts_every_call_of_the_same_history(renderer) -> None:
    """What fork() renders (no generation prompt) is the start of what ChatThaw sends, from
    dicts or LangChain messages alike, tool calls and results included."""
    prefix = chat.render(renderer, HISTORY_DICTS, add_generation_prompt=False)
    call = chat.render(renderer, [*HISTORY, HumanMessage("And Bergen?")], add_generation_prompt=True)
    assert call[: len(prefix)] == prefix and len(call) > len(prefix)
    text = _text(renderer, prefix)
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>' in text
    )
    assert (
        "<|im_start|>user\n<tool_response name=get_weather>\n20 degrees c in Oslo\n</tool_response>" in text
    )


def test_tools_are_part_of_the_prefix(renderer) -> None:
    with_tools = chat.render(renderer, HISTORY, [get_weather], add_generation_prompt=False)
    call = chat.render(renderer, [*HISTORY, ("human", "Bergen?")], [get_weather], add_generation_prompt=True)
    assert call[: len(with_tools)] == with_tools
    assert "<tools>" in _text(renderer, with_tools) and "get_weather" in _text(renderer, with_tools[:80])
    # A trunk forked without the tools leaves a tool-calling call's prompt in its system message.
    without = chat.render(renderer, HISTORY, add_generation_prompt=False)
    same = next(i for i, (a, b) in enumerate(zip(without, call, strict=False)) if a != b)
    assert same < 20


def test_a_template_that_takes_tools_gets_them_and_the_tool_messages(tools_renderer) -> None:
    prefix = chat.render(tools_renderer, HISTORY, [get_weather], add_generation_prompt=False)
    call = chat.render(
        tools_renderer, [*HISTORY, ("human", "Bergen?")], [get_weather], add_generation_prompt=True
    )
    assert call[: len(prefix)] == prefix
    text = _text(tools_renderer, prefix)
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;<|im_end|>")
    assert "<|im_start|>assistant\nCALL get_weather Oslo<|im_end|>" in text  # arguments as an object
    assert "<|im_start|>tool\n20 degrees c in Oslo<|im_end|>" in text  # a tool message stays one
    assert "<tool_call>" not in text and "<tools>" not in text


def test_hermes_messages_name_results_by_their_call() -> None:
    written = chat.hermes_messages(chat.to_openai_messages(HISTORY), chat.to_openai_tools([get_weather]))
    assert [m["role"] for m in written] == ["system", "user", "assistant", "user", "assistant"]
    assert written[0]["content"].startswith("You are a weather assistant.\n\nYou can call functions.")
    assert (
        json.loads(written[0]["content"].split("<tools>\n")[1].split("\n</tools>")[0])
        == (convert_to_openai_tool(get_weather)["function"])
    )
    assert written[3]["content"].startswith("<tool_response name=get_weather>")
    assert "tool_calls" not in written[2]


def test_a_tool_message_without_its_call_id_is_a_config_error() -> None:
    with pytest.raises(thaw_agents.ConfigError, match="tool_call_id"):
        chat.to_openai_messages([{"role": "tool", "content": "20 C"}])
