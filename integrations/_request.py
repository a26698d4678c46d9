"""Building one engine request for ChatThaw: sampling parameters, prompt tokens, the fork."""

from __future__ import annotations

import logging
import warnings
from typing import Any, NamedTuple

import thaw_agents
import thaw_agents.chat

# Fields that map one to one onto vllm.SamplingParams, settable per ChatThaw and per call.
SAMPLING_FIELDS = (
    "temperature",
    "max_tokens",
    "top_p",
    "top_k",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)

__all__ = [
    "SAMPLING_FIELDS",
    "ChatRequest",
    "chat_request",
    "is_validation_error",
    "local_tokenizer",
    "prompt_token_ids",
    "resolve_fork",
    "sampling_params",
]

logger = logging.getLogger(__name__)


def is_validation_error(exc: BaseException) -> bool:
    """vLLM's validation errors (not ValueError subclasses in 0.32) and plain ValueError/TypeError."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # pragma: no cover - older vLLM
        VLLMValidationError = ValueError
    return isinstance(exc, (ValueError, TypeError, VLLMValidationError))


class ChatRequest(NamedTuple):
    chat: list[dict[str, Any]]  # OpenAI-style chat dicts (thaw_agents.chat.to_openai_messages)
    tools: list[dict[str, Any]]
    tool_choice: Any
    structured: dict[str, Any] | None
    forced: bool  # tool calls are forced: decoded under their JSON schema
    single_call: bool  # parallel_tool_calls=False: at most one call is read


def chat_request(messages: list[Any], kwargs: dict[str, Any]) -> ChatRequest:
    """The chat dicts, tools, tool choice and structured-output spec of one call, the same for
    the in-process and the remote ChatThaw. The bound tools are rendered into the prompt even
    with ``tool_choice="none"``, so the prompt starts as a trunk forked with those tools does;
    forced calls are decoded under their JSON schema."""
    from ._tools import forced_call_schema

    tools: list[dict[str, Any]] = kwargs.get("tools") or []
    tool_choice = kwargs.get("tool_choice")
    parallel = kwargs.get("parallel_tool_calls")
    structured = kwargs.get("structured_outputs")
    forced = forced_call_schema(tools, tool_choice, parallel)
    if forced is not None:
        structured = {"json": forced}
    chat = thaw_agents.chat.to_openai_messages(messages)
    return ChatRequest(chat, tools, tool_choice, structured, forced is not None, parallel is False)


def sampling_params(
    defaults: dict[str, Any], stop: list[str] | None, overrides: dict[str, Any], structured: Any
) -> Any:
    """``vllm.SamplingParams`` streaming deltas; per-call values override the instance's defaults.

    Raises:
        ConfigError: a value vLLM refuses (a temperature below 0, ...).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    values = dict(defaults)
    for name in defaults.keys() | overrides.keys():
        if name in SAMPLING_FIELDS and overrides.get(name) is not None:
            values[name] = overrides[name]
    try:
        if structured is not None:
            values["structured_outputs"] = StructuredOutputsParams(**structured)
        return SamplingParams(**values, stop=list(stop or []), output_kind=RequestOutputKind.DELTA)
    except Exception as exc:
        if not is_validation_error(exc):
            raise
        raise thaw_agents.ConfigError(f"invalid sampling parameters: {exc}") from exc


async def prompt_token_ids(
    engine: Any, messages: list[Any], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """A call's prompt tokens through the engine's renderer, with the generation prompt; a
    trunk forked from the same messages and tools is its prefix (:mod:`thaw_agents.chat`)."""
    return await thaw_agents.chat.arender(engine.renderer, messages, tools, add_generation_prompt=True)


def resolve_fork(fork: Any) -> thaw_agents.ForkHandle | None:
    """A handle from a handle or an id; None (and a warning) when the snapshot is gone."""
    if fork is None or isinstance(fork, thaw_agents.ForkHandle):
        return fork
    try:
        return thaw_agents.ForkHandle.from_id(str(fork))
    except thaw_agents.SnapshotError as exc:
        warnings.warn(
            f"snapshot {fork} is not available ({exc}); prefilling instead", RuntimeWarning, stacklevel=5
        )
        logger.warning("fork %s unavailable, prefilling: %s", fork, exc)
        return None


_TOKENIZERS: dict[str, Any] = {}


def local_tokenizer(model: str) -> Any:
    """The model's own tokenizer from its local files (never a download)."""
    if model not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[model] = AutoTokenizer.from_pretrained(model, local_files_only=True)
    return _TOKENIZERS[model]
