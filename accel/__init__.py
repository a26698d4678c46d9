"""thaw_agents.accel: the freeze/restore data path (block gather/scatter, staging, file I/O).

One interface over CPU (NumPy/PyTorch) and CUDA (CuPy) tensors. Imports nothing else of
thaw-agents, and nothing heavy at import time (torch and CuPy load on first use).

* :func:`gather_blocks` / :func:`scatter_blocks`: paged-KV blocks of every layer to and from
  one contiguous staging tensor; on CUDA one raw-kernel launch on PyTorch's current stream.
* :class:`StagingBuffer`, :func:`aligned_empty`, :class:`HostRegistration`: reusable,
  page-aligned, page-locked host memory; ``cudaHostRegister`` for shared-memory hand-off.
* :class:`AtomicFile`, :func:`write_segments`, :func:`read_into`, :func:`probe_o_direct`:
  pipelined O_DIRECT file I/O with buffered fallback and atomic rename.
* :func:`copy_segments`: many copies in one launch (CUDA) or a loop of memcpys (CPU).
* :func:`blake3_digests`: BLAKE3 of byte ranges, computed on the GPU for CUDA tensors (the
  same digests as the ``blake3`` package), so restores verify bytes where they landed.

Example:
    >>> import torch
    >>> from thaw_agents.accel import gather_blocks, scatter_blocks
    >>> kv = [torch.randn(8, 2, 4) for _ in range(3)]
    >>> staged = gather_blocks(kv, [5, 2])
    >>> scatter_blocks(staged, kv, [0, 1])
"""

from ._blake3 import PendingDigests, blake3_digests, blake3_hex, launch_blake3_digests
from ._blocks import BlockLayout, gather_blocks, scatter_blocks, staging_nbytes
from ._copy import copy_segments
from ._cuda import CupyMissingError, check_cuda_data_path
from ._direct import O_DIRECT, AtomicFile, probe_o_direct, read_into, write_segments
from ._fileio import block_views, read_blocks_into
from ._kvio import CudaBlockLoader
from ._staging import HostRegistration, StagingBuffer, aligned_empty, cuda_available

__all__ = [
    "O_DIRECT",
    "AtomicFile",
    "BlockLayout",
    "CudaBlockLoader",
    "CupyMissingError",
    "HostRegistration",
    "PendingDigests",
    "StagingBuffer",
    "aligned_empty",
    "blake3_digests",
    "blake3_hex",
    "block_views",
    "check_cuda_data_path",
    "copy_segments",
    "cuda_available",
    "gather_blocks",
    "launch_blake3_digests",
    "probe_o_direct",
    "read_blocks_into",
    "read_into",
    "scatter_blocks",
    "staging_nbytes",
    "write_segments",
]
