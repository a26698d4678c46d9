"""The front of a ``vllm.LLM``: a batch of requests driven through the engine's step loop.

``LLM.generate`` forces final-only outputs, so it cannot say when a request's first token
appeared. :meth:`LLMFront.generate` adds the batch with ``LLMEngine.add_request`` and steps
the engine itself, with delta outputs (or final-only ones when asked), and aborts the
batch's unfinished requests on a deadline, an error or an interrupt. Prompts go through
``llm.renderer.render_cmpl``, the path ``LLM.generate`` takes.

``vllm.LLM`` is not thread safe: every use of the engine here holds the engine's lock
(:func:`engine_lock`), and callers that need several calls in a row hold it around them.

Example:
    >>> front = LLMFront(llm)                                                     # doctest: +SKIP
    >>> (result,) = front.generate([Request(token_ids=[1, 2, 3], params=SamplingParams(max_tokens=4))])
    >>> result.completions[0].token_ids, result.ttft_s, result.num_cached_tokens  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

from .._errors import EngineError
from ._base import (
    ANNOUNCE_PROMPT,
    Collector,
    Front,
    Request,
    RequestTimeoutError,
    Result,
    announce_params,
    engine_failure,
    engine_params,
)
from ._capacity import Capacity, read_capacity

__all__ = ["LLMFront", "engine_lock"]

_BATCHES = itertools.count()
_TAG = uuid.uuid4().hex[:8]  # request ids unique across processes sharing an engine log
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def engine_lock(engine: Any) -> threading.RLock:
    """The lock that serialises this process's use of ``engine`` (one per engine object)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(engine)
        if lock is None:
            lock = threading.RLock()
            _LOCKS[engine] = lock
        return lock


class LLMFront(Front):
    """The front of a ``vllm.LLM`` built with :func:`thaw_agents.engine_kwargs`."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def lock(self) -> contextlib.AbstractContextManager[Any]:
        return engine_lock(self.llm)

    def generate(
        self, requests: Sequence[Request], *, timeout_s: float | None = None, stream: bool = True
    ) -> list[Result]:
        with self.lock():
            try:
                return self._run(requests, timeout_s, stream)
            except Exception as exc:
                failure = engine_failure(exc)
                if failure is None:
                    raise
                raise failure from exc

    def _run(self, requests: Sequence[Request], timeout_s: float | None, stream: bool) -> list[Result]:
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        engine = self.llm.llm_engine
        inputs = self.llm.renderer.render_cmpl(
            [TokensPrompt(prompt_token_ids=list(r.token_ids)) for r in requests]
        )
        batch = f"thaw-{_TAG}-{next(_BATCHES)}"
        collectors: dict[str, Collector] = {}
        start = time.perf_counter()
        deadline = start + timeout_s if timeout_s is not None else None
        pending: set[str] = set()
        try:
            for index, (engine_input, request) in enumerate(zip(inputs, requests, strict=True)):
                request_id = f"{batch}-{index}"
                collectors[request_id] = Collector(len(request.token_ids), start)
                pending.add(request_id)
                engine.add_request(request_id, engine_input, engine_params(request, kind))
            while pending:
                if deadline is not None and time.perf_counter() > deadline:
                    raise RequestTimeoutError(
                        f"{len(pending)} of {len(requests)} requests unfinished after {timeout_s:.1f} s; "
                        "they were aborted"
                    )
                for output in engine.step():
                    collector = collectors.get(output.request_id)
                    if collector is None:  # not ours (cannot happen while the lock is held)
                        continue
                    collector.add(output, timed=stream)
                    if output.finished:
                        pending.discard(output.request_id)
        except BaseException:
            if pending:
                with contextlib.suppress(Exception):  # a dead engine cannot abort; say why it died
                    engine.abort_request(list(pending))
            raise
        failed = [i for i, c in enumerate(collectors.values()) if c.error]
        if failed:
            raise EngineError(
                f"the engine failed request(s) {failed} of this batch (finish_reason='error'); "
                "see the engine log"
            )
        return [c.result() for c in collectors.values()]

    def announce(self, kv_transfer_params: dict[str, Any]) -> None:
        from vllm import TokensPrompt

        with self.lock():
            engine = self.llm.llm_engine
            (engine_input,) = self.llm.renderer.render_cmpl(
                [TokensPrompt(prompt_token_ids=list(ANNOUNCE_PROMPT))]
            )
            request_id = f"thaw-{_TAG}-{next(_BATCHES)}-announce"
            engine.add_request(request_id, engine_input, announce_params(kv_transfer_params))
            engine.abort_request([request_id])

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.llm.get_tokenizer().encode(text, add_special_tokens=add_special_tokens))

    def _render(self, messages: list[Any], tools: Sequence[Any] | None) -> list[int]:
        from ..chat import render

        with self.lock():
            return render(self.llm.renderer, messages, tools, add_generation_prompt=False)

    def _rpc(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        with self.lock():
            return list(self.llm.collective_rpc(method, args=args))

    def capacity(self) -> Capacity:
        return read_capacity(self.llm.llm_engine)

    def _model_config(self) -> Any:
        return self.llm.llm_engine.model_config

    def _cache_config(self) -> Any:
        return self.llm.llm_engine.vllm_config.cache_config
