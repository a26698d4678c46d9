"""What every front shares: the request and result values, the typed errors, and the base class.

A front is the one way thaw-agents talks to an engine: it submits token ids with sampling
params (and optionally thaw's ``kv_transfer_params``), reads each request's outputs into a
:class:`Result` (or streams them as :class:`Delta` values), and calls thaw's worker RPCs.

Example:
    >>> from vllm import SamplingParams
    >>> request = Request(token_ids=[1, 2, 3], params=SamplingParams(max_tokens=4))
    >>> request.kv_transfer_params is None
    True
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError, EngineError, RequestTimeoutError, ThawError
from .._kv_ranks import combine_rank_results
from .._kvspec import KVSpec
from ._capacity import Capacity

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = [
    "Completion",
    "Delta",
    "Front",
    "PrefixRun",
    "Request",
    "RequestTimeoutError",
    "Result",
]

Prefix = str | Sequence[int] | Sequence[Any]


@dataclass(frozen=True, slots=True)
class PrefixRun:
    """What a one-token prefix request reports: tokens served from cache or snapshot, and the
    connector's ``kv_transfer_params["thaw"]`` report (None when it sent none)."""

    num_cached_tokens: int
    report: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One prompt for a front.

    Attributes:
        token_ids: the prompt's token ids.
        params: vLLM sampling params (``n > 1`` gives ``n`` completions); never modified.
        kv_transfer_params: thaw's params (``load_params``/``save_params``), or None to leave
            whatever ``params.extra_args`` carries (``with_fork`` puts them there).
    """

    token_ids: Sequence[int]
    params: SamplingParams
    kv_transfer_params: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """One sample of a request (a request has ``n`` of them).

    Attributes:
        index: the sample's index in ``0..n-1``.
        text: the generated text.
        token_ids: the generated token ids.
        finish_reason: ``"stop"``, ``"length"`` (or ``"abort"`` from the engine).
        stop_reason: the stop string or token that ended it, if any.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """A finished request.

    Attributes:
        completions: its samples, by index.
        num_prompt_tokens: the prompt's length.
        num_cached_tokens: prompt tokens served from the prefix cache or a snapshot (the
            smallest over the samples).
        ttft_s: from submission to the first generated token; None for a final-only request.
        total_s: from submission to the last output.
        report: the connector's ``kv_transfer_params["thaw"]`` report, or None.
    """

    completions: tuple[Completion, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    ttft_s: float | None
    total_s: float
    report: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The first sample's text."""
        return self.completions[0].text if self.completions else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Delta:
    """What one engine output added to one sample of a streamed request.

    ``num_cached_tokens`` is known from the first output on; ``report`` comes with the
    request's last output (``finished``).
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    finished: bool
    report: dict[str, Any] | None = None


def thaw_report(kv_transfer_params: Any) -> dict[str, Any] | None:
    """The connector's report in a finished request's ``kv_transfer_params``."""
    if isinstance(kv_transfer_params, dict) and isinstance(kv_transfer_params.get("thaw"), dict):
        return kv_transfer_params["thaw"]
    return None


def engine_params(request: Request, output_kind: Any) -> SamplingParams:
    """A copy of the request's sampling params with the output kind and thaw's params set."""
    params = request.params.clone()
    params.output_kind = output_kind
    if request.kv_transfer_params is not None:
        # A new dict: clone() may be shallow (skip_clone), and the caller's params stay as given.
        params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": request.kv_transfer_params}
    return params


# The prompt of an announce request: never run, any valid token id will do.
ANNOUNCE_PROMPT = (0,)


def announce_params(kv_transfer_params: dict[str, Any]) -> SamplingParams:
    """The params of an announce request (:meth:`Front.announce`): thaw's params, final output only."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    request = Request(
        token_ids=ANNOUNCE_PROMPT, params=SamplingParams(max_tokens=1), kv_transfer_params=kv_transfer_params
    )
    return engine_params(request, RequestOutputKind.FINAL_ONLY)


def deltas(output: Any) -> Iterator[Delta]:
    """One :class:`Delta` per sample in a DELTA ``RequestOutput``; EngineError for an engine failure."""
    cached = int(output.num_cached_tokens or 0)
    report = thaw_report(output.kv_transfer_params) if output.finished else None
    for completion in output.outputs:
        if completion.finish_reason == "error":
            raise EngineError("the engine failed this request (finish_reason='error'); see the engine log")
        yield Delta(
            index=completion.index,
            text=completion.text,
            token_ids=tuple(int(t) for t in completion.token_ids),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
            num_cached_tokens=cached,
            finished=bool(output.finished),
            report=report,
        )


