"""The connector's own configuration, built once from ``kv_connector_extra_config``.

Keys::

    store   the folder the connector reads and writes snapshots in (default: the user's store,
            ``THAW_AGENTS_STORE`` or ``~/.cache/thaw-agents/snapshots``). Nothing outside it
            is ever opened on behalf of a request.
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

_KNOWN_KEYS = {"store"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ThawConnectorConfig:
    store: Path

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
        return cls(store=open_store(store))
