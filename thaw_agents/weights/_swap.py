"""``swap_weights``: a weights file into a running engine (RL policy updates, several models
behind one server).

The swap runs in the engine's workers (the ``thaw_swap_weights`` RPC of the worker
extension) through :func:`~thaw_agents.weights._inplace.restore_into_running_model`: every
check and checksum before the first write, then vLLM's post-load processing again. Then:

* the prefix cache is dropped (its blocks were computed by the old weights);
* the engine's model fingerprint becomes the new weights' (:func:`weights_fingerprint`): the
  workers' KV spec changes at once (what ``with_fork`` and ``hydrate`` check, through the
  front's ``describe``); the scheduler half of the connector, in the engine core, learns it
  through vLLM's ``reset_prefix_cache(reset_connector=True)``: it forgets its fingerprint,
  refuses every snapshot load meanwhile, and asks the worker for it in the next step's
  metadata. The swap runs that step itself (one token), so no request sees the gap.

Requests in flight: an ``AsyncLLM`` (ChatThaw, the server) *waits* for them (vLLM's
``pause_generation(mode="wait")``); requests that arrive during the swap queue in the engine
and run after it, in arrival order. A ``vllm.LLM`` runs requests only inside ``generate``: the
swap takes the engine's lock, so it waits for other threads' calls; requests added to the
engine but not run (``llm.llm_engine.add_request`` by hand) make it refuse with
:class:`~thaw_agents.EngineError`.

Example:
    >>> import thaw_agents                                                   # doctest: +SKIP
    >>> llm = thaw_agents.make_llm("/models/policy")                          # doctest: +SKIP
    >>> thaw_agents.swap_weights(llm, "/snap/policy-step-7.thaw").fingerprint  # doctest: +SKIP
    'sha256:...'
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from .. import _errors
from .._errors import ConfigError, EngineError, SnapshotMismatchError, ThawError
from ._host import HostWeights

__all__ = ["SwapResult", "aswap_weights", "swap_weights"]

_METHOD = "thaw_swap_weights"
# HostWeights of this process, for a worker that runs in it (an in-process engine): the worker
# uses the caller's verified copy instead of reading the file again.
_HELD: dict[int, HostWeights] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class SwapResult:
    """What a swap did.

    Attributes:
        fingerprint: the engine's model fingerprint from now on (KV snapshots must match it).
        nbytes: bytes restored; num_tensors: tensors restored.
        restore_s: the verified restore in the workers (read, checksums, copy).
        process_s: vLLM's post-load processing after it (on CPU: repacking every linear layer).
        total_s: the whole swap: waiting for requests in flight, the RPC, the prefix-cache
            reset and the one-token step after it (on CPU its first forward on the repacked
            weights builds the GEMM kernels, which the first request would pay otherwise).
        route: how the bytes moved (``mmap``, ``host``, ``buffered+ring+landing+gpu-verified``...).
    """

    fingerprint: str
    nbytes: int
    num_tensors: int
    restore_s: float
    process_s: float
    total_s: float
    route: str


def _rpc_args(snapshot: str | os.PathLike[str] | HostWeights) -> tuple[Any, ...]:
    """``(path, hold, owner pid, token)``: plain data, the RPC may cross processes."""
    if isinstance(snapshot, HostWeights):
        if snapshot.host is None:
            raise ConfigError("this HostWeights is closed; load or map the file again")
        _HELD[id(snapshot)] = snapshot
        hold = "map" if snapshot._fd is not None else "load"
        return (snapshot.manifest.path, hold, os.getpid(), id(snapshot))
    if not isinstance(snapshot, (str, os.PathLike)):
        raise ConfigError(
            f"snapshot must be a weights file's path or a HostWeights, not {type(snapshot).__name__}"
        )
    return (os.path.abspath(os.path.expanduser(os.fspath(snapshot))), "file", os.getpid(), 0)


def _raise_error(data: dict[str, Any]) -> None:
    """Raise the typed error a worker reported (:func:`~thaw_agents._errors.error_json`): a
    ThawError subclass by name, or ThawError."""
    kind, message, path = str(data.get("type")), str(data.get("message")), data.get("path")
    if kind == "SnapshotMismatchError":
        raise SnapshotMismatchError(str(data["field"]), data["expected"], data["actual"], path=path)
    cls = getattr(_errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, ThawError):
        try:
            error = cls(message, path=path) if issubclass(cls, _errors.SnapshotError) else cls(message)
        except TypeError:
            error = ThawError(message)
        raise error
    raise EngineError(f"the weights swap failed in the engine's worker: {kind}: {message}")


def _check_replies(replies: list[Any]) -> dict[str, Any]:
    if not replies:
        raise EngineError("the engine has no workers")
    for reply in replies:
        if not isinstance(reply, dict):
            raise EngineError(f"unexpected reply from the worker: {reply!r}")
        if "error" in reply:
            _raise_error(reply["error"])
    fingerprints = {r["fingerprint"] for r in replies}
    if len(fingerprints) != 1:
        raise EngineError(f"the workers restored different weights: {sorted(fingerprints)}")
    return replies[0]


def _result(reply: dict[str, Any], start: float) -> SwapResult:
    return SwapResult(
        fingerprint=reply["fingerprint"],
        nbytes=int(reply["nbytes"]),
        num_tensors=int(reply["num_tensors"]),
        restore_s=float(reply["seconds"]),
        process_s=float(reply["process_s"]),
        total_s=time.perf_counter() - start,
        route=str(reply["route"]),
    )


def swap_weights(engine: Any, snapshot: str | os.PathLike[str] | HostWeights) -> SwapResult:
    """Replace the weights of a running engine with a weights file's, all or nothing.

    Args:
        engine: a ``vllm.LLM`` built with :func:`thaw_agents.engine_kwargs`, a ChatThaw, or an
            ``AsyncLLM`` front (``thaw_agents.front.AsyncLLMFront``).
        snapshot: a ``.thaw`` weights file (frozen with ``thaw-agents freeze`` or
            :func:`~thaw_agents.weights.freeze_model`) of the same architecture and dtype, or a
            :class:`~thaw_agents.weights.HostWeights` (repeated swaps from memory or
            ``/dev/shm``).

    Returns:
        A :class:`SwapResult`; ``fingerprint`` is the engine's model fingerprint from now on.

    Raises:
        SnapshotError: a bad, truncated or corrupt file, or another architecture or dtype
            (:class:`~thaw_agents.SnapshotMismatchError` names the tensor); the engine still
            serves its old weights.
        EngineError: a ``vllm.LLM`` holds requests that were added but not run.
        ConfigError: an engine without thaw's worker extension, or a quantized model.

    Example:
        >>> result = swap_weights(llm, "/snap/policy-step-7.thaw")   # doctest: +SKIP
        >>> result.restore_s < 1.0                                    # doctest: +SKIP
        True
    """
    from ..front import AsyncLLMFront, LLMFront, front_for

    front = front_for(engine)
    if isinstance(front, AsyncLLMFront):
        return front._run(aswap_weights(front, snapshot))
    if not isinstance(front, LLMFront):
        raise ConfigError(f"cannot swap weights into {type(engine).__name__}")
    start = time.perf_counter()
    args = _rpc_args(snapshot)
    try:
        with front.lock():
            llm = front.llm
            if llm.llm_engine.has_unfinished_requests():
                raise EngineError(
                    "the engine holds requests that were added but not run; run or abort them, then swap"
                )
            reply = _check_replies(_collective(llm.collective_rpc, args))
            _after_swap(llm.reset_prefix_cache(reset_connector=True))
            front._reply = None  # the next describe() carries the new fingerprint
            _step(front)
    finally:
        _HELD.pop(args[3], None)
    return _result(reply, start)


async def aswap_weights(engine: Any, snapshot: str | os.PathLike[str] | HostWeights) -> SwapResult:
    """:func:`swap_weights` for an ``AsyncLLM`` front (or ChatThaw), on the engine's loop:
    requests in flight finish first; requests sent meanwhile wait and run after the swap."""
    from ..front import AsyncLLMFront, front_for

    front = front_for(engine)
    if not isinstance(front, AsyncLLMFront):
        raise ConfigError("aswap_weights needs an AsyncLLM front or a ChatThaw; use swap_weights")
    start = time.perf_counter()
    args = _rpc_args(snapshot)
    core = await front.engine()
    try:
        await core.pause_generation(mode="wait", clear_cache=False)
        try:
            reply = _check_replies(list(await core.collective_rpc(_METHOD, args=args)))
            _after_swap(await core.reset_prefix_cache(reset_connector=True))
        finally:
            await core.resume_generation()
        front._reply = None
        await _astep(front)
    finally:
        _HELD.pop(args[3], None)
    return _result(reply, start)


def _collective(rpc: Any, args: tuple[Any, ...]) -> list[Any]:
    try:
        return list(rpc(_METHOD, args=args))
    except AttributeError as exc:
        raise ConfigError(
            "this engine was not built with thaw's worker extension; "
            "build it with thaw_agents.engine_kwargs()"
        ) from exc


def _after_swap(reset: bool) -> None:
    if not reset:
        # Cannot happen with no request running; the blocks would be of the old weights.
        raise EngineError("the engine refused to drop its prefix cache after the swap")


def _warmup_request() -> Any:
    from vllm import SamplingParams

    from ..front import Request

    # One engine step: the scheduler half of the connector asks the worker for the new
    # fingerprint in it, so no later request is checked while it is unknown.
    return Request(token_ids=[0], params=SamplingParams(max_tokens=1, temperature=0.0))


def _step(front: Any) -> None:
    front.generate([_warmup_request()], stream=False)


async def _astep(front: Any) -> None:
    await front.agenerate([_warmup_request()], stream=False)


def held(owner_pid: int, token: int) -> HostWeights | None:
    """The caller's HostWeights when the worker runs in the caller's process, else None."""
    return _HELD.get(token) if owner_pid == os.getpid() else None
