"""What vLLM's general plugin hook (entry point ``vllm.general_plugins``: ``thaw_agents_weights``)
registers in every vLLM process: the ``thaw`` load format and the ``ThawConnector`` by name, so
``--kv-transfer-config '{"kv_connector": "ThawConnector", "kv_role": "kv_both"}'`` works with plain
vLLM, without ``kv_connector_module_path``."""

from __future__ import annotations

__all__ = ["register"]

_registered = False


def register() -> None:
    """Register thaw's load format and KV connector with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from ._engine import CONNECTOR_MODULE, CONNECTOR_NAME
    from .weights import register as register_weights

    register_weights()
    if CONNECTOR_NAME not in getattr(KVConnectorFactory, "_registry", {}):
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, "ThawConnector")
    _registered = True
