"""What ``fork`` and ``hydrate`` need from an engine, and the adapter for ``vllm.LLM``.

Anything with a ``_thaw_adapter()`` method returning an :class:`EngineAdapter` (ChatThaw
does) can be forked from and hydrated into, as can a plain ``vllm.LLM``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ._errors import ConfigError, EngineError
from ._kvspec import KVSpec

__all__ = ["EngineAdapter", "LLMAdapter", "PrefixRun", "adapter_for"]

Prefix = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class PrefixRun:
    """What a one-token prefix request reports: tokens served from cache or snapshot, and the
    connector's ``kv_transfer_params["thaw"]`` report (None when it sent none)."""

    num_cached_tokens: int
    report: dict[str, Any] | None = None


@runtime_checkable
class EngineAdapter(Protocol):
    """What an engine front offers fork/hydrate.

    ``describe`` returns the engine's ``thaw_describe`` reply: ``{"spec": <KVSpec JSON>,
    "store": <folder>}``; ``run_prefix`` returns ``(num_cached_tokens, thaw report or None)``.
    """

    def describe(self) -> dict[str, Any]: ...

    def prefix_token_ids(self, prefix: Prefix, tools: Sequence[Any] | None = None) -> list[int]: ...

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> Any:
        """Run ``token_ids`` as a prompt for one token."""
        ...


def thaw_report(kv_transfer_params: Any) -> dict[str, Any] | None:
    """The connector's report in a finished request's ``kv_transfer_params``."""
    if isinstance(kv_transfer_params, dict) and isinstance(kv_transfer_params.get("thaw"), dict):
        return kv_transfer_params["thaw"]
    return None


def _describe_reply(replies: list[Any]) -> dict[str, Any]:
    reply = replies[0] if replies else {"error": "the engine has no workers"}
    if not isinstance(reply, dict) or "error" in reply:
        error = reply.get("error") if isinstance(reply, dict) else reply
        raise ConfigError(f"{error}; build the engine with thaw_agents.engine_kwargs()")
    if len(replies) > 1:
        raise ConfigError("tensor/pipeline parallel engines are not supported by fork yet")
    return reply


def _is_messages(prefix: Any) -> bool:
    """Chat messages: dicts, LangChain messages (they have a ``type``) or ``(role, text)`` pairs."""
    return (
        isinstance(prefix, Sequence)
        and not isinstance(prefix, str)
        and bool(prefix)
        and all(
            isinstance(m, dict)
            or hasattr(m, "type")
            or (isinstance(m, tuple) and len(m) == 2 and all(isinstance(x, str) for x in m))
            for m in prefix
        )
    )


class LLMAdapter:
    """Adapter for ``vllm.LLM`` (synchronous, in-process front)."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self._reply: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        if self._reply is None:
            try:
                replies = self._llm.collective_rpc("thaw_describe")
            except Exception as exc:
                raise ConfigError(
                    "this engine was not built with thaw's worker extension; build it with "
                    "vllm.LLM(**thaw_agents.engine_kwargs(...)) or thaw_agents.make_llm()"
                ) from exc
            self._reply = _describe_reply(list(replies))
        return self._reply

    def prefix_token_ids(self, prefix: Prefix, tools: Sequence[Any] | None = None) -> list[int]:
        if isinstance(prefix, str):
            return list(self._llm.get_tokenizer().encode(prefix))
        if _is_messages(prefix):
            from .chat import render

            # ChatThaw renders a call the same way, with the generation prompt: its prompt
            # starts with exactly these tokens when it carries these messages and tools.
            return render(self._llm.renderer, prefix, tools, add_generation_prompt=False)
        if isinstance(prefix, Sequence) and all(isinstance(t, int) for t in prefix):
            return list(prefix)
        raise ConfigError("prefix must be a string, a list of token ids, or a list of chat messages")

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> PrefixRun:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": kv_transfer_params}
        )
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False)
        output = outputs[0]
        if output.outputs and output.outputs[0].finish_reason == "error":
            raise EngineError("the engine failed the thaw request; see the engine log")
        return PrefixRun(int(output.num_cached_tokens or 0), thaw_report(output.kv_transfer_params))

    def save_result(self, snapshot_id: str) -> dict[str, Any] | None:
        """The engine's result for a save of ``snapshot_id``; None while it is being written."""
        return self._llm.collective_rpc("thaw_save_result", args=(snapshot_id,))[0]


_ADAPTERS: weakref.WeakKeyDictionary[Any, LLMAdapter] = weakref.WeakKeyDictionary()


def adapter_for(engine: Any) -> _Normalised:
    """The adapter of a ``vllm.LLM``, or of anything exposing ``_thaw_adapter()``."""
    if isinstance(engine, _Normalised):
        return engine
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
        return _Normalised(adapter)
    raise ConfigError(
        f"cannot fork from {type(engine).__name__}: pass a vllm.LLM built with "
        "thaw_agents.engine_kwargs(), or a ChatThaw"
    )


class _Normalised:
    """Wraps an adapter (ours or a front's ``_thaw_adapter()``) with typed results."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def describe(self) -> dict[str, Any]:
        return self._inner.describe()

    def kv_spec(self) -> KVSpec:
        spec = self.describe()["spec"]
        return spec if isinstance(spec, KVSpec) else KVSpec.from_json(spec)

    def store(self) -> Path:
        """The engine connector's snapshot store (where it reads and writes by id)."""
        return Path(self.describe()["store"])

    def prefix_token_ids(self, prefix: Prefix, tools: Sequence[Any] | None = None) -> list[int]:
        if tools is None:  # a front that renders no tools (the server's) takes the prefix alone
            return self._inner.prefix_token_ids(prefix)
        return self._inner.prefix_token_ids(prefix, tools)

    def save_result(self, snapshot_id: str) -> dict[str, Any] | None:
        return self._inner.save_result(snapshot_id)

    def run_prefix(self, token_ids: list[int], kv_transfer_params: dict[str, Any]) -> PrefixRun:
        run = self._inner.run_prefix(token_ids, kv_transfer_params)
        if isinstance(run, PrefixRun):
            return run
        cached, report = run
        return PrefixRun(int(cached), report)
