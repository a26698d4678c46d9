"""thaw-vllm 0.6.0 (the anchor of ``anchor_hydrate.py``), found, imported and shimmed to run on
vLLM 0.32's CPU backend. Installed for the benchmark only, never as a dependency."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import Any

__all__ = ["ANCHOR_VERSION", "check_anchor", "import_anchor"]

ANCHOR_VERSION = "0.6.0"


def _anchor_env(site: str | None) -> None:
    """Where the anchor is found, and the environment it reads when imported."""
    if site and site not in sys.path:
        sys.path.insert(0, site)
    # Importing thaw_vllm sets VLLM_ALLOW_INSECURE_SERIALIZATION=1 (cloudpickle in vLLM's IPC)
    # unless set: keep vLLM's default. Its collective_rpc paths (TP > 1) are not used here.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "0"
    # Without its Rust extension (thaw-native) the anchor raises instead of falling back.
    os.environ.setdefault("THAW_ALLOW_PYTHON_FALLBACK", "1")
    os.environ.setdefault("THAW_QUIET", "1")


def check_anchor(site: str | None) -> str | None:
    """None when thaw-vllm ANCHOR_VERSION can be imported from ``site``, else why not."""
    import importlib.metadata
    import importlib.util

    _anchor_env(site)
    where = f" from {site}" if site else ""
    if importlib.util.find_spec("thaw_vllm") is None:
        return (
            f"thaw-vllm (the anchor) is not importable{where}. Install it for this benchmark only: "
            "pip install --no-deps --target /tmp/anchor/site thaw_vllm-0.6.0-py3-none-any.whl, "
            "then pass --anchor-site /tmp/anchor/site"
        )
    try:
        found = importlib.metadata.version("thaw-vllm")
    except importlib.metadata.PackageNotFoundError:
        found = "unknown"
    if found != ANCHOR_VERSION:
        return f"thaw-vllm {found}{where}: the shims here are written for {ANCHOR_VERSION}"
    return None


class _CpuTorch:
    """``torch`` as the anchor's kv_snapshot module sees it on a CPU build: ``pin_memory`` is
    dropped (a CPU build has no pinned-memory allocator) and ``cuda.synchronize`` does nothing
    (every copy is synchronous there). Everything else is torch itself."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.cuda = SimpleNamespace(synchronize=lambda *args, **kwargs: None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def empty(self, *args: Any, pin_memory: bool = False, **kwargs: Any) -> Any:
        return self._torch.empty(*args, **kwargs)


def _shim_anchor_for_cpu(kv_snapshot: Any) -> list[str]:
    """Make thaw-vllm 0.6.0's KV freeze/restore run on vLLM 0.32's CPU backend; the shims applied.

    The anchor finds the engine at ``llm.llm_engine.engine_core.engine_core`` and the KV cache at
    ``.model_executor.driver_worker.model_runner.kv_caches`` (both still there in 0.32, with the
    engine core in-process) and indexes each layer as ``[2 (K/V), num_blocks, ...]``. vLLM's CPU
    backend keeps ``[num_blocks, heads, block_size, K|V]`` (K and V side by side in the last
    axis), so the anchor is shown ``layer.unsqueeze(0)``: ``view[:, block]`` is then one whole
    block, the same bytes our snapshot holds, written in place into the engine's cache.
    """
    import torch

    shims: list[str] = []
    if not torch.cuda.is_available():
        kv_snapshot.torch = _CpuTorch(torch)
        kv_snapshot.check_pinned = lambda *args, **kwargs: None
        shims.append("kv_snapshot.torch: pin_memory dropped, cuda.synchronize a no-op; check_pinned a no-op")
    real_engine_core = kv_snapshot._get_engine_core

    def engine_core(llm: Any) -> Any:
        core = real_engine_core(llm)
        pool = core.scheduler.kv_cache_manager.block_pool
        caches = core.model_executor.driver_worker.model_runner.kv_caches
        if not caches or caches[0].shape[0] != len(pool.blocks):
            return core  # [2, num_blocks, ...] already: what the anchor expects
        views = [layer.unsqueeze(0) for layer in caches]
        runner = SimpleNamespace(kv_caches=views)
        return SimpleNamespace(
            scheduler=core.scheduler,
            vllm_config=core.vllm_config,
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)),
        )

    kv_snapshot._get_engine_core = engine_core
    shims.append("kv_snapshot._get_engine_core: block-first KV layers shown as layer.unsqueeze(0)")
    return shims


def _shim_anchor_fork_meta(fork_module: Any, kv_snapshot: Any) -> list[str]:
    """thaw-vllm 0.6.0's ``fork()`` reads the KV metadata from the ``.meta`` sidecar that only
    its Rust writer makes; its Python fallback writes the same JSON into the file's own header
    (the legacy format, which its restore reads). Without the extension ``fork()`` therefore
    fails after writing the snapshot: read the header when there is no sidecar."""
    real_load_meta = fork_module._load_meta

    def load_meta(kv_path: str) -> dict:
        if not os.path.exists(kv_snapshot._meta_path(kv_path)):
            meta, _ = kv_snapshot._read_legacy_single_file(kv_path)
            if meta is not None:
                return meta
        return real_load_meta(kv_path)

    fork_module._load_meta = load_meta
    return ["fork._load_meta: the legacy file's own header when there is no .meta sidecar"]


def import_anchor(site: str | None) -> tuple[Any, list[str]]:
    """thaw_vllm, imported (after the engine started, so vLLM never loads its plugin) and shimmed."""
    import importlib

    _anchor_env(site)
    import thaw_vllm
    from thaw_vllm import kv_snapshot

    fork_module = importlib.import_module("thaw_vllm.fork")  # the attribute is the function
    shims = _shim_anchor_for_cpu(kv_snapshot) + _shim_anchor_fork_meta(fork_module, kv_snapshot)
    return thaw_vllm, shims
