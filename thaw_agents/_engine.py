"""Engine arguments for vLLM with thaw enabled, and a ``vllm.LLM`` factory.

Example:
    >>> import vllm, thaw_agents
    >>> llm = vllm.LLM(**thaw_agents.engine_kwargs(max_model_len=4096))   # doctest: +SKIP
    >>> llm = thaw_agents.make_llm()                                       # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError, DependencyError
from ._store import store_dir
from .models import resolve_model

if TYPE_CHECKING:
    import vllm

__all__ = ["CONNECTOR_NAME", "cpu_dtype", "engine_kwargs", "is_cpu_platform", "make_llm"]

CONNECTOR_NAME = "ThawConnector"
CONNECTOR_MODULE = "thaw_agents.connector.facade"
WORKER_EXTENSION = "thaw_agents.connector.worker_extension.ThawWorkerExtension"

# KV cache size on CPU: vLLM takes ~9 GiB when nothing is said; 2 GiB holds
# ~90k tokens of the default model and lets several engines share a laptop.
_CPU_KV_CACHE_BYTES = int(os.environ.get("THAW_AGENTS_CPU_KV_GIB", "2")) * (1 << 30)
# Smaller blocks cache more of a prefix (only full blocks are cached); the CPU backend
# wants multiples of 32.
_CPU_BLOCK_SIZE = 32
# CPU flags of native bfloat16 arithmetic (x86 AVX512-BF16 or AMX, Arm BF16). Without them
# vLLM's CPU kernels emulate bf16: on an AVX2-only EPYC, prefilling 1,000 tokens of the
# default model took 15.2 s in bfloat16 and 2.55 s in float32 (decode was equal).
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in {"flags", "Features"}:
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_dtype() -> str:
    """The dtype :func:`engine_kwargs` picks on CPU: bfloat16 where the CPU computes it natively,
    else float32 (six times faster to prefill there; twice the KV bytes per token).

    Example:
        >>> cpu_dtype() in {"bfloat16", "float32"}
        True
    """
    return "bfloat16" if _cpu_flags() & _NATIVE_BF16_FLAGS else "float32"


def is_cpu_platform() -> bool:
    """Whether the installed vLLM runs on the CPU backend."""
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        raise DependencyError(
            "vllm", "pip install 'thaw-agents[cpu]' (or [gpu] on a CUDA machine)", "the engine"
        ) from exc
    return bool(current_platform.is_cpu())


def engine_kwargs(model: str | os.PathLike[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """The vLLM engine arguments thaw-agents needs, with your overrides applied last.

    Sets prefix caching on, the thaw KV connector, the worker extension that lets
    :func:`thaw_agents.fork` describe the KV cache, and on CPU eager mode, a 2 GiB KV
    cache, 32-token blocks and :func:`cpu_dtype` (bfloat16 only where the CPU has native
    bf16). ``model=None`` means the default model.

    ``kv_connector_extra_config`` given in ``overrides`` is merged into the connector's
    config rather than replacing the connector. The connector's snapshot store is the
    user's store (``THAW_AGENTS_STORE``) as resolved now, unless ``{"store": FOLDER}`` is
    given there: an engine opens snapshot files only inside it.

    Example:
        >>> kw = engine_kwargs("/models/llama", max_model_len=8192)    # doctest: +SKIP
        >>> kw["enable_prefix_caching"]                                 # doctest: +SKIP
        True
    """
    extra = dict(overrides.pop("kv_connector_extra_config", None) or {})
    extra.setdefault("store", str(store_dir()))
    if "kv_transfer_config" in overrides and overrides["kv_transfer_config"] is not None:
        ktc = overrides["kv_transfer_config"]
        name = ktc.get("kv_connector") if isinstance(ktc, dict) else getattr(ktc, "kv_connector", None)
        if name != CONNECTOR_NAME:
            raise ConfigError(
                f"kv_transfer_config names the connector {name!r}; thaw needs {CONNECTOR_NAME!r}. "
                "Drop kv_transfer_config from the overrides (engine_kwargs sets it), or combine "
                "connectors with vLLM's MultiConnector yourself."
            )
    kwargs: dict[str, Any] = {
        "model": resolve_model(model),
        "enable_prefix_caching": True,
        "kv_transfer_config": {
            "kv_connector": CONNECTOR_NAME,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_both",
            # A snapshot block that fails to load is recomputed, never served as garbage.
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra,
        },
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if is_cpu_platform():
        kwargs.update(
            enforce_eager=True,
            kv_cache_memory_bytes=_CPU_KV_CACHE_BYTES,
            block_size=_CPU_BLOCK_SIZE,
            dtype=cpu_dtype(),
        )
    kwargs.update(overrides)
    return kwargs


def make_llm(model: str | os.PathLike[str] | None = None, **overrides: Any) -> vllm.LLM:
    """Build a ``vllm.LLM`` with :func:`engine_kwargs` (``model=None``: the default model).

    Example:
        >>> llm = make_llm(max_model_len=4096)                         # doctest: +SKIP
        >>> llm.generate("Hello")[0].outputs[0].text                   # doctest: +SKIP
    """
    kwargs = engine_kwargs(model, **overrides)
    from vllm import LLM

    return LLM(**kwargs)
