"""thaw_agents.accel: the freeze/restore data path (block gather/scatter, staging, file I/O).

One interface over CPU (NumPy/PyTorch) and CUDA (CuPy) tensors. Imports nothing else of
thaw-agents.

Example:
    >>> import torch
    >>> from thaw_agents.accel import gather_blocks, scatter_blocks
    >>> kv = [torch.randn(8, 2, 4) for _ in range(3)]
    >>> staged = gather_blocks(kv, [5, 2])
    >>> scatter_blocks(staged, kv, [0, 1])
"""

from ._blocks import BlockLayout, gather_blocks, scatter_blocks, staging_nbytes
from ._fileio import block_views, read_blocks_into
from ._staging import StagingBuffer

__all__ = [
    "BlockLayout",
    "StagingBuffer",
    "block_views",
    "gather_blocks",
    "read_blocks_into",
    "scatter_blocks",
    "staging_nbytes",
]
