"""vLLM glue for weights files: the ``thaw`` load format and ``thaw-agents freeze``.

``LLM(model, load_format="thaw", model_loader_extra_config={"snapshot": path})`` builds the
model as usual and fills every parameter from ``path`` instead of the checkpoint; vLLM then
post-processes the weights (CPU GEMM packing, quantisation) exactly as after a normal load.
The loader is registered by a vLLM general plugin (entry point ``vllm.general_plugins`` ->
:func:`register`), which vLLM runs in every process it starts, so it works with the
in-process engine core and the multiprocess one alike.

A weights file holds the model in vLLM's own parameter layout (fused ``qkv_proj``,
``gate_up_proj``), captured right after vLLM's default loader and *before* post-processing:
restore is then a straight copy, and post-processing runs on the restored weights as it
would on freshly loaded ones. :func:`freeze_model` produces it by starting an engine with
``model_loader_extra_config={"freeze_to": path}``.

Extra config keys of the ``thaw`` load format:

* ``snapshot``: the weights file to restore (``{rank}`` is replaced by the tensor-parallel rank).
  In a tensor-parallel engine each rank restores its own file, and checks it completely (header,
  names, shapes, every checksum) before any rank writes a parameter: the ranks vote over vLLM's
  CPU group, and a rank whose file is missing or corrupt fails the load on every rank
  (its own typed error there, :class:`~thaw_agents.SnapshotError` naming it on the others).
* ``freeze_to``: load the checkpoint normally, then write the weights file here.
* ``load_format``: with ``freeze_to``, the vLLM load format that fills the model before it is
  frozen (default ``auto``; ``dummy`` freezes random weights of any config, for benchmarks).
* ``source``: how to read the file: ``auto`` (default), ``direct``, ``buffered``, ``mmap``.
* ``check_fingerprint``: refuse a file frozen from another model (default true).

Each worker keeps what its load moved (:func:`last_load`; ``llm.collective_rpc("thaw_weights_loaded")``
returns it per rank): file, bytes, seconds, GB/s and route.

Example:
    >>> from vllm import LLM                                   # doctest: +SKIP
    >>> llm = LLM("/models/SmolLM2", load_format="thaw",       # doctest: +SKIP
    ...           model_loader_extra_config={"snapshot": "/snap/smollm2.thaw"})
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError, SnapshotError

if TYPE_CHECKING:
    from torch import nn
    from vllm.config import ModelConfig

__all__ = ["LOAD_FORMAT", "freeze_model", "last_load", "register"]

logger = logging.getLogger(__name__)

LOAD_FORMAT = "thaw"
_KEYS = {"snapshot", "freeze_to", "load_format", "source", "check_fingerprint"}
_registered = False
_last_load: dict[str, Any] | None = None


def last_load() -> dict[str, Any] | None:
    """What this process's latest ``thaw`` load (restore or freeze) moved, or None:
    ``{"op", "path", "nbytes", "num_tensors", "seconds", "gbps", "route"}``."""
    return None if _last_load is None else dict(_last_load)


def _record(op: str, path: str, stats: Any) -> None:
    global _last_load
    _last_load = {
        "op": op,
        "path": path,
        "nbytes": stats.nbytes,
        "num_tensors": stats.num_tensors,
        "seconds": stats.seconds,
        "gbps": stats.gbps,
        "route": stats.route,
    }


def _rank_path(template: str) -> str:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no distributed state (a bare model in a test)
        rank, world = 0, 1
    if "{rank}" in template:
        return template.replace("{rank}", str(rank))
    if world > 1:
        raise ConfigError(
            f"tensor parallelism {world}: each rank holds its own shard; put '{{rank}}' in the path "
            f"({template!r}) so every rank reads and writes its own file"
        )
    return template


class _RankVote:
    """All tensor-parallel ranks agree that every rank's file passed its checks before any
    rank writes a parameter. Every rank votes exactly once (an all-gather over vLLM's CPU
    group): yes once its file is verified, no when anything failed before that, so no rank
    waits for a vote that never comes."""

    def __init__(self) -> None:
        self.rank, self.world, self.group = 0, 1, None
        try:
            from vllm.distributed import get_tp_group

            group = get_tp_group()
            self.rank, self.world, self.group = group.rank_in_group, group.world_size, group.cpu_group
        except Exception:  # no distributed state (a bare model in a test): one rank
            pass
        self.voted = False

    def _vote(self, ok: bool) -> list[int]:
        """The ranks that voted no."""
        self.voted = True
        if self.world == 1:
            return [] if ok else [self.rank]
        import torch
        import torch.distributed as dist

        votes = [torch.zeros(1, dtype=torch.int32) for _ in range(self.world)]
        dist.all_gather(votes, torch.tensor([int(ok)], dtype=torch.int32), group=self.group)
        return [rank for rank, vote in enumerate(votes) if not int(vote.item())]

    def verified(self) -> None:
        """Called when this rank's file is verified: raise if another rank's was not."""
        failed = self._vote(True)
        if failed:
            raise SnapshotError(
                f"the weights file of tensor-parallel rank {', '.join(map(str, failed))} failed its "
                f"checks (see that rank's error); rank {self.rank} wrote no parameter either"
            )

    def failed(self) -> None:
        """Called when this rank failed before its vote: tell the others."""
        if not self.voted:
            self._vote(False)


def _fingerprint(model_config: ModelConfig) -> str:
    from .._kvspec import model_fingerprint

    return model_fingerprint(model_config.model, model_config.hf_config.to_dict())


def _loader_class() -> type:
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class ThawModelLoader(BaseModelLoader):
        """Restores (``snapshot``) or freezes (``freeze_to``) a model's weights as a ``.thaw`` file."""

        def __init__(self, load_config: LoadConfig) -> None:
            super().__init__(load_config)
            extra = dict(load_config.model_loader_extra_config or {})
            unknown = set(extra) - _KEYS
            if unknown:
                raise ConfigError(
                    f"unknown model_loader_extra_config keys for load_format='thaw': {sorted(unknown)}"
                )
            snapshot, freeze_to = extra.get("snapshot"), extra.get("freeze_to")
            if bool(snapshot) == bool(freeze_to):
                raise ConfigError(
                    "load_format='thaw' needs exactly one of model_loader_extra_config['snapshot'] "
                    "(restore from a weights file) or ['freeze_to'] (write one)"
                )
            self.snapshot = os.path.expanduser(str(snapshot)) if snapshot else None
            self.freeze_to = os.path.expanduser(str(freeze_to)) if freeze_to else None
            self.source = str(extra.get("source", "auto"))
            self.check_fingerprint = bool(extra.get("check_fingerprint", True))
            base = str(extra.get("load_format", "auto"))
            if base == LOAD_FORMAT or (base != "auto" and not freeze_to):
                raise ConfigError(
                    f"model_loader_extra_config['load_format']={base!r}: it names the format that fills "
                    "the model before freeze_to writes it (auto, dummy, safetensors...), not 'thaw'"
                )
            self._default = get_model_loader(
                LoadConfig(load_format=base, download_dir=load_config.download_dir)
            )

        def download_model(self, model_config: ModelConfig) -> None:
            if self.freeze_to:
                self._default.download_model(model_config)

        def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
            from ._freeze import freeze_module
            from ._restore import release_staging, restore_module

            if self.freeze_to:
                self._default.load_weights(model, model_config)
                path = _rank_path(self.freeze_to)
                stats = freeze_module(
                    model,
                    path,
                    model_name=str(model_config.served_model_name or model_config.model),
                    model_fingerprint=_fingerprint(model_config),
                    extra={"vllm_version": _vllm_version(), "dtype": str(model_config.dtype)},
                )
                _record("freeze", path, stats)
                logger.info("thaw: froze the weights to %s (%.2f GB/s)", path, stats.gbps)
                return
            vote = _RankVote()
            try:
                path = _rank_path(str(self.snapshot))
                expect = _fingerprint(model_config) if self.check_fingerprint else None
                stats = restore_module(
                    model, path, expect_fingerprint=expect, source=self.source, before_write=vote.verified
                )
            except BaseException:
                vote.failed()
                raise
            finally:
                release_staging()  # one restore per engine: do not keep the pinned buffer
            _record("restore", path, stats)
            logger.info(
                "thaw: restored %d tensors (%.2f GB) from %s in %.3f s (%.2f GB/s, %s)",
                stats.num_tensors,
                stats.nbytes / 1e9,
                path,
                stats.seconds,
                stats.gbps,
                stats.route,
            )

    return ThawModelLoader


