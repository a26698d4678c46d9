"""The per-request protocol: what a request puts in ``kv_transfer_params["thaw"]``.

Load::  {"op": "load", "snapshot_id": "thaw-<32 hex>"}   ("op" may be left out for a load)
Save::  {"op": "save", "snapshot_id": "thaw-<32 hex>", "num_tokens": N, "parent": "thaw-..." | null}
Hydrate::  {"op": "hydrate", "snapshot_id": "thaw-<32 hex>"}

Requests name snapshots by id, never by path: vLLM's OpenAI server copies a client's
``kv_transfer_params`` into the engine, so anything here may come from an untrusted client.
The connector resolves ids inside its own store and nowhere else. For a save, ``snapshot_id``
is the id the caller expects (the engine computes the id itself from the request's tokens and
refuses to write when they differ), and ``num_tokens`` says how many prompt tokens form the
prefix to snapshot. A hydrate makes the engine hold the snapshot for the next request that
starts with its tokens (see :mod:`.standing`); the request carrying it is never scheduled
(``ForkHandle.hydrate``'s front aborts it at once), and the HTTP server refuses it from clients.

Both travel inside ``SamplingParams.extra_args["kv_transfer_params"]``, which vLLM copies onto
its ``Request``; plain JSON, so they cross the engine-core process boundary.

What comes back, in the finished request's ``kv_transfer_params["thaw"]``::

    load  {"op": "load", "snapshot_id", "loaded_tokens", "recomputed_tokens", "reloaded_tokens",
           "preemptions"}
    save  {"op": "save", "snapshot_id", "status": "pending" | "written" | "failed", ...}
    refused  {"op", "snapshot_id", "error": "why, in words"}  (the request prefilled instead)

A save is written after the request finishes; while its report says ``"pending"`` a front asks
the engine with ``collective_rpc("thaw_save_result", args=(snapshot_id,))`` until it answers
(:func:`await_save`). A failed save's ``"error"`` is ``{"type", "message", "path"?, "errno"?}``;
:func:`save_failure` turns it back into the typed error.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import EngineError, SnapshotWriteError, ThawError

__all__ = [
    "ID_PATTERN",
    "PARAMS_KEY",
    "HydrateParams",
    "LoadParams",
    "ParamsError",
    "SaveParams",
    "await_save",
    "hydrate_params",
    "is_snapshot_id",
    "load_params",
    "parse_params",
    "save_failure",
    "save_params",
]

PARAMS_KEY = "thaw"
ID_PATTERN = re.compile(r"thaw-[0-9a-f]{32}")
# Larger than any context vLLM serves today; stops absurd values before any arithmetic.
_MAX_TOKENS = 1 << 24
# How long a front waits for a save the engine has queued (a long queue of large snapshots).
SAVE_TIMEOUT_S = 600.0


class ParamsError(ValueError):
    """A request's thaw parameters are malformed; the message says what to send instead."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadParams:
    snapshot_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HydrateParams:
    snapshot_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveParams:
    snapshot_id: str
    num_tokens: int
    parent: str | None


