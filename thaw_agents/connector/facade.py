"""``ThawConnector``: vLLM's KV connector interface, delegating to a scheduler or worker half.

Enabled by :func:`thaw_agents.engine_kwargs`, or by hand::

    kv_transfer_config={"kv_connector": "ThawConnector",
                        "kv_connector_module_path": "thaw_agents.connector.facade",
                        "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}

Requests name snapshots by id (``kv_transfer_params={"thaw": {"op": "load", "snapshot_id":
...}}``, see :mod:`.params`); the connector touches files only inside its store
(``kv_connector_extra_config={"store": FOLDER}``, default the user's store).

Scheduler side:

* ``get_num_new_matched_tokens``: how many prompt tokens the snapshot chain supplies; the chain
  is read and checked once per request, later calls (retries, resumptions) touch no file.
* ``update_state_after_alloc``: which engine blocks of this allocation to fill (a request
  resumed after a preemption gets new blocks and its load again).
* ``on_new_request``: check and remember a save request; keep a hydrated snapshot (the
  hydrate request itself stays unscheduled: ``get_num_new_matched_tokens`` answers None).
* ``build_connector_meta``: this step's load and save jobs, and the requests whose unwritten
  saves read blocks this step writes (the worker finishes those saves first).
* ``update_connector_output``: save results from the worker; uncount blocks that failed to load.
* ``reset_cache`` (vLLM's ``reset_prefix_cache(reset_connector=True)``, sent after a weights
  swap): forget the model fingerprint, refuse loads until the worker reports it (asked for in
  the next step's metadata, answered in ``build_connector_worker_meta``).
* ``request_finished``: forget the request and report what happened (``kv_transfer_params
  ["thaw"]``). It returns False even while a save reads the blocks: freed blocks keep their
  bytes until vLLM allocates them again, and the step that does so first finishes the saves
  reading them (as vLLM's own offloading connector fences its stores).

Worker side:

* ``register_kv_caches``; ``start_load_kv``: synchronous loads before the forward.
* ``wait_for_save``: hand this step's saves to the background writer (GPU blocks are copied
  to host memory first); ``handle_preemptions`` (before the forward): finish the saves that
  still read blocks this step writes.
* ``build_connector_worker_meta``: the save results, to the scheduler half.
* ``get_block_ids_with_load_errors``; ``shutdown``: finish queued saves, stop the writer.

A front learns a save's result from the request's report, or, while it says ``"pending"``,
from the worker extension's ``thaw_save_result(snapshot_id)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .config import ThawConnectorConfig
from .metadata import ThawConnectorMetadata, ThawWorkerMetadata
from .scheduler import ThawScheduler
from .worker import ThawWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["ThawConnector"]


class ThawConnector(KVConnectorBase_V1):
    """The thaw KV connector (see the module docstring)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._scheduler: ThawScheduler | None = None
        self._worker: ThawWorker | None = None
        self._fingerprint_asked = False  # worker half: report the model fingerprint this step
        config = ThawConnectorConfig.from_vllm_config(vllm_config)
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = ThawScheduler(vllm_config, config)
        else:
            self._worker = ThawWorker(vllm_config, config)

    @property
    def worker(self) -> ThawWorker:
        assert self._worker is not None, "worker-side call on the scheduler half"
        return self._worker

    @property
    def scheduler(self) -> ThawScheduler:
        assert self._scheduler is not None, "scheduler-side call on the worker half"
        return self._scheduler

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, ThawConnectorMetadata)
        self._fingerprint_asked |= metadata.want_fingerprint
        self.worker.start_load_kv(metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # saves happen once per step in wait_for_save, over all layers at once

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        metadata = self._get_connector_metadata()
        if isinstance(metadata, ThawConnectorMetadata) and metadata.saves:
            self.worker.save(metadata)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if isinstance(kv_connector_metadata, ThawConnectorMetadata):
            self.worker.handle_preemptions(kv_connector_metadata)

    def build_connector_worker_meta(self) -> ThawWorkerMetadata | None:
        results = self.worker.take_results()
        fingerprint = None
        if self._fingerprint_asked and self.worker.spec is not None:
            fingerprint, self._fingerprint_asked = self.worker.spec.model_fingerprint, False
        if not results and fingerprint is None:
            return None
        return ThawWorkerMetadata(results=results, model_fingerprint=fingerprint)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def on_new_request(self, request: Request) -> None:
        self.scheduler.on_new_request(request)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def reset_cache(self) -> bool | None:
        # vLLM's reset_prefix_cache(reset_connector=True): the weights may have changed.
        return self.scheduler.reset_cache() if self._scheduler is not None else None