def _vllm_version() -> str:
    try:
        from vllm import __version__

        return str(__version__)
    except ImportError:
        return "unknown"


def register() -> None:
    """Register the ``thaw`` load format with vLLM (idempotent; vLLM's plugin hook calls it)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(_loader_class())
    _registered = True


def freeze_model(
    model: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    **engine_kwargs: Any,
) -> str:
    """Load ``model`` with vLLM's default loader and write its weights to ``output``.

    Starts a small engine (eager, minimal KV cache) whose loader writes the file right
    after the checkpoint is read, then shuts it down. Returns the file's path.

    Args:
        model: a Hugging Face folder or id; ``None`` for the default model.
        output: the weights file to write (atomically, mode 0600).
        engine_kwargs: more ``vllm.LLM`` arguments (``dtype``, ``tensor_parallel_size``...).

    Example:
        >>> freeze_model(None, "/tmp/smollm2.thaw")  # doctest: +SKIP
        '/tmp/smollm2.thaw'
    """
    import contextlib

    from vllm import LLM

    from ..models import resolve_model

    register()
    path = os.path.abspath(os.fspath(output))
    tp_size = int(engine_kwargs.get("tensor_parallel_size", 1) or 1)
    if tp_size > 1 and "{rank}" not in path:
        raise ConfigError(
            f"tensor_parallel_size={tp_size}: every rank writes its own shard; put '{{rank}}' in the "
            f"output path ({path!r}), e.g. model.rank{{rank}}.thaw"
        )
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError(f"the folder of {path} does not exist; create it first")
    kwargs: dict[str, Any] = {
        "enforce_eager": True,
        "max_model_len": 256,
        "kv_cache_memory_bytes": 64 << 20,
        "max_num_seqs": 1,
    }
    kwargs.update(engine_kwargs)
    llm = LLM(
        str(resolve_model(model)),
        load_format=LOAD_FORMAT,
        model_loader_extra_config={"freeze_to": path},
        **kwargs,
    )
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    return path
