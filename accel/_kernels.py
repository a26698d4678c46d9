"""CuPy's side of the CUDA data path: the raw kernels, their compilation, the lazy import.

``thaw_blocks`` gathers or scatters paged-KV blocks (a task per block and contiguous run of a
layer block); ``thaw_copy_table`` runs any list of copies. Both move 16-byte vectors with
four loads in flight per thread when the addresses and sizes allow it, bytes otherwise.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["CupyMissingError", "kernel", "require_cupy"]

_SOURCE = r"""
typedef unsigned long long u64;
typedef long long i64;

// Copy n bytes; 16-byte vectors when both ends and n allow it (the common case: KV blocks
// and weights are 16-aligned), four loads in flight per thread before the stores.
__device__ __forceinline__ void copy_bytes(unsigned char* __restrict__ dst,
                                           const unsigned char* __restrict__ src, i64 n) {
    if ((((u64)dst | (u64)src | (u64)n) & 15ull) == 0ull) {
        const uint4* __restrict__ s = (const uint4*)src;
        uint4* __restrict__ d = (uint4*)dst;
        i64 v = n >> 4;
        i64 k = threadIdx.x;
        const i64 step = blockDim.x;
        for (; k + 3 * step < v; k += 4 * step) {
            uint4 a = s[k], b = s[k + step], c = s[k + 2 * step], e = s[k + 3 * step];
            d[k] = a; d[k + step] = b; d[k + 2 * step] = c; d[k + 3 * step] = e;
        }
        for (; k < v; k += step) d[k] = s[k];
    } else {
        for (i64 k = threadIdx.x; k < n; k += blockDim.x) dst[k] = src[k];
    }
}

// seg[s] = {layer base + s-th outer offset, block stride, column in the staged row, nbytes}.
// Task t = (row i, segment s). to_staged = 1 gathers cache -> staged, 0 scatters back.
extern "C" __global__ void thaw_blocks(const i64* __restrict__ seg, int num_segs,
                                       const i64* __restrict__ ids, int num_ids,
                                       unsigned char* staged, i64 row_nbytes, int to_staged) {
    const i64 tasks = (i64)num_ids * num_segs;
    for (i64 t = blockIdx.x; t < tasks; t += gridDim.x) {
        const i64 i = t / num_segs;
        const i64* e = seg + 4 * (t - i * num_segs);
        unsigned char* cache = (unsigned char*)(e[0] + ids[i] * e[1]);
        unsigned char* row = staged + i * row_nbytes + e[2];
        if (to_staged) copy_bytes(row, cache, e[3]);
        else copy_bytes(cache, row, e[3]);
    }
}

// table[t] = {src, dst, nbytes}: any list of copies in one launch.
extern "C" __global__ void thaw_copy_table(const i64* __restrict__ table, i64 num_tasks) {
    for (i64 t = blockIdx.x; t < num_tasks; t += gridDim.x) {
        const i64* e = table + 3 * t;
        copy_bytes((unsigned char*)e[1], (const unsigned char*)e[0], e[2]);
    }
}
"""


class CupyMissingError(ImportError):
    """CuPy is not installed; the message is the pip command that installs it.

    Attributes:
        install: the command, e.g. ``pip install 'thaw-agents[cuda12]'``.
    """

    def __init__(self, install: str) -> None:
        self.install = install
        super().__init__(
            f"the CUDA data path of thaw_agents.accel needs CuPy, which is not installed; "
            f"install it with: {install}"
        )


def _install_command() -> str:
    try:
        import torch

        major = (torch.version.cuda or "12").split(".")[0]
    except ImportError:
        major = "12"
    extra = "cuda13" if major == "13" else "cuda12"
    return f"pip install 'thaw-agents[{extra}]'"


_lock = threading.Lock()
_kernels: dict[tuple[int, str], Any] = {}
_modules: dict[tuple[int, str], Any] = {}


def require_cupy() -> Any:
    """Import CuPy, or raise :class:`CupyMissingError` with the install command.

    Example:
        >>> cp = require_cupy()  # doctest: +SKIP
    """
    try:
        import cupy
    except ImportError as exc:
        raise CupyMissingError(_install_command()) from exc
    return cupy


def kernel(name: str, device: int, source: str = _SOURCE) -> Any:
    """The compiled function ``name`` of ``source`` (this module's kernels by default) on ``device``."""
    key = (device, name)
    function = _kernels.get(key)
    if function is None:
        cp = require_cupy()
        with _lock:
            module = _modules.get((device, source))
            if module is None:
                with cp.cuda.Device(device):
                    module = cp.RawModule(code=source, options=("-std=c++17",))
                _modules[(device, source)] = module
            function = module.get_function(name)
            _kernels[key] = function
    return function