def is_snapshot_id(value: Any) -> bool:
    """Whether ``value`` is a well-formed snapshot id (``thaw-`` + 32 lowercase hex)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def load_params(snapshot_id: str) -> dict[str, Any]:
    """``kv_transfer_params`` that make a request start from the snapshot ``snapshot_id``."""
    return {PARAMS_KEY: {"op": "load", "snapshot_id": snapshot_id}}


def hydrate_params(snapshot_id: str) -> dict[str, Any]:
    """``kv_transfer_params`` that make the engine hold ``snapshot_id`` for the next request that
    starts with its tokens (the request carrying them is never run)."""
    return {PARAMS_KEY: {"op": "hydrate", "snapshot_id": snapshot_id}}


def save_params(snapshot_id: str, num_tokens: int, parent: str | None = None) -> dict[str, Any]:
    """``kv_transfer_params`` that make a request snapshot its first ``num_tokens`` tokens."""
    return {
        PARAMS_KEY: {"op": "save", "snapshot_id": snapshot_id, "num_tokens": num_tokens, "parent": parent}
    }


def _id_field(params: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = params.get(key)
    if value is None and optional:
        return None
    if not is_snapshot_id(value):
        raise ParamsError(
            f"'{key}' must be a snapshot id ('thaw-' and 32 hex digits), got {str(value)[:80]!r}; "
            "requests name snapshots by id, never by path"
        )
    return value


def parse_params(kv_transfer_params: Any) -> LoadParams | SaveParams | HydrateParams | None:
    """The thaw part of a request's ``kv_transfer_params``, validated; None when absent.

    Raises:
        ParamsError: the thaw part is present but malformed (a path, a bad id, an unknown op).
    """
    if not isinstance(kv_transfer_params, dict) or PARAMS_KEY not in kv_transfer_params:
        return None
    params = kv_transfer_params[PARAMS_KEY]
    if not isinstance(params, dict):
        raise ParamsError("kv_transfer_params['thaw'] must be an object")
    op = params.get("op", "load" if set(params) == {"snapshot_id"} else None)
    unknown = set(params) - {"op", "snapshot_id", "num_tokens", "parent"}
    if unknown:
        raise ParamsError(
            f"unknown thaw parameters {sorted(unknown)[:5]}; a request names a snapshot by "
            "'snapshot_id' only (files and paths are not accepted)"
        )
    if op == "load":
        return LoadParams(snapshot_id=_id_field(params, "snapshot_id"))  # type: ignore[arg-type]
    if op == "hydrate":
        return HydrateParams(snapshot_id=_id_field(params, "snapshot_id"))  # type: ignore[arg-type]
    if op == "save":
        num_tokens = params.get("num_tokens")
        if (
            not isinstance(num_tokens, int)
            or isinstance(num_tokens, bool)
            or not 0 < num_tokens <= _MAX_TOKENS
        ):
            raise ParamsError(f"'num_tokens' must be a positive integer, got {str(num_tokens)[:40]!r}")
        return SaveParams(
            snapshot_id=_id_field(params, "snapshot_id"),  # type: ignore[arg-type]
            num_tokens=num_tokens,
            parent=_id_field(params, "parent", optional=True),
        )
    raise ParamsError(f"unknown thaw op {str(op)[:40]!r}; expected 'load', 'save' or 'hydrate'")


def await_save(
    report: dict[str, Any] | None,
    poll: Callable[[], dict[str, Any] | None],
    *,
    timeout: float = SAVE_TIMEOUT_S,
) -> dict[str, Any] | None:
    """A save's final result: ``report`` itself unless it says ``"pending"``, else what
    ``poll()`` (the engine's ``thaw_save_result``) returns once it stops returning None.

    Example:
        >>> await_save({"op": "save", "status": "pending"}, lambda: {"status": "written"})
        {'status': 'written'}

    Raises:
        EngineError: the engine has not finished the save within ``timeout`` seconds.
    """
    if not report or report.get("status") != "pending":
        return report
    deadline = time.monotonic() + timeout
    interval = 0.002
    while True:
        result = poll()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise EngineError(
                f"the engine has not finished writing snapshot {report.get('snapshot_id')} after "
                f"{timeout:.0f} s; its writer may be stuck on a slow disk (see the engine log)"
            )
        time.sleep(interval)
        interval = min(interval * 1.5, 0.05)


def save_failure(result: dict[str, Any] | None, snapshot_id: str, dest: str) -> ThawError | None:
    """The typed error a save's report or result stands for; None when it was written (or
    when there is no report: the caller checks the file).

    Example:
        >>> save_failure({"status": "failed", "error": {"type": "SnapshotWriteError",
        ...     "message": "no space left on the device"}}, "thaw-...", "/s/x.thaw")
        SnapshotWriteError('/s/x.thaw: no space left on the device')
    """
    if not result or result.get("status") == "written":
        return None
    error = result.get("error")
    if isinstance(error, dict):
        kind, message = str(error.get("type")), str(error.get("message"))
        if kind == "SnapshotWriteError":  # a full disk in the engine: the same typed error
            errno = error.get("errno")
            return SnapshotWriteError(
                message, path=str(error.get("path") or dest), errno=errno if isinstance(errno, int) else None
            )
        return EngineError(f"the engine could not write the snapshot {snapshot_id}: {kind}: {message}")
    if error:
        return EngineError(f"the engine could not write the snapshot {snapshot_id}: {error}")
    if result.get("status") in ("pending", "failed"):
        return EngineError(f"the engine reported the save of {snapshot_id} as {result.get('status')!r}")
    return None
