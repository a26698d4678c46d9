"""The worker half of the thaw connector.

Runs where the KV cache lives (the engine-core process on CPU, the GPU worker process
otherwise). Loads snapshot blocks into the cache before a step's forward, synchronously; after
the forward, hands a request's prompt blocks to a background writer (:mod:`.writer`) that
writes the snapshot file, in its store and nowhere else, while the engine keeps stepping.

Before a block is read, the file it comes from is checked against this engine's full KV spec
(model fingerprint, dtype, block size, layout, resolved attention backend, shapes); each block's
checksum is verified as it is read. Failures never raise into vLLM: a block that fails is
reported so vLLM recomputes it (and the scheduler half corrects the served-token count). Each
save's result (written, or the error's type and message) is recorded once (:mod:`.results`):
it goes to the scheduler half with the step's worker metadata and stays here, by snapshot id,
for a front's ``thaw_save_result``, which turns a failure back into the typed error.

In a tensor-parallel engine each rank has its own worker half (in its own process) and cache
(its slice of the KV heads): it reads its own regions of each block and writes its own share
of a snapshot into the one file every rank fills (:mod:`thaw_agents._kv_ranks`); its results
carry its rank, and the scheduler half and ``thaw_save_result``'s caller combine the ranks'.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import torch

from thaw_agents.accel import (
    BlockLayout,
    CudaBlockLoader,
    StagingBuffer,
    block_views,
    check_cuda_data_path,
    gather_blocks,
    read_blocks_into,
    scatter_blocks,
)

from .._kvspec import KVSpec
from .._manifest import ParentRef, check_compatible, derive_snapshot, write_kv_snapshot
from .._store import snapshot_path
from .._threads import in_parts, pin_one_core_each
from .config import ThawConnectorConfig
from .engine_spec import LayoutUnknownError, tensor_parallel_rank, worker_spec
from .manifests import ManifestCache
from .metadata import LoadJob, SaveJob, ThawConnectorMetadata
from .results import SaveResults
from .writer import SaveWriter, error_result

if TYPE_CHECKING:
    from vllm.config import VllmConfig

__all__ = ["ThawWorker"]

logger = logging.getLogger(__name__)


class ThawWorker:
    """Owns the registered KV caches and runs load and save jobs."""

    def __init__(self, vllm_config: VllmConfig, config: ThawConnectorConfig) -> None:
        self._config = vllm_config
        self.store = config.store
        self.rank = 0  # in the tensor-parallel group, known once the cache is registered
        self._layers: list[torch.Tensor] = []
        self._layout = BlockLayout(block_dim=0)
        self.spec: KVSpec | None = None
        self._spec_error = "the KV cache is not registered yet"
        self._load_errors: set[int] = set()
        self._staging = StagingBuffer()
        self._manifests = ManifestCache(self.store)
        self._cuda_loader: CudaBlockLoader | None = None
        self._last_load: dict[str, Any] | None = None
        self._writer = SaveWriter()
        self._save_in_step = config.save_in_step
        self._in_place: set[str] = set()  # requests whose queued saves read the cache rows
        self._results = SaveResults(keep=256)  # for the scheduler half and thaw_save_result

    # -- setup -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
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
        self.rank = tensor_parallel_rank()
        names = list(kv_caches)
        self._layers = [kv_caches[n] for n in names]
        first = self._layers[0]
        # Find the dimension that indexes blocks: the one equal to the cache's block count.
        num_blocks = cfg.cache_config.num_gpu_blocks or 0
        block_dim = 0
        if num_blocks and first.shape[0] != num_blocks and first.dim() > 1 and first.shape[1] == num_blocks:
            block_dim = 1  # FlashAttention-style [2, num_blocks, ...]
        self._layout = BlockLayout(block_dim=block_dim)
        if first.is_cuda:
            # A GPU cache needs the CUDA data path (CuPy kernels). Without it every load would
            # fail and be recomputed quietly: refuse to start instead (CupyMissingError names
            # the package to install).
            device = first.device.index or 0
            check_cuda_data_path(device)
            self._cuda_loader = CudaBlockLoader(device)
        else:
            # Loads read and check blocks on every core, each thread on its own one like
            # vLLM's OpenMP threads (see thaw_agents._threads for what a moving thread cost).
            pin_one_core_each()
        try:
            self.spec = worker_spec(cfg, names, self._layers, block_dim)
        except LayoutUnknownError as exc:
            # Fail closed: without a known layout nothing is loaded or saved.
            self._spec_error = f"thaw is disabled in this engine: {exc}"
            logger.error("%s", self._spec_error)
        if self.spec is not None and self._cuda_loader is not None:
            self._cuda_loader.reserve(self.spec.block_nbytes)  # pinned slots now, not in a request
        logger.debug(
            "thaw: registered %d KV layers, first %s stride %s, block_dim %d, store %s",
            len(names),
            tuple(first.shape),
            first.stride(),
            block_dim,
            self.store,
        )

    def describe(self) -> dict[str, Any]:
        """``{"spec": ..., "store": ...}``, or ``{"error": ...}`` when thaw cannot run here."""
        if self.spec is None:
            return {"error": self._spec_error}
        out: dict[str, Any] = {"spec": self.spec.to_json(), "store": str(self.store), "rank": self.rank}
        if self._last_load is not None:
            out["last_load"] = dict(self._last_load)  # what the latest load cost (benchmarks)
        return out

    def _require_spec(self) -> KVSpec:
        if self.spec is None:
            raise RuntimeError(self._spec_error)
        return self.spec

    # -- loads -------------------------------------------------------------------------
    def start_load_kv(self, metadata: ThawConnectorMetadata) -> None:
        for job in metadata.loads:
            try:
                self._load(job)
            except Exception as exc:
                logger.error(
                    "thaw: request %s: loading %d blocks of %s failed, they will be recomputed: %s",
                    job.req_id,
                    len(job.block_ids),
                    job.snapshot_id,
                    exc,
                )
                self._load_errors.update(job.block_ids)

    def _check_files(self, job: LoadJob) -> None:
        """Every file the job reads is in the store and matches this engine's whole spec."""
        spec = self._require_spec()
        for snapshot in dict.fromkeys(src.snapshot_id for src in job.sources[self.rank]):
            path = snapshot_path(self.store, snapshot)
            check_compatible(self._manifests.read(path, snapshot).spec, spec, path=str(path))

    def _load(self, job: LoadJob) -> None:
        start = time.perf_counter()
        self._check_files(job)
        spec = self._require_spec()
        # On the CPU blocks are read straight into the cache rows; on a GPU through pinned
        # chunks to the device, checked there (CudaBlockLoader); otherwise into the host
        # staging buffer first, then scattered.
        views = block_views(self._layers, job.block_ids, self._layout)
        if views is None and self._cuda_loader is not None:
            bad = self._read_verified_cuda(job, spec.block_nbytes)
        elif views is None:
            staged = self._staging.rows(len(job.block_ids), spec.block_nbytes)
            rows = staged.numpy()
            bad = self._read_verified(job, [[memoryview(rows[i])] for i in range(len(job.block_ids))])
            good = [i for i, b in enumerate(job.block_ids) if b not in bad]
            if good:
                scatter_blocks(
                    staged[good].contiguous(),
                    self._layers,
                    [job.block_ids[i] for i in good],
                    layout=self._layout,
                )
        else:
            bad = self._read_verified(job, views)
        if bad:
            logger.error(
                "thaw: request %s: %d blocks of %s failed their checksum; recomputing them",
                job.req_id,
                len(bad),
                job.snapshot_id,
            )
            self._load_errors.update(bad)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        self._last_load = {
            "blocks": len(job.block_ids),
            "failed": len(bad),
            "nbytes": len(job.block_ids) * spec.block_nbytes,
            "ms": elapsed_ms,
            "route": "cuda" if self._cuda_loader is not None else "host",
        }
        logger.debug(
            "thaw: request %s: loaded %d blocks in %.1f ms",
            job.req_id,
            len(job.block_ids) - len(bad),
            elapsed_ms,
        )

    def _read_verified(self, job: LoadJob, views: list[list[memoryview]]) -> set[int]:
        """Read each block into its views (host rows); the engine block ids that failed."""
        sources = job.sources[self.rank]

        def read_part(fd: int, indices: list[int]) -> tuple[list[bool], list[str | None]]:
            return read_blocks_into(
                fd, [sources[i].offset for i in indices], [views[i] for i in indices], hasher=blake3.blake3
            )

        def read(fd: int, indices: list[int]) -> tuple[list[bool], list[str | None]]:
            # The engine waits for the load anyway: read and check on every core (preadv and
            # BLAKE3 release the GIL), one thread per core (register_kv_caches). 92 MB on two
            # cores: 36-40 ms, against 32-38 ms with no engine running (benchmarks/load_floor.py).
            parts = in_parts(functools.partial(read_part, fd), indices)
            return [ok for part in parts for ok in part[0]], [d for part in parts for d in part[1]]

        return self._verify_by_file(job, read)

    def _read_verified_cuda(self, job: LoadJob, row_nbytes: int) -> set[int]:
        """Read, scatter and check every block on the GPU; the engine block ids that failed."""
        assert self._cuda_loader is not None
        loader = self._cuda_loader
        sources = job.sources[self.rank]
        return self._verify_by_file(
            job,
            lambda fd, indices: loader.load(
                fd,
                [sources[i].offset for i in indices],
                row_nbytes,
                self._layers,
                [job.block_ids[i] for i in indices],
                self._layout,
            ),
            row_nbytes=row_nbytes,
        )

    def _verify_by_file(
        self,
        job: LoadJob,
        read: Callable[[int, list[int]], tuple[list[bool], list[str | None]]],
        *,
        row_nbytes: int | None = None,
    ) -> set[int]:
        """One open per file of the chain, ``read(fd, source indices)`` -> (complete, digests);
        the engine block ids whose bytes were short or did not match their checksum."""
        bad: set[int] = set()
        sources = job.sources[self.rank]  # this rank's regions of each block
        by_file: dict[str, list[int]] = defaultdict(list)
        for i, src in enumerate(sources):
            if row_nbytes is not None and src.nbytes != row_nbytes:
                bad.add(job.block_ids[i])  # another block size than this engine's: never read
            else:
                by_file[src.snapshot_id].append(i)
        for snapshot, indices in by_file.items():
            fd = _open_regular(snapshot_path(self.store, snapshot))
            try:
                complete, digests = read(fd, indices)
            finally:
                os.close(fd)
            for i, ok, digest in zip(indices, complete, digests, strict=True):
                if not ok or digest != sources[i].checksum:
                    bad.add(job.block_ids[i])
        return bad

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves -------------------------------------------------------------------------
    def save(self, metadata: ThawConnectorMetadata) -> None:
        """Hand this step's saves to the background writer (called in ``wait_for_save``).

        A GPU cache is copied to host memory here (a fast device-to-host copy, so the write
        needs nothing of the cache); a CPU cache is read by the writer straight from the cache
        rows, which vLLM does not overwrite before :meth:`handle_preemptions` lets it.
        """
        for job in metadata.saves:
            self._results.queued(job.req_id, job.snapshot_id)
            try:
                staged = self._stage(job)
            except Exception as exc:
                self._writer.submit(job.req_id, functools.partial(self._failed, job, exc))
                continue
            if staged is None:
                self._in_place.add(job.req_id)
            self._writer.submit(job.req_id, functools.partial(self._write, job, staged))
            if self._save_in_step:
                self._writer.wait([job.req_id])

    def handle_preemptions(self, metadata: ThawConnectorMetadata) -> None:
        """Before this step writes blocks that queued saves still read (vLLM freed them: the
        request finished or was preempted), finish those saves. Saves of host copies need
        nothing of the cache and are not waited for."""
        wanted = [r for r in metadata.flush if r in self._in_place]
        if wanted:
            start = time.perf_counter()
            self._writer.wait(wanted)
            logger.debug(
                "thaw: waited %.1f ms for %d saves before reusing their blocks",
                (time.perf_counter() - start) * 1e3,
                len(wanted),
            )

    def take_results(self) -> list[tuple[str, dict[str, Any]]]:
        """(request id, result) of the saves finished since the last call (for the scheduler)."""
        self._collect()
        return self._results.take_new()

    def save_result(self, snapshot_id: str) -> dict[str, Any] | None:
        """The result of the latest save of ``snapshot_id`` among the last few hundred; None
        while a save of it is queued or being written (or when this engine never saved it)."""
        self._collect()
        return self._results.latest(snapshot_id)

    def shutdown(self) -> None:
        """Write what is queued (vLLM reuses no block a queued save reads), then stop."""
        self._writer.shutdown()
        self._collect()

    def _collect(self) -> None:
        """Move finished saves from the writer into the results (any thread: the engine's
        step and a front's ``thaw_save_result`` call may come from different threads)."""
        for req_id, result in self._writer.take_done():
            if not self._writer.busy(req_id):
                self._in_place.discard(req_id)
            self._results.finished(req_id, result, rank=self.rank)

    def _stage(self, job: SaveJob) -> torch.Tensor | None:
        """A host copy of the job's blocks when the cache cannot be read in place, else None."""
        if not job.block_ids or block_views(self._layers, job.block_ids[:1], self._layout) is not None:
            return None
        spec = self._require_spec()
        # Each queued save owns its copy (the shared staging buffer is the loads').
        out = torch.empty(
            (len(job.block_ids), spec.block_nbytes), dtype=torch.uint8, pin_memory=self._staging.pinned
        )
        return gather_blocks(self._layers, job.block_ids, layout=self._layout, out=out)

    def _write(self, job: SaveJob, staged: torch.Tensor | None) -> dict[str, Any]:
        """Runs on the writer thread: write the snapshot, return its result."""
        start = time.perf_counter()
        try:
            self._save(job, staged)
        except Exception as exc:
            return self._failed(job, exc)
        spec = self._require_spec()
        return {
            "snapshot_id": job.snapshot_id,
            "status": "written",
            "tokens": len(job.token_ids),
            "blocks": len(job.block_ids),
            "nbytes": len(job.block_ids) * spec.block_nbytes,
            "ms": round((time.perf_counter() - start) * 1e3, 3),
        }

    def _failed(self, job: SaveJob, exc: Exception) -> dict[str, Any]:
        logger.error("thaw: request %s: saving snapshot %s failed: %s", job.req_id, job.snapshot_id, exc)
        return error_result(job.snapshot_id, exc)

    def _save(self, job: SaveJob, staged: torch.Tensor | None = None) -> None:
        spec = self._require_spec()
        start = time.perf_counter()
        parent = None
        if job.parent_id:  # from the parent's validated file, never from the request
            parent = ParentRef(
                snapshot_id=job.parent_id, num_blocks=job.first_block, last_key=job.parent_last_key
            )
        content = derive_snapshot(spec, job.token_ids[job.first_block * spec.block_size :], parent=parent)
        if content.num_blocks != len(job.block_ids):
            raise RuntimeError(f"{len(job.block_ids)} engine blocks for {content.num_blocks} snapshot blocks")
        sid = content.snapshot_id
        if sid != job.snapshot_id:
            raise ValueError(
                f"the request expects snapshot {job.snapshot_id} but its tokens make {sid}: the "
                "caller's engine description is stale or the request was forged; nothing was written"
            )
        # On the CPU each block is written straight from the cache rows (one pwritev per
        # block); elsewhere from the host copy made in the engine step (_stage).
        if staged is None:
            views = block_views(self._layers, job.block_ids, self._layout) or []
        else:
            views = [[memoryview(staged[i].numpy())] for i in range(len(job.block_ids))]
        # Every rank of a tensor-parallel engine writes its share under the same job (the
        # request id, the same on every rank); the last one renames the file into place.
        write_kv_snapshot(
            self.store, spec, content, views, rank=self.rank, job=job.req_id, engine_pid=job.engine_pid
        )
        logger.debug(
            "thaw: request %s: rank %d saved %d blocks (%d bytes) of %s in %.1f ms",
            job.req_id,
            self.rank,
            len(views),
            len(views) * spec.block_nbytes,
            sid,
            (time.perf_counter() - start) * 1e3,
        )


def _open_regular(path: Path) -> int:
    """An fd of a regular file in the store: no symbolic link, no FIFO that would block."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd
