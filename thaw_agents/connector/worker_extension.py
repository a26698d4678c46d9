"""Methods vLLM mixes into its worker (``worker_extension_cls``), reachable by name with
``llm.collective_rpc("thaw_describe")``: no callables are pickled across processes."""

from __future__ import annotations

from typing import Any

__all__ = ["ThawWorkerExtension"]


class ThawWorkerExtension:
    def thaw_describe(self) -> dict[str, Any]:
        """This worker's KV spec as JSON-ready data (model fingerprint, dtype, layout...) and
        its snapshot store: ``{"spec": ..., "store": ...}`` or ``{"error": ...}``."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if not has_kv_transfer_group():
            return {"error": "the thaw KV connector is not configured in this engine"}
        connector = get_kv_transfer_group()
        worker = getattr(connector, "worker", None)
        if worker is None:
            return {"error": f"the engine's KV connector is {type(connector).__name__}, not ThawConnector"}
        return worker.describe()
