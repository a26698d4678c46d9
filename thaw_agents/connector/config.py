"""The connector's own configuration, built once from ``kv_connector_extra_config``.

Keys::

    store         the folder the connector reads and writes snapshots in (default: the user's
                  store, ``THAW_AGENTS_STORE`` or ``~/.cache/thaw-agents/snapshots``). Nothing
                  outside it is ever opened on behalf of a request.
    save_in_step  write each snapshot before the engine step ends (default false: a background
                  writer does, while the engine keeps stepping). For measuring what a save costs
                  the other requests (``benchmarks/fork_stall.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from .._store import open_store

if TYPE_CHECKING:
    from vllm.config import VllmConfig

__all__ = ["ThawConnectorConfig"]

_KNOWN_KEYS = {"store", "save_in_step"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ThawConnectorConfig:
    store: Path
    save_in_step: bool = False

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> ThawConnectorConfig:
        transfer = vllm_config.kv_transfer_config
        extra: Any = getattr(transfer, "kv_connector_extra_config", None) or {}
        if not isinstance(extra, dict):
            raise ConfigError("kv_connector_extra_config must be a JSON object")
        unknown = set(extra) - _KNOWN_KEYS
        if unknown:
            raise ConfigError(
                f"unknown thaw connector settings {sorted(unknown)}; the known ones are {sorted(_KNOWN_KEYS)}"
            )
        store = extra.get("store")
        if store is not None and not isinstance(store, str):
            raise ConfigError("kv_connector_extra_config['store'] must be a folder path")
        save_in_step = extra.get("save_in_step", False)
        if not isinstance(save_in_step, bool):
            raise ConfigError("kv_connector_extra_config['save_in_step'] must be true or false")
        return cls(store=open_store(store), save_in_step=save_in_step)
