"""The one way thaw-agents sends a request to a vLLM engine and reads its result.

Two fronts behind one interface (:class:`Front`):

- :class:`LLMFront` over a ``vllm.LLM``: a batch driven through the engine's step loop
  (``generate`` times each request's first token, aborts on a deadline).
- :class:`AsyncLLMFront` over an ``AsyncLLM``: ``astream`` yields one request's deltas;
  ``agenerate`` runs requests concurrently; the synchronous methods run on the engine's loop.

Both offer:

- ``generate(requests, timeout_s=, stream=)`` -> one :class:`Result` per :class:`Request`:
  completions, ``num_cached_tokens``, ``ttft_s``, the connector's ``report``;
  ``stream=False`` asks for final outputs only (cheaper, no first-token time).
- ``run_prefix(token_ids, kv_transfer_params)``: the one-token request of fork.
- ``announce(kv_transfer_params)``: hand the connector params on a request the engine never
  runs (added and aborted at once; what hydrate does).
- ``describe()`` / ``kv_spec()`` / ``store()``: the ``thaw_describe`` RPC (every tensor-parallel
  rank's reply, checked equal).
- ``save_result(snapshot_id)``: the ``thaw_save_result`` RPC (every rank's result combined; None
  while any rank's share is being written).
- ``prefix_token_ids(prefix, tools)``: text, token ids or chat messages (rendered by
  :mod:`thaw_agents.chat`) as token ids; ``encode(text)``.
- ``capacity()``: free batch slots and KV blocks (:class:`Capacity`), from the front process's
  own bookkeeping.
- ``default_sampling_params()``, ``prefix_caching()``, ``lock()``.

Errors: :class:`RequestTimeoutError` (an ``EngineError`` and a ``TimeoutError``; the request
was aborted), ``EngineError`` (``finish_reason="error"`` or a dead engine), ``ConfigError``
(vLLM refused the request). Cancelling a request aborts it in the engine.

Example:
    >>> from vllm import SamplingParams
    >>> front = front_for(llm)                                                  # doctest: +SKIP
    >>> (r,) = front.generate([Request(token_ids=ids, params=SamplingParams(max_tokens=8))])
    >>> r.text, r.ttft_s, r.num_cached_tokens                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

from .._errors import ConfigError
from ._async import AsyncLLMFront
from ._base import Completion, Delta, Front, Prefix, PrefixRun, Request, RequestTimeoutError, Result
from ._capacity import Capacity
from ._llm import LLMFront, engine_lock

__all__ = [
    "AsyncLLMFront",
    "Capacity",
    "Completion",
    "Delta",
    "Front",
    "LLMFront",
    "Prefix",
    "PrefixRun",
    "Request",
    "RequestTimeoutError",
    "Result",
    "engine_lock",
    "front_for",
]

_FRONTS: weakref.WeakKeyDictionary[Any, LLMFront] = weakref.WeakKeyDictionary()


def front_for(engine: Any) -> Front:
    """The front of ``engine``: itself when it is a front; one per ``vllm.LLM``; what its
    ``_thaw_adapter()`` returns for anything else that has one (ChatThaw, a bound ChatThaw).

    Raises:
        ConfigError: ``engine`` is neither.
    """
    if isinstance(engine, Front):
        return engine
    if hasattr(engine, "_thaw_adapter"):
        front = engine._thaw_adapter()
        if isinstance(front, Front):
            return front
        raise ConfigError(
            f"{type(engine).__name__}._thaw_adapter() returned a {type(front).__name__}, not a Front"
        )
    if hasattr(engine, "llm_engine") and hasattr(engine, "collective_rpc"):  # a vllm.LLM
        try:
            front = _FRONTS.get(engine)
        except TypeError:  # not hashable
            front = None
        if front is None:
            front = LLMFront(engine)
            with contextlib.suppress(TypeError):  # not weak-referenceable: no caching
                _FRONTS[engine] = front
        return front
    raise ConfigError(
        f"{type(engine).__name__} is not an engine thaw can run requests on: pass a vllm.LLM built "
        "with thaw_agents.engine_kwargs(), or a ChatThaw"
    )
