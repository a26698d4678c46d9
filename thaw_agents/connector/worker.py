"""The worker half of the thaw connector.

Runs where the KV cache lives (the engine-core process on CPU, the GPU worker process
otherwise). Loads snapshot blocks into the cache before a step's forward and writes a
request's prompt blocks to a snapshot file after it. Failures never raise into vLLM: a
block that fails to load is reported so vLLM recomputes it, and a failed save leaves an
``<dest>.error`` file the front reads and raises as a typed error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import blake3
import torch

from thaw_agents.accel import (
    BlockLayout,
    StagingBuffer,
    block_views,
    gather_blocks,
    read_blocks_into,
    scatter_blocks,
)

from .. import __version__
from .._container import write_container
from .._kvspec import HASH_SCHEME, KVSpec, LayerSpec, chain_keys, model_fingerprint, snapshot_id
from .metadata import LoadJob, SaveJob, ThawConnectorMetadata

if TYPE_CHECKING:
    from vllm.config import VllmConfig

__all__ = ["ThawWorker"]

logger = logging.getLogger(__name__)


def _kv_layout_name(vllm_config: VllmConfig, dtype: torch.dtype, block_size: int, head_size: int) -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        try:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(dtype, block_size, head_size, vllm_config.cache_config.cache_dtype)
        except Exception:  # an older/newer vLLM without this helper
            isa = "unknown"
        return f"cpu-attn/{isa}"
    backend = (
        getattr(vllm_config.attention_config, "backend", None)
        if hasattr(vllm_config, "attention_config")
        else None
    )
    return f"{current_platform.device_name}/{backend or 'auto'}"


class ThawWorker:
    """Owns the registered KV caches and runs load and save jobs."""

    def __init__(self, vllm_config: VllmConfig) -> None:
        self._config = vllm_config
        self._layers: list[torch.Tensor] = []
        self._layout = BlockLayout(block_dim=0)
        self.spec: KVSpec | None = None
        self._load_errors: set[int] = set()
        self._staging = StagingBuffer()

    # -- setup -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm import __version__ as vllm_version
        from vllm.platforms import current_platform

        if self._layers:
            # vLLM keeps one worker-side connector per process; a second in-process engine
            # would share it and read the other engine's KV. Refuse instead of mixing them.
            raise RuntimeError(
                "thaw: a second vLLM engine in this process tried to register its KV cache with "
                "the thaw connector of the first. Run one in-process engine per process, shut the "
                "first down, or set VLLM_ENABLE_V1_MULTIPROCESSING=1 (each engine core in its own "
                "process)."
            )
        cfg = self._config
        names = list(kv_caches)
        self._layers = [kv_caches[n] for n in names]
        first = self._layers[0]
        block_size = cfg.cache_config.block_size
        # Find the dimension that indexes blocks: the one equal to the cache's block count.
        num_blocks = cfg.cache_config.num_gpu_blocks or 0
        block_dim = 0
        if num_blocks and first.shape[0] != num_blocks and first.dim() > 1 and first.shape[1] == num_blocks:
            block_dim = 1  # FlashAttention-style [2, num_blocks, ...]
        self._layout = BlockLayout(block_dim=block_dim)
        layers = []
        for name, tensor in zip(names, self._layers, strict=True):
            shape = list(tensor.shape)
            del shape[block_dim]
            layers.append(
                LayerSpec(
                    name=name,
                    block_shape=tuple(shape),
                    block_nbytes=tensor.numel() // tensor.shape[block_dim] * tensor.element_size(),
                )
            )
        head_size = cfg.model_config.get_head_size()
        dtype = first.dtype
        self.spec = KVSpec(
            model_name=cfg.model_config.served_model_name or cfg.model_config.model,
            model_fingerprint=model_fingerprint(cfg.model_config.model, cfg.model_config.hf_config.to_dict()),
            vllm_version=vllm_version,
            platform="cpu" if current_platform.is_cpu() else current_platform.device_name,
            kv_layout=_kv_layout_name(cfg, dtype, block_size, head_size),
            dtype=str(dtype).removeprefix("torch."),
            block_size=block_size,
            layers=tuple(layers),
        )
        logger.debug(
            "thaw: registered %d KV layers, first %s stride %s, block_dim %d",
            len(names),
            tuple(first.shape),
            first.stride(),
            block_dim,
        )

    def describe(self) -> dict[str, Any]:
        if self.spec is None:
            raise RuntimeError("the KV cache is not registered yet")
        return self.spec.to_json()

    # -- loads -------------------------------------------------------------------------
    def start_load_kv(self, metadata: ThawConnectorMetadata) -> None:
        for job in metadata.loads:
            try:
                self._load(job)
            except Exception as exc:
                logger.error(
                    "thaw: request %s: loading %d blocks failed, they will be recomputed: %s",
                    job.req_id,
                    len(job.block_ids),
                    exc,
                )
                self._load_errors.update(job.block_ids)

    def _load(self, job: LoadJob) -> None:
        start = time.perf_counter()
        # On the CPU blocks are read straight into the cache rows; elsewhere (GPU) into the
        # host staging buffer first, then scattered. Either way one read-and-verify path.
        views = block_views(self._layers, job.block_ids, self._layout)
        staged = None
        if views is None:
            staged = self._staging.rows(len(job.block_ids), self.spec.block_nbytes)
            rows = staged.numpy()
            views = [[memoryview(rows[i])] for i in range(len(job.block_ids))]
        bad = self._read_verified(job, views)
        if staged is not None:
            good = [i for i, b in enumerate(job.block_ids) if b not in bad]
            if good:
                scatter_blocks(
                    staged[good].contiguous(),
                    self._layers,
                    [job.block_ids[i] for i in good],
                    layout=self._layout,
                )
        if bad:
            logger.error(
                "thaw: request %s: %d snapshot blocks failed their checksum; recomputing them",
                job.req_id,
                len(bad),
            )
            self._load_errors.update(bad)
        logger.debug(
            "thaw: request %s: loaded %d blocks in %.1f ms",
            job.req_id,
            len(job.block_ids) - len(bad),
            (time.perf_counter() - start) * 1e3,
        )

    @staticmethod
    def _read_verified(job: LoadJob, views: list[list[memoryview]]) -> set[int]:
        """Read each block into its views (one open per file); the engine block ids that failed."""
        bad: set[int] = set()
        by_file: dict[str, list[int]] = defaultdict(list)
        for i, src in enumerate(job.sources):
            by_file[src.path].append(i)
        for path, indices in by_file.items():
            fd = os.open(path, os.O_RDONLY)
            try:
                complete, digests = read_blocks_into(
                    fd,
                    [job.sources[i].offset for i in indices],
                    [views[i] for i in indices],
                    hasher=blake3.blake3,
                )
            finally:
                os.close(fd)
            for i, ok, digest in zip(indices, complete, digests, strict=True):
                if not ok or digest != job.sources[i].checksum:
                    bad.add(job.block_ids[i])
        return bad

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves -------------------------------------------------------------------------
    def save(self, metadata: ThawConnectorMetadata) -> None:
        for job in metadata.saves:
            dest = str(job.meta.get("dest", ""))
            try:
                self._save(job, dest)
            except Exception as exc:
                logger.error("thaw: request %s: saving the snapshot to %s failed: %s", job.req_id, dest, exc)
                _write_error(dest, f"{type(exc).__name__}: {exc}")

    def _save(self, job: SaveJob, dest: str) -> None:
        if self.spec is None:
            raise RuntimeError("the KV cache is not registered")
        if not dest or not os.path.isabs(dest):
            raise ValueError(f"snapshot destination must be an absolute path, got {dest!r}")
        start = time.perf_counter()
        bs = self.spec.block_size
        parent = job.meta.get("parent") or None
        start_key = bytes.fromhex(parent["last_key"]) if parent else None
        full = len(job.token_ids) // bs
        own_tokens = job.token_ids[job.first_block * bs : full * bs]
        keys = chain_keys(self.spec, own_tokens, start_key=start_key)
        if len(keys) != len(job.block_ids):
            raise RuntimeError(f"{len(job.block_ids)} engine blocks for {len(keys)} snapshot blocks")
        tail = list(job.token_ids[full * bs :])
        last_key = keys[-1] if keys else (start_key if start_key is not None else b"")
        # On the CPU each block is written straight from the cache rows (one pwritev per
        # block); elsewhere the blocks are gathered into the staging buffer first.
        views = block_views(self._layers, job.block_ids, self._layout)
        if views is None:
            staged = gather_blocks(
                self._layers,
                job.block_ids,
                layout=self._layout,
                out=self._staging.rows(len(job.block_ids), self.spec.block_nbytes),
            ).cpu()
            views = [[memoryview(staged[i].numpy())] for i in range(len(job.block_ids))]
        meta = {
            "created_by": f"thaw-agents {__version__}",
            "hash_scheme": HASH_SCHEME,
            "kv_spec": self.spec.to_json(),
            "snapshot": {
                "id": snapshot_id(self.spec, last_key, tail),
                "first_block": job.first_block,
                "token_ids": list(own_tokens),
                "tail_token_ids": tail,
                "keys": [k.hex() for k in keys],
                "parent": parent and {k: parent[k] for k in ("snapshot_id", "num_blocks", "last_key")},
            },
        }
        # Shared memory needs no fsync; a disk does.
        fsync = not dest.startswith("/dev/shm/")
        container = write_container(
            dest,
            "kv",
            meta,
            [(f"block {job.first_block + i}", views[i]) for i in range(len(views))],
            fsync=fsync,
        )
        logger.debug(
            "thaw: request %s: saved %d blocks (%d bytes) in %.1f ms",
            job.req_id,
            len(views),
            container.payload_nbytes,
            (time.perf_counter() - start) * 1e3,
        )


def _write_error(dest: str, message: str) -> None:
    if not dest:
        return
    try:
        fd = os.open(dest + ".error", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"error": message}, handle)
    except OSError:
        pass
