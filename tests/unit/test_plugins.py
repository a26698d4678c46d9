"""vLLM's plugin hooks find thaw: the connector by name, the load format, the endpoint plugin."""

from __future__ import annotations

from importlib.metadata import entry_points


def test_the_connector_is_registered_by_name() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from thaw_agents._plugins import register

    register()
    register()  # idempotent
    connector = KVConnectorFactory.get_connector_class_by_name("ThawConnector")
    assert connector.__module__ == "thaw_agents.connector.facade"


def test_the_entry_points_are_installed() -> None:
    general = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    endpoints = {ep.name: ep.value for ep in entry_points(group="vllm.endpoint_plugins")}
    assert general["thaw_agents_weights"] == "thaw_agents._plugins:register"
    assert endpoints["thaw_agents_snapshots"] == "thaw_agents.serve.plugin:ThawEndpoints"
    plugin = entry_points(group="vllm.endpoint_plugins")["thaw_agents_snapshots"].load()()
    assert plugin.name == "thaw_agents_snapshots" and plugin.required_tasks == ("generate",)
