"""Methods vLLM mixes into its worker (``worker_extension_cls``), reachable by name with
``llm.collective_rpc("thaw_describe")``, ``llm.collective_rpc("thaw_save_result",
args=(snapshot_id,))`` or ``thaw_swap_weights`` (what :func:`thaw_agents.swap_weights` sends):
no callables are pickled across processes; arguments and replies are plain data."""

from __future__ import annotations

import dataclasses
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

    def thaw_weights_loaded(self) -> dict[str, Any] | None:
        """What this worker's ``load_format="thaw"`` load moved (restore or freeze): ``{"op",
        "path", "nbytes", "num_tensors", "seconds", "gbps", "route"}``; None without one."""
        from ..weights._vllm import last_load

        return last_load()

    def thaw_swap_weights(self, path: str, hold: str, owner_pid: int, token: int) -> dict[str, Any]:
        """Swap this worker's model weights for a weights file's, all or nothing, and make the
        new weights' fingerprint this worker's KV spec's. ``hold``: ``file`` (read ``path``),
        ``load``/``map`` (a :class:`~thaw_agents.weights.HostWeights` of ``path``: the caller's
        own when this worker runs in its process, else one this worker keeps for next time).

        Returns ``{"fingerprint", "nbytes", "num_tensors", "seconds" (the verified restore),
        "process_s" (vLLM's post-load processing), "route"}`` or
        ``{"error": {"type", "message", ...}}`` (the model is then unchanged)."""
        from .._errors import error_json
        from ..weights._inplace import restore_into_running_model

        try:
            runner = self.model_runner  # type: ignore[attr-defined]
            source = path if hold == "file" else _host_weights(path, hold, owner_pid, token)
            stats, process_s, fingerprint = restore_into_running_model(
                runner.get_model(), runner.model_config, runner.device, source
            )
        except Exception as exc:
            return {"error": error_json(exc)}
        for reset in ("reset_encoder_cache", "reset_mm_cache"):  # state derived from the old weights
            if callable(getattr(runner, reset, None)):
                getattr(runner, reset)()
        worker = _thaw_worker()
        if not isinstance(worker, dict) and worker.spec is not None:
            worker.spec = dataclasses.replace(worker.spec, model_fingerprint=fingerprint)
        return {
            "fingerprint": fingerprint,
            "nbytes": stats.nbytes,
            "num_tensors": stats.num_tensors,
            "seconds": stats.seconds,
            "process_s": process_s,
            "route": stats.route,
        }


# HostWeights this worker keeps for repeated swaps when it runs apart from the caller, the most
# recent first out: (path, hold) -> copy. Two: an A/B alternation stays in memory, and an RL
# loop that writes a new file every step does not grow the worker without bound.
_HOST_COPIES: dict[tuple[str, str], Any] = {}
_MAX_HOST_COPIES = 2


def _host_weights(path: str, hold: str, owner_pid: int, token: int) -> Any:
    from ..weights import HostWeights
    from ..weights._inplace import weights_fingerprint
    from ..weights._swap import held

    mine = held(owner_pid, token)
    if mine is not None:
        return mine
    if hold not in {"load", "map"}:
        raise ValueError(f"hold must be file, load or map, not {hold!r}")
    key = (path, hold)
    copy = _HOST_COPIES.get(key)
    if copy is not None:
        try:
            copy.check_unchanged()
        except Exception:
            copy = None
    if copy is None or (hold == "load" and _changed_on_disk(copy, weights_fingerprint)):
        copy = HostWeights.map(path) if hold == "map" else HostWeights.load(path)
    _HOST_COPIES.pop(key, None)
    _HOST_COPIES[key] = copy  # now the most recent
    while len(_HOST_COPIES) > _MAX_HOST_COPIES:
        oldest = next(iter(_HOST_COPIES))
        _HOST_COPIES.pop(oldest).close()
    return copy


def _changed_on_disk(copy: Any, fingerprint: Any) -> bool:
    """A private copy is of the file as it was when loaded: reload when the header now differs."""
    from ..weights import read_weights_manifest

    try:
        return fingerprint(read_weights_manifest(copy.manifest.path)) != fingerprint(copy.manifest)
    except Exception:
        return True


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
