"""What ``fork`` and ``hydrate`` need from an engine, and the adapter for ``vllm.LLM``.

Anything with a ``_thaw_adapter()`` method returning an :class:`EngineAdapter` (ChatThaw
does) can be forked from and hydrated into, as can a plain ``vllm.LLM``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ._errors import ConfigError, EngineError
from ._kvspec import KVSpec

__all__ = ["EngineAdapter", "LLMAdapter", "adapter_for"]

Prefix = str | Sequence[int] | Sequence[dict[str, Any]]


@runtime_checkable
class EngineAdapter(Protocol):
    """What an engine front offers fork/hydrate. ``kv_spec`` may return the spec as JSON data."""

    def kv_spec(self) -> KVSpec | dict[str, Any]: ...

    def prefix_token_ids(self, prefix: Prefix) -> list[int]: ...

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> int:
        """Run ``token_ids`` as a prompt for one token; return its ``num_cached_tokens``."""
        ...


def _is_messages(prefix: Any) -> bool:
    return (
        isinstance(prefix, Sequence)
        and not isinstance(prefix, str)
        and bool(prefix)
        and all(isinstance(m, dict) or hasattr(m, "type") for m in prefix)
    )


def _as_message_dicts(messages: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if isinstance(message, dict):
            out.append(message)
        else:  # a langchain BaseMessage: keep role and text only
            role = {"human": "user", "ai": "assistant"}.get(message.type, message.type)
            out.append({"role": role, "content": message.content})
    return out


class LLMAdapter:
    """Adapter for ``vllm.LLM`` (synchronous, in-process front)."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self._spec: KVSpec | None = None

    def kv_spec(self) -> KVSpec:
        if self._spec is None:
            try:
                replies = self._llm.collective_rpc("thaw_describe")
            except Exception as exc:
                raise ConfigError(
                    "this engine was not built with thaw's worker extension; build it with "
                    "vllm.LLM(**thaw_agents.engine_kwargs(...)) or thaw_agents.make_llm()"
                ) from exc
            reply = replies[0]
            if "error" in reply:
                raise ConfigError(f"{reply['error']}; build the engine with thaw_agents.engine_kwargs()")
            if len(replies) > 1:
                raise ConfigError("tensor/pipeline parallel engines are not supported by fork yet")
            self._spec = KVSpec.from_json(reply["spec"])
        return self._spec

    def prefix_token_ids(self, prefix: Prefix) -> list[int]:
        if isinstance(prefix, str):
            return list(self._llm.get_tokenizer().encode(prefix))
        if _is_messages(prefix):
            from vllm.renderers import ChatParams

            # The same renderer vLLM's chat path uses, without the generation prompt, so a
            # later chat request with more messages starts with exactly these tokens.
            _, prompts = self._llm.renderer.render_chat(
                [_as_message_dicts(prefix)],
                ChatParams(chat_template_kwargs={"add_generation_prompt": False}),
            )
            return list(prompts[0]["prompt_token_ids"])
        if isinstance(prefix, Sequence) and all(isinstance(t, int) for t in prefix):
            return list(prefix)
        raise ConfigError("prefix must be a string, a list of token ids, or a list of chat messages")

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> int:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": kv_transfer_params}
        )
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False)
        output = outputs[0]
        if output.outputs and output.outputs[0].finish_reason == "error":
            raise EngineError("the engine failed the thaw request; see the engine log")
        return int(output.num_cached_tokens or 0)


_ADAPTERS: weakref.WeakKeyDictionary[Any, EngineAdapter] = weakref.WeakKeyDictionary()


def adapter_for(engine: Any) -> EngineAdapter:
    """The adapter of a ``vllm.LLM``, or of anything exposing ``_thaw_adapter()``."""
    if hasattr(engine, "_thaw_adapter"):
        return _Normalised(engine._thaw_adapter())
    if hasattr(engine, "collective_rpc") and hasattr(engine, "generate"):
        try:
            adapter = _ADAPTERS.get(engine)
        except TypeError:
            adapter = None
        if adapter is None:
            adapter = LLMAdapter(engine)
            with contextlib.suppress(TypeError):  # not weak-referenceable: no caching
                _ADAPTERS[engine] = adapter
        return adapter
    raise ConfigError(
        f"cannot fork from {type(engine).__name__}: pass a vllm.LLM built with "
        "thaw_agents.engine_kwargs(), or a ChatThaw"
    )


class _Normalised:
    """Wraps a foreign adapter so ``kv_spec`` always returns a :class:`KVSpec`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def kv_spec(self) -> KVSpec:
        spec = self._inner.kv_spec()
        return spec if isinstance(spec, KVSpec) else KVSpec.from_json(spec)

    def prefix_token_ids(self, prefix: Prefix) -> list[int]:
        return self._inner.prefix_token_ids(prefix)

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> int:
        return self._inner.run_prefix(token_ids, kv_transfer_params)
