"""Methods vLLM mixes into its worker (``worker_extension_cls``), reachable by name with
``llm.collective_rpc("thaw_describe")`` or ``llm.collective_rpc("thaw_save_result",
args=(snapshot_id,))``: no callables are pickled across processes."""

from __future__ import annotations

from typing import Any

__all__ = ["ThawWorkerExtension"]


class ThawWorkerExtension:
    def thaw_describe(self) -> dict[str, Any]:
        """This worker's KV spec as JSON-ready data (model fingerprint, dtype, layout...) and
        its snapshot store: ``{"spec": ..., "store": ...}`` or ``{"error": ...}``."""
        worker = _thaw_worker()
        return worker if isinstance(worker, dict) else worker.describe()

    def thaw_save_result(self, snapshot_id: str) -> dict[str, Any] | None:
        """The result of this worker's latest save of ``snapshot_id``; None while it is queued
        or being written. ``{"snapshot_id", "status": "written", "tokens", ...}`` or
        ``{"snapshot_id", "status": "failed", "error": {"type", "message", ...}}`` (or
        ``{"error": ...}`` when thaw is not this engine's connector). Never waits."""
        worker = _thaw_worker()
        return worker if isinstance(worker, dict) else worker.save_result(snapshot_id)


def _thaw_worker() -> Any:
    """This process's thaw worker half, or ``{"error": why}``."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return {"error": "the thaw KV connector is not configured in this engine"}
    connector = get_kv_transfer_group()
    worker = getattr(connector, "worker", None)
    if worker is None:
        return {"error": f"the engine's KV connector is {type(connector).__name__}, not ThawConnector"}
    return worker
