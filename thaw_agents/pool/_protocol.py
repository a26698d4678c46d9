"""What crosses between the pool and its workers: plain JSON data, one message per line.

Parent to worker (every request carries an ``id``; the worker answers with the same ``id``)::

    {"id": 1, "op": "boot", "model": "/models/x", "overrides": {...}, "name": "local-0"}
    {"id": 2, "op": "hydrate", "snapshot": {"uri": "/dev/shm/.../thaw-....thaw", "id": ..., "nbytes": N}}
    {"id": 3, "op": "generate", "snapshot": {...} | null, "timeout_s": 120.0,
     "branches": [{"index": 0, "prompt_token_ids": [...], "sampling": {...}}]}
    {"id": 4, "op": "shutdown"}

Worker to parent::

    {"id": 1, "ok": true, "spec": {...KVSpec...}, "pid": 123, "boot_s": 7.1}
    {"id": 2, "ok": true, "num_snapshot_tokens": 992, "hydrate_s": 0.01, "nbytes": N}
    {"id": 3, "ok": true, "generate_s": 3.2, "branches": [{"index": 0, "completions": [...],
     "num_cached_tokens": 992, "ttft_s": 0.05, "generate_s": 3.1}]}
    {"id": 9, "ok": false, "error": {"type": "SnapshotChecksumError", "message": "...",
     "stage": "hydrate", "branch": null}}

``hydrate`` validates the snapshot against the worker's engine (every checksum, the KV spec);
the KV blocks are copied into the cache by the first ``generate`` request that needs them.

Sampling parameters travel as the non-default public fields of ``vllm.SamplingParams``
(``msgspec.to_builtins``), rebuilt on the worker with ``msgspec.convert``: no pickle.
"""

from __future__ import annotations

import json
import traceback
from typing import TYPE_CHECKING, Any, TypedDict

from .._errors import ConfigError

if TYPE_CHECKING:
    from vllm import SamplingParams

    from ..front import Result

__all__ = [
    "BranchJob",
    "BranchReply",
    "CompletionData",
    "SnapshotRef",
    "branch_reply",
    "decode_line",
    "decode_sampling",
    "encode_line",
    "encode_sampling",
    "error_data",
]

# Fields the pool sets itself, or that only make sense inside one process.
_LOCAL_FIELDS = frozenset({"output_kind", "skip_clone"})


class SnapshotRef(TypedDict, total=False):
    """Where a worker finds the round's trunk snapshot."""

    id: str
    uri: str  # a local path or an fsspec URI (local and file transports)
    objects: list[dict[str, Any]]  # Ray: [{"name": file name, "ref": ObjectRef}], root first
    nbytes: int
    transport: str


class BranchJob(TypedDict):
    index: int
    prompt_token_ids: list[int]
    sampling: dict[str, Any]


class CompletionData(TypedDict):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None


class BranchReply(TypedDict):
    index: int
    completions: list[CompletionData]
    num_prompt_tokens: int
    num_cached_tokens: int
    ttft_s: float
    generate_s: float


def branch_reply(index: int, result: Result) -> BranchReply:
    """A front's result as a branch's reply (times from the batch's submission)."""
    return {
        "index": index,
        "completions": [
            {
                "index": c.index,
                "text": c.text,
                "token_ids": list(c.token_ids),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in result.completions
        ],
        "num_prompt_tokens": result.num_prompt_tokens,
        "num_cached_tokens": result.num_cached_tokens,
        "ttft_s": result.ttft_s if result.ttft_s is not None else result.total_s,
        "generate_s": result.total_s,
    }


def encode_line(message: dict[str, Any]) -> bytes:
    """One message as a JSON line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a pool message must be a JSON object")
    return message


def encode_sampling(params: SamplingParams) -> dict[str, Any]:
    """``params`` as JSON data: the public fields that differ from their defaults.

    Raises:
        ConfigError: a field cannot travel as JSON (it would not mean the same in a worker).

    Example:
        >>> encode_sampling(SamplingParams(max_tokens=8, temperature=0))   # doctest: +SKIP
        {'temperature': 0.0, 'max_tokens': 8}
    """
    import msgspec

    data = msgspec.to_builtins(params)
    out = {k: v for k, v in data.items() if not k.startswith("_") and k not in _LOCAL_FIELDS}
    extra = dict(out.get("extra_args") or {})
    extra.pop("kv_transfer_params", None)  # each worker sets its own snapshot's
    if extra:
        out["extra_args"] = extra
    else:
        out.pop("extra_args", None)
    try:
        json.dumps(out)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"these sampling parameters cannot be sent to a pool worker: {exc}") from exc
    return out


def decode_sampling(data: dict[str, Any]) -> SamplingParams:
    """The ``SamplingParams`` that :func:`encode_sampling` described."""
    import msgspec
    from vllm import SamplingParams

    return msgspec.convert(data, SamplingParams, strict=False)


def error_data(exc: BaseException, *, stage: str, branch: int | None = None) -> dict[str, Any]:
    """An exception as plain data (type, message, last traceback lines)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return {
        "type": type(exc).__name__,
        "message": str(exc) or type(exc).__name__,
        "stage": stage,
        "branch": getattr(exc, "branch", branch),
        "traceback": tb[-4000:],
    }
