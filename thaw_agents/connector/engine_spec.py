"""What this engine's KV cache is, as a :class:`KVSpec`: the one description both halves check
snapshots against.

The scheduler half knows the model, the block size and the platform from the config; the
worker half also knows the cache tensors and the attention backend that was actually
resolved. Detection fails closed: a layout that cannot be determined is an error, never a
placeholder that could match another engine's placeholder.

In a tensor-parallel engine every rank has its own worker half and cache (its slice of the KV
heads); the spec is the same on every rank (``layers`` describes one rank's block) and records
the rank count and each rank's head slice. Pipeline parallelism is refused (fail closed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._compat import attn_backend_name, kv_cache_layout
from .._kvspec import KVSpec, LayerSpec, kv_head_slices, model_fingerprint

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

__all__ = [
    "LayoutUnknownError",
    "engine_fingerprint",
    "kv_layout_name",
    "platform_name",
    "tensor_parallel_rank",
    "worker_spec",
]


class LayoutUnknownError(RuntimeError):
    """The KV byte layout of this engine cannot be determined; thaw refuses to load or save."""


def engine_fingerprint(vllm_config: VllmConfig) -> str:
    model_config = vllm_config.model_config
    return model_fingerprint(model_config.model, model_config.hf_config.to_dict())


def tensor_parallel_rank() -> int:
    """This worker's rank in its tensor-parallel group (0 without distributed state)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # no distributed state: a single-process engine
        return 0


def platform_name() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else str(current_platform.device_name)


def kv_layout_name(
    vllm_config: VllmConfig, layer_names: list[str], dtype: torch.dtype, block_size: int
) -> str:
    """The byte layout of a block: on CPU ``<backend>/<isa>`` (the instruction-set variant
    decides how K is packed), elsewhere ``<platform>/<backend>/<NHD|HND>`` (the token/head
    order vLLM chose). The backend is the one vLLM resolved for these layers, never "auto";
    anything that cannot be determined raises :class:`LayoutUnknownError`."""
    from vllm.platforms import current_platform

    backend = _resolved_backend(vllm_config, layer_names)
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        head_size = vllm_config.model_config.get_head_size()
        try:
            isa = _get_attn_isa(dtype, block_size, head_size, vllm_config.cache_config.cache_dtype)
        except Exception as exc:  # a vLLM without this helper, or a combination it refuses
            raise LayoutUnknownError(f"cannot tell the CPU attention variant: {exc}") from exc
        return f"{backend}/{isa}"
    order = kv_cache_layout()
    if order not in {"NHD", "HND"}:
        raise LayoutUnknownError(f"vLLM does not say how it orders tokens and heads in a block ({order!r})")
    return f"{platform_name()}/{backend}/{order}"


def _backend_label(name: str) -> str:
    return name.lower().replace("_", "-")  # CPU_ATTN -> cpu-attn, FLASH_ATTN -> flash-attn


def _resolved_backend(vllm_config: VllmConfig, layer_names: list[str]) -> str:
    context: dict[str, Any] = vllm_config.compilation_config.static_forward_context
    names: set[str] = set()
    for name in layer_names:
        backend = attn_backend_name(context.get(name))
        if not backend:
            raise LayoutUnknownError(f"the attention backend of layer {name!r} is unknown")
        names.add(_backend_label(backend))
    if len(names) != 1:
        raise LayoutUnknownError(f"layers use several attention backends {sorted(names)}")
    return names.pop()


def _check_block_contiguous(name: str, tensor: torch.Tensor, block_dim: int) -> None:
    """The dimensions after ``block_dim`` must be laid out densely in their logical order: the
    spec describes a block by its logical shape, so a permuted layout (HND stored under an NHD
    shape) would record bytes in an order the spec does not say. Refuse it."""
    expected = 1
    inner = zip(tensor.shape[block_dim + 1 :], tensor.stride()[block_dim + 1 :], strict=True)
    for size, stride in reversed(list(inner)):
        if size != 1 and stride != expected:
            raise LayoutUnknownError(
                f"layer {name!r}: a block of the {tuple(tensor.shape)} cache with strides {tensor.stride()} "
                "is not dense in its logical order"
            )
        expected *= size


def worker_spec(
    vllm_config: VllmConfig, names: list[str], layers: list[torch.Tensor], block_dim: int
) -> KVSpec:
    """The full spec of the registered cache tensors (one per layer, blocks along ``block_dim``)."""
    from vllm import __version__ as vllm_version

    cfg = vllm_config
    block_size = cfg.cache_config.block_size
    parallel = cfg.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise LayoutUnknownError(
            "pipeline-parallel engines are not supported (each stage holds other layers)"
        )
    tp_size = int(parallel.tensor_parallel_size)
    specs = []
    for name, tensor in zip(names, layers, strict=True):
        _check_block_contiguous(name, tensor, block_dim)
        shape = list(tensor.shape)
        del shape[block_dim]
        specs.append(
            LayerSpec(
                name=name,
                block_shape=tuple(shape),
                block_nbytes=tensor.numel() // tensor.shape[block_dim] * tensor.element_size(),
            )
        )
    dtype = layers[0].dtype
    return KVSpec(
        model_name=cfg.model_config.served_model_name or cfg.model_config.model,
        model_fingerprint=engine_fingerprint(cfg),
        vllm_version=vllm_version,
        platform=platform_name(),
        kv_layout=kv_layout_name(cfg, names, dtype, block_size),
        dtype=str(dtype).removeprefix("torch."),
        block_size=block_size,
        layers=tuple(specs),
        tensor_parallel_size=tp_size,
        kv_head_slices=kv_head_slices(cfg.model_config.get_total_num_kv_heads(), tp_size)
        if tp_size > 1
        else (),
    )
