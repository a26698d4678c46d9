"""Frozen weights: every tensor of a model in one ``.thaw`` file, restored into an initialised model.

The file is the snapshot container (``docs/snapshot-format.md``) with ``kind: "weights"``: one
region per tensor, each checksummed with BLAKE3, and a ``weights`` object naming the tensors,
their dtypes and shapes and the model's fingerprint, itself covered by a header checksum.
Nothing in the file is executable. Restoring validates the header, the manifest and the match
with the target tensors, then reads and verifies every byte *before* the first parameter is
written: a truncated or corrupt file raises a typed error and leaves the model as it was.

Modules, each depending only on those above it:

* ``_manifest``: the header: :class:`WeightsManifest`, :func:`read_weights_manifest`,
  :func:`check_targets`.
* ``_freeze``: :func:`freeze_tensors`, :func:`freeze_module`.
* ``_files``, ``_verify``, ``_restore``: the restore pipeline, :func:`restore_tensors`,
  :func:`restore_module`.
* ``_host``: :class:`HostWeights`, a file held in host memory for repeated restores.
* ``_vllm``: ``load_format="thaw"`` (:func:`register`, run by vLLM's plugin hook) and
  :func:`freeze_model`.
* ``_inplace``: a weights file into a loaded vLLM model (verified restore, then vLLM's
  post-load processing again), run in the engine's workers.
* ``_swap``: :func:`swap_weights` / :func:`aswap_weights`, a running engine's side of it.

Example:
    >>> import torch
    >>> from thaw_agents.weights import freeze_module, restore_module
    >>> model = torch.nn.Linear(4, 2)
    >>> _ = freeze_module(model, "/tmp/lin.thaw", model_name="demo", model_fingerprint="sha256:0")
    >>> fresh = torch.nn.Linear(4, 2)
    >>> _ = restore_module(fresh, "/tmp/lin.thaw")
    >>> bool(torch.equal(fresh.weight, model.weight))
    True
"""

from __future__ import annotations

from ._freeze import freeze_module, freeze_tensors, module_tensors
from ._host import HostWeights
from ._inplace import weights_fingerprint
from ._manifest import TensorEntry, WeightsManifest, WeightsStats, check_targets, read_weights_manifest
from ._restore import release_staging, restore_module, restore_tensors
from ._swap import SwapResult, aswap_weights, swap_weights
from ._vllm import LOAD_FORMAT, freeze_model, register

__all__ = [
    "LOAD_FORMAT",
    "HostWeights",
    "SwapResult",
    "TensorEntry",
    "WeightsManifest",
    "WeightsStats",
    "aswap_weights",
    "check_targets",
    "freeze_model",
    "freeze_module",
    "freeze_tensors",
    "module_tensors",
    "read_weights_manifest",
    "register",
    "release_staging",
    "restore_module",
    "restore_tensors",
    "swap_weights",
    "weights_fingerprint",
]
