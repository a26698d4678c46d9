"""The per-request protocol: what a request puts in ``kv_transfer_params["thaw"]``.

Load::  {"op": "load", "snapshot_id": "thaw-<32 hex>"}   ("op" may be left out for a load)
Save::  {"op": "save", "snapshot_id": "thaw-<32 hex>", "num_tokens": N, "parent": "thaw-..." | null}

Requests name snapshots by id, never by path: vLLM's OpenAI server copies a client's
``kv_transfer_params`` into the engine, so anything here may come from an untrusted client.
The connector resolves ids inside its own store and nowhere else. For a save, ``snapshot_id``
is the id the caller expects (the engine computes the id itself from the request's tokens and
refuses to write when they differ), and ``num_tokens`` says how many prompt tokens form the
prefix to snapshot.

Both travel inside ``SamplingParams.extra_args["kv_transfer_params"]``, which vLLM copies onto
its ``Request``; plain JSON, so they cross the engine-core process boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ID_PATTERN",
    "PARAMS_KEY",
    "LoadParams",
    "ParamsError",
    "SaveParams",
    "is_snapshot_id",
    "load_params",
    "parse_params",
    "save_params",
]

PARAMS_KEY = "thaw"
ID_PATTERN = re.compile(r"thaw-[0-9a-f]{32}")
# Larger than any context vLLM serves today; stops absurd values before any arithmetic.
_MAX_TOKENS = 1 << 24


class ParamsError(ValueError):
    """A request's thaw parameters are malformed; the message says what to send instead."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadParams:
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


def parse_params(kv_transfer_params: Any) -> LoadParams | SaveParams | None:
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
    raise ParamsError(f"unknown thaw op {str(op)[:40]!r}; expected 'load' or 'save'")