@dataclass(slots=True)
class Collector:
    """Builds one request's :class:`Result` from its outputs (DELTA or FINAL_ONLY)."""

    num_prompt_tokens: int
    start: float
    ttft_s: float | None = None
    total_s: float | None = None
    num_cached: int | None = None
    report: dict[str, Any] | None = None
    error: bool = False
    samples: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, output: Any, *, timed: bool) -> None:
        now = time.perf_counter() - self.start
        if output.num_cached_tokens is not None:
            cached = int(output.num_cached_tokens)
            self.num_cached = cached if self.num_cached is None else min(self.num_cached, cached)
        for completion in output.outputs:
            sample = self.samples.setdefault(
                completion.index, {"text": "", "token_ids": [], "finish_reason": None, "stop_reason": None}
            )
            if timed and completion.token_ids and self.ttft_s is None:
                self.ttft_s = now
            sample["text"] += completion.text
            sample["token_ids"].extend(int(t) for t in completion.token_ids)
            if completion.finish_reason is not None:
                sample["finish_reason"] = completion.finish_reason
                sample["stop_reason"] = completion.stop_reason
                self.error |= completion.finish_reason == "error"
        if output.finished:
            self.total_s = now
            self.report = thaw_report(output.kv_transfer_params) or self.report

    def result(self) -> Result:
        total = self.total_s if self.total_s is not None else time.perf_counter() - self.start
        completions = tuple(
            Completion(
                index=i,
                text=s["text"],
                token_ids=tuple(s["token_ids"]),
                finish_reason=s["finish_reason"],
                stop_reason=s["stop_reason"],
            )
            for i, s in sorted(self.samples.items())
        )
        return Result(
            completions=completions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached or 0,
            ttft_s=self.ttft_s,
            total_s=total,
            report=self.report,
        )


def engine_failure(exc: BaseException) -> ThawError | None:
    """The typed error for an exception vLLM raised on a request; None to let it pass."""
    if isinstance(exc, ThawError):
        return None
    if type(exc).__name__ == "EngineDeadError":
        return EngineError(f"the vLLM engine died: {exc}; create a new engine (vllm.LLM or ChatThaw)")
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # an older vLLM: its validation errors are ValueErrors
        VLLMValidationError = ValueError
    if isinstance(exc, (ValueError, TypeError, VLLMValidationError)):
        return ConfigError(f"vLLM refused the request: {exc}")
    return None


def describe_reply(replies: Sequence[Any]) -> dict[str, Any]:
    """The engine's ``thaw_describe`` reply from its workers' (one per tensor-parallel rank);
    ConfigError for an engine not set up for thaw, ranks that disagree, or a pipeline-parallel one.
    """
    if not replies:
        raise ConfigError("the engine has no workers; build the engine with thaw_agents.engine_kwargs()")
    for reply in replies:
        if not isinstance(reply, dict) or "error" in reply:
            error = reply.get("error") if isinstance(reply, dict) else reply
            raise ConfigError(f"{error}; build the engine with thaw_agents.engine_kwargs()")
    first = replies[0]
    ranks = first["spec"].get("tensor_parallel_size", 1) if isinstance(first.get("spec"), dict) else 1
    if len(replies) != ranks:
        raise ConfigError(
            f"the engine has {len(replies)} workers for {ranks} tensor-parallel ranks: "
            "pipeline-parallel engines are not supported by fork"
        )
    for reply in replies[1:]:
        if reply.get("spec") != first.get("spec") or reply.get("store") != first.get("store"):
            raise ConfigError(
                "the engine's tensor-parallel ranks describe different KV caches or snapshot stores; "
                "give every rank the same THAW_AGENTS_STORE"
            )
    return first


def is_messages(prefix: Any) -> bool:
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


class Front:
    """The interface of a front; :class:`LLMFront` and :class:`AsyncLLMFront` implement it.

    Subclasses provide ``generate``, ``encode``, ``_rpc``, ``_render``, ``_model_config`` and
    ``_cache_config``; the rest is built on them here.
    """

    _reply: dict[str, Any] | None = None

    # -- requests -----------------------------------------------------------------------------
    def generate(
        self, requests: Sequence[Request], *, timeout_s: float | None = None, stream: bool = True
    ) -> list[Result]:
        """Run ``requests`` together; their results in input order.

        ``stream=True`` reads an output every engine step (first-token times are measured);
        ``False`` asks vLLM for final outputs only (cheaper; ``ttft_s`` is None).

        Raises:
            RequestTimeoutError: past ``timeout_s``; the unfinished requests were aborted.
            EngineError: the engine failed a request or died.
            ConfigError: vLLM refused a request (too long, bad params).
        """
        raise NotImplementedError

    def announce(self, kv_transfer_params: dict[str, Any]) -> None:
        """Hand the connector ``kv_transfer_params`` on a request the engine never runs.

        The connector reads a request's params when it arrives; this one (a one-token prompt)
        is added and aborted at once, and the connector keeps it unscheduled meanwhile, so it
        costs no engine step. What :meth:`ForkHandle.hydrate` does.
        """
        raise NotImplementedError

    def run_prefix(self, token_ids: Sequence[int], kv_transfer_params: dict[str, Any]) -> PrefixRun:
        """Run ``token_ids`` for one greedy token with thaw's params (what fork does)."""
        from vllm import SamplingParams

        request = Request(
            token_ids=token_ids,
            params=SamplingParams(max_tokens=1, temperature=0.0),
            kv_transfer_params=kv_transfer_params,
        )
        (result,) = self.generate([request], stream=False)
        return PrefixRun(result.num_cached_tokens, result.report)

    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """Held around work that must not interleave with other callers' use of this engine."""
        return contextlib.nullcontext()

    # -- tokens ---------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``text`` in the engine's tokenizer."""
        raise NotImplementedError

    def prefix_token_ids(self, prefix: Prefix, tools: Sequence[Any] | None = None) -> list[int]:
        """A prefix (text, token ids or chat messages, rendered with ``tools``) as token ids."""
        if isinstance(prefix, str):
            return self.encode(prefix)
        if is_messages(prefix):
            # ChatThaw renders a call the same way, with the generation prompt: its prompt
            # starts with exactly these tokens when it carries these messages and tools.
            return self._render(list(prefix), tools)
        if isinstance(prefix, Sequence) and all(isinstance(t, int) for t in prefix):
            return list(prefix)
        raise ConfigError("prefix must be a string, a list of token ids, or a list of chat messages")

    def _render(self, messages: list[Any], tools: Sequence[Any] | None) -> list[int]:
        raise NotImplementedError

    # -- the engine's configuration and thaw's RPCs -----------------------------------------------
    def default_sampling_params(self) -> SamplingParams:
        """The model's default sampling params (its generation config), as ``LLM`` takes them."""
        from vllm import SamplingParams

        diff = self._model_config().get_diff_sampling_param()
        return SamplingParams.from_optional(**diff) if diff else SamplingParams()

    def capacity(self) -> Capacity:
        """The engine's free batch slots and KV blocks now (see :mod:`._capacity`)."""
        raise NotImplementedError

    def prefix_caching(self) -> tuple[bool, int]:
        """Whether the engine caches prefixes, and its block size in tokens."""
        cache = self._cache_config()
        return bool(cache.enable_prefix_caching), int(cache.block_size)

    def describe(self) -> dict[str, Any]:
        """The engine's ``thaw_describe`` reply: ``{"spec": <KVSpec JSON>, "store": <folder>}``."""
        if self._reply is None:
            try:
                replies = self._rpc("thaw_describe", ())
            except ThawError:
                raise
            except Exception as exc:
                raise ConfigError(
                    "this engine was not built with thaw's worker extension; build it with "
                    "vllm.LLM(**thaw_agents.engine_kwargs(...)) or thaw_agents.make_llm()"
                ) from exc
            self._reply = describe_reply(list(replies))
        return self._reply

    def kv_spec(self) -> KVSpec:
        """The engine's KV cache layout."""
        spec = self.describe()["spec"]
        return spec if isinstance(spec, KVSpec) else KVSpec.from_json(spec)

    def store(self) -> Path:
        """The engine connector's snapshot store (where it reads and writes by id)."""
        return Path(self.describe()["store"])

    def save_result(self, snapshot_id: str) -> dict[str, Any] | None:
        """The engine's result for a save of ``snapshot_id`` (``thaw_save_result``, every rank's
        combined); None while any rank's share is queued or being written."""
        return combine_rank_results(self._rpc("thaw_save_result", (snapshot_id,)))

    def _rpc(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        raise NotImplementedError

    def _model_config(self) -> Any:
        raise NotImplementedError

    def _cache_config(self) -> Any:
        raise NotImplementedError
