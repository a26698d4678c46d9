"""The per-request protocol: what the front puts in ``kv_transfer_params["thaw"]``.

Save::   {"op": "save", "dest": "/abs/file.thaw", "parent": {"path", "snapshot_id",
          "num_blocks"} | None, "num_tokens": N}
Load::   {"op": "load", "files": ["/abs/root.thaw", ..., "/abs/leaf.thaw"]}

Both travel inside ``SamplingParams.extra_args["kv_transfer_params"]``, which vLLM
copies onto its ``Request``; plain JSON, so it crosses the engine-core process boundary.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PARAMS_KEY", "load_params", "save_params", "thaw_params"]

PARAMS_KEY = "thaw"


def save_params(dest: str, num_tokens: int, parent: dict[str, Any] | None = None) -> dict[str, Any]:
    return {PARAMS_KEY: {"op": "save", "dest": dest, "num_tokens": num_tokens, "parent": parent}}


def load_params(files: list[str]) -> dict[str, Any]:
    return {PARAMS_KEY: {"op": "load", "files": list(files)}}


def thaw_params(kv_transfer_params: dict[str, Any] | None) -> dict[str, Any] | None:
    """The thaw part of a request's kv_transfer_params, or None."""
    if not isinstance(kv_transfer_params, dict):
        return None
    params = kv_transfer_params.get(PARAMS_KEY)
    return params if isinstance(params, dict) else None
