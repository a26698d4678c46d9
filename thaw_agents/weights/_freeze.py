"""Freezing: every tensor of a model streamed into one weights file.

The tensors (CPU or GPU) go through pinned, page-aligned slots into an O_DIRECT file, hashed
as they go; the header, whose length does not depend on the checksums, is written last and
the file renamed into place.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import blake3

from .._container import encode_header
from .._errors import SnapshotFormatError, write_failed
from ._manifest import WEIGHT_DTYPES, WeightsStats, dtype_name, weights_header

if TYPE_CHECKING:
    import torch

__all__ = ["freeze_module", "freeze_tensors", "module_tensors"]

logger = logging.getLogger(__name__)


def module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a weights file holds for ``module``: parameters and persistent buffers.

    Tensors that share memory with an earlier one (tied embeddings) are listed once, under
    the first name, so freeze and restore agree on the list.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: list[tuple[str, torch.Tensor]] = []
    named: list[tuple[str, Any]] = list(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for buf_name, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf_name not in mod._non_persistent_buffers_set:
                named.append((f"{mod_name}.{buf_name}" if mod_name else buf_name, buf))
    for name, tensor in named:
        data = tensor.data if hasattr(tensor, "data") else tensor
        if data.device.type == "meta":
            raise SnapshotFormatError(f"tensor {name} is on the meta device: load the model's weights first")
        key = (data.data_ptr(), data.numel() * data.element_size(), tuple(data.shape))
        if data.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, data))
    return out


def _hasher() -> Any:
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


def freeze_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    *,
    model_name: str,
    model_fingerprint: str,
    fsync: bool | None = None,
    extra: Mapping[str, Any] | None = None,
) -> WeightsStats:
    """Write ``tensors`` (CPU or CUDA, contiguous) to a weights file at ``path``, atomically.

    Args:
        path: destination; written under a temporary name and renamed, mode 0600.
        tensors: name -> tensor, in the order they will be stored.
        model_name: recorded for people and ``thaw-agents info``.
        model_fingerprint: what a restore checks against (``expect_fingerprint``).
        fsync: flush to stable storage before the rename; default: yes unless under /dev/shm.
        extra: more JSON fields for the ``weights`` manifest (e.g. ``vllm_version``).

    Example:
        >>> import torch
        >>> stats = freeze_tensors("/tmp/t.thaw", {"w": torch.ones(3)}, model_name="m",
        ...                        model_fingerprint="sha256:0")
        >>> stats.nbytes
        12
    """
    from ..accel import AtomicFile, write_segments

    start = time.perf_counter()
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")
    for name, t in items:
        if dtype_name(t) not in WEIGHT_DTYPES:
            raise ValueError(f"tensor {name} has dtype {t.dtype}, which weights files do not hold")
    items = [(n, t if t.is_contiguous() else t.contiguous()) for n, t in items]
    meta = {
        **(dict(extra) if extra else {}),
        "model_name": model_name,
        "model_fingerprint": model_fingerprint,
        "tensors": [{"name": n, "dtype": dtype_name(t), "shape": list(t.shape)} for n, t in items],
    }
    # Checksums are fixed-width hex: the header's length is known before the payload is hashed.
    placeholder = encode_header(weights_header(items, ["0" * 64] * len(items), meta))
    path = os.fspath(path)
    if fsync is None:
        fsync = not os.path.abspath(path).startswith("/dev/shm/")
    nbytes = sum(t.numel() * t.element_size() for _, t in items)
    try:
        with AtomicFile(path, fsync=fsync) as file:
            digests = write_segments(file, len(placeholder), [t for _, t in items], hasher=_hasher)
            blob = encode_header(weights_header(items, [str(d) for d in digests], meta))
            assert len(blob) == len(placeholder), "header length changed with the checksums"
            file.pwrite(blob, 0)
            route = "o_direct" if file.direct else "buffered"
            file.commit()
    except OSError as exc:  # the partial file is gone (AtomicFile); say why in our terms
        raise write_failed(path, exc, len(placeholder) + nbytes) from exc
    stats = WeightsStats(
        nbytes=nbytes, num_tensors=len(items), seconds=time.perf_counter() - start, route=route
    )
    logger.info("thaw: froze %d tensors (%d bytes) to %s at %.2f GB/s", len(items), nbytes, path, stats.gbps)
    return stats


def freeze_module(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    model_fingerprint: str,
    **kwargs: Any,
) -> WeightsStats:
    """Freeze every parameter and persistent buffer of ``module`` (see :func:`freeze_tensors`)."""
    return freeze_tensors(
        path, module_tensors(module), model_name=model_name, model_fingerprint=model_fingerprint, **kwargs
    )
