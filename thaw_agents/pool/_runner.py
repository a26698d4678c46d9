"""Run a batch of token prompts on a ``vllm.LLM``, timing each request's first token.

``LLM.generate`` forces final-only outputs, so it cannot say when a request's first
token appeared. This drives the engine's own step loop (``LLMEngine.add_request`` and
``step``) with delta outputs instead, collects each request's completions, and aborts
the batch's requests at a deadline so a slow batch never blocks its caller forever.
Prompts are rendered through ``llm.renderer.render_cmpl``, the path ``LLM.generate`` uses.

The engine must not be stepped by anyone else meanwhile (``vllm.LLM`` is not thread
safe): callers hold the engine's lock (:func:`engine_lock`).

Example:
    >>> out = run_batch(llm, [[1, 2, 3]], [SamplingParams(max_tokens=4)])   # doctest: +SKIP
    >>> out[0]["completions"][0]["token_ids"], out[0]["ttft_s"]             # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._protocol import BranchReply, CompletionData

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = ["BatchTimeout", "engine_lock", "run_batch"]

_COUNTER = itertools.count()
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class BatchTimeout(TimeoutError):
    """The batch ran past its deadline; its unfinished requests were aborted."""


def engine_lock(engine: Any) -> threading.RLock:
    """The lock that serialises this process's use of ``engine`` (one per engine object)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(engine)
        if lock is None:
            lock = threading.RLock()
            _LOCKS[engine] = lock
        return lock


class _Request:
    __slots__ = ("completions", "done_s", "index", "num_cached", "num_prompt", "ttft_s")

    def __init__(self, index: int, num_prompt: int) -> None:
        self.index = index
        self.num_prompt = num_prompt
        self.num_cached: int | None = None
        self.ttft_s: float | None = None
        self.done_s: float | None = None
        self.completions: dict[int, CompletionData] = {}


def run_batch(
    llm: Any,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    *,
    timeout_s: float | None = None,
) -> list[BranchReply]:
    """Run every prompt in one batch; return per-request completions and timings, in order.

    Args:
        llm: a ``vllm.LLM``.
        prompts: token ids, one list per request.
        params: sampling parameters, one per request (``n > 1`` gives n completions).
        timeout_s: abort the unfinished requests and raise :class:`BatchTimeout` after this.

    Times (``ttft_s``, ``generate_s``) count from the moment the batch was submitted.
    ``num_cached_tokens`` is the smallest over a request's ``n`` samples.
    """
    from vllm import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    inputs = llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=list(p)) for p in prompts])
    batch = next(_COUNTER)
    requests: dict[str, _Request] = {}
    start = time.perf_counter()
    deadline = start + timeout_s if timeout_s is not None else None
    try:
        for index, (engine_input, sp, prompt) in enumerate(zip(inputs, params, prompts, strict=True)):
            request_id = f"thaw-branch-{batch}-{index}"
            local = sp.clone()
            local.output_kind = RequestOutputKind.DELTA
            requests[request_id] = _Request(index, len(prompt))
            engine.add_request(request_id, engine_input, local)
        pending = set(requests)
        while pending:
            if deadline is not None and time.perf_counter() > deadline:
                raise BatchTimeout(
                    f"{len(pending)} of {len(requests)} requests unfinished after {timeout_s:.1f} s"
                )
            for output in engine.step():
                request = requests.get(output.request_id)
                if request is None:  # not ours (should not happen while the lock is held)
                    continue
                now = time.perf_counter() - start
                _absorb(request, output, now)
                if output.finished:
                    request.done_s = now
                    pending.discard(output.request_id)
    except BaseException:
        unfinished = [rid for rid, r in requests.items() if r.done_s is None]
        if unfinished:
            engine.abort_request(unfinished)
        raise
    return [_reply(r) for r in requests.values()]


def _absorb(request: _Request, output: Any, now: float) -> None:
    if output.num_cached_tokens is not None:
        cached = int(output.num_cached_tokens)
        request.num_cached = cached if request.num_cached is None else min(request.num_cached, cached)
    for delta in output.outputs:
        completion = request.completions.setdefault(
            delta.index,
            {"index": delta.index, "text": "", "token_ids": [], "finish_reason": None, "stop_reason": None},
        )
        if delta.token_ids and request.ttft_s is None:
            request.ttft_s = now
        completion["text"] += delta.text
        completion["token_ids"].extend(int(t) for t in delta.token_ids)
        if delta.finish_reason is not None:
            completion["finish_reason"] = delta.finish_reason
            completion["stop_reason"] = delta.stop_reason


def _reply(request: _Request) -> BranchReply:
    done = request.done_s or 0.0
    return {
        "index": request.index,
        "completions": [request.completions[i] for i in sorted(request.completions)],
        "num_prompt_tokens": request.num_prompt,
        "num_cached_tokens": request.num_cached or 0,
        "ttft_s": request.ttft_s if request.ttft_s is not None else done,
        "generate_s": done,
    }
