"""A weights file into a vLLM model that is already serving: verified restore, then vLLM's
post-load processing again.

A loaded vLLM model is no longer in the layout a weights file holds: vLLM's post-load
processing (``process_weights_after_loading``) repacks weights for its kernels, and on CPU it
replaces each linear layer's ``weight`` by an empty tensor and keeps a packed copy inside the
layer. So a swap puts every tensor back in the model's own layout first, then runs that same
processing again, as a loader does after a normal load:

1. Targets: each parameter and persistent buffer of the model (tied ones once, as
   :func:`~thaw_agents.weights.module_tensors` lists them at freeze time). A tensor that
   processing left in the model's layout (same shape and dtype as vLLM recorded for it when
   the model was built) is written in place (its storage stays: CUDA graphs keep reading it);
   one that processing replaced gets a fresh tensor in the recorded layout.
2. Restore: the ordinary verified pipeline; every check and every checksum passes before the
   first target byte is written. On any error the live tensors are untouched and the fresh
   ones are dropped: the engine keeps serving the old weights.
3. Attach the fresh tensors, run ``process_weights_after_loading(model, model_config, device)``.

Quantized models are refused (their processing is not repeatable on processed weights).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from ._manifest import WeightsManifest, WeightsStats, check_targets, read_weights_manifest

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ._host import HostWeights

__all__ = ["restore_into_running_model", "weights_fingerprint"]


def weights_fingerprint(manifest: WeightsManifest) -> str:
    """The identity of a weights file's content: its tensors' names, dtypes, shapes and
    checksums (every one verified by a restore). Equal weights give equal fingerprints."""
    material = [[e.name, e.dtype, list(e.shape), e.checksum] for e in manifest.tensors]
    digest = hashlib.sha256(b"thaw-weights-v1|" + json.dumps(material, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()


@dataclass(slots=True)
class _Target:
    module: nn.Module
    attr: str
    is_param: bool
    tensor: torch.Tensor
    fresh: bool


def _recorded(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """The meta tensors vLLM recorded for ``module`` when it built the model (its layout
    before post-processing); empty when vLLM recorded none."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:  # a vLLM without in-place reload support
        return {}, {}
    info = LAYERWISE_INFO.get(module)
    return info.restore_metadata if info is not None else ({}, {})


def _materialize(meta: torch.Tensor, module: nn.Module, device: torch.device) -> torch.Tensor:
    import torch
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    with torch.device(device):
        fresh = materialize_meta_tensor(meta)  # a copy of the attributes: the record stays as it is
    return restore_layer_refs(fresh, module)


def _targets(model: nn.Module, device: torch.device) -> dict[str, _Target]:
    seen: set[int] = set()
    out: dict[str, _Target] = {}
    for mod_name, module in model.named_modules():
        params, buffers = _recorded(module)
        persistent = [
            (n, b, False)
            for n, b in module._buffers.items()
            if b is not None and n not in module._non_persistent_buffers_set
        ]
        for attr, live, is_param in [
            (n, p, True) for n, p in module._parameters.items() if p is not None
        ] + persistent:
            if id(live) in seen:  # tied to a tensor listed already (as freeze lists it)
                continue
            seen.add(id(live))
            name = f"{mod_name}.{attr}" if mod_name else attr
            meta = (params if is_param else buffers).get(attr)
            in_layout = meta is None or (
                tuple(live.shape) == tuple(meta.shape) and live.dtype == meta.dtype and live.numel() > 0
            )
            if in_layout:
                out[name] = _Target(module, attr, is_param, live.data, fresh=False)
            else:
                out[name] = _Target(module, attr, is_param, _materialize(meta, module, device), fresh=True)
    return out


def restore_into_running_model(
    model: nn.Module,
    model_config: Any,
    device: torch.device,
    source: str | HostWeights,
) -> tuple[WeightsStats, float, str]:
    """Swap the weights of a loaded vLLM ``model`` for those of ``source`` (a weights file's
    path, or a :class:`HostWeights`), all or nothing; then redo vLLM's post-load processing.

    Returns:
        The restore's statistics, the seconds of vLLM's post-load processing, and the new
        weights' :func:`weights_fingerprint`.

    Raises:
        ConfigError: the model is quantized.
        SnapshotError: the file is bad or holds another architecture (``SnapshotMismatchError``
            names the tensor and field); the model is unchanged.
    """
    import torch
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from . import _restore

    if getattr(model_config, "quantization", None):
        raise ConfigError(
            f"swapping weights into a quantized model ({model_config.quantization}) is not supported"
        )
    targets = _targets(model, device)
    items = [(name, t.tensor) for name, t in targets.items()]
    if isinstance(source, str):
        manifest = read_weights_manifest(source)
        pairs = check_targets(manifest, items)
        stats = _restore._restore_from_file(manifest, pairs)
    else:
        manifest = source.manifest
        stats = source.restore(items)
    # Every byte is verified and in place: attach the fresh tensors, then process as a loader does.
    for target in targets.values():
        if not target.fresh:
            continue
        delattr(target.module, target.attr)
        if target.is_param:
            target.module.register_parameter(target.attr, target.tensor)  # type: ignore[arg-type]
        else:
            target.module.register_buffer(target.attr, target.tensor, persistent=True)
    start = time.perf_counter()
    with torch.no_grad():
        process_weights_after_loading(model, model_config, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return stats, time.perf_counter() - start, weights_fingerprint(manifest)
