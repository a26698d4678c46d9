"""The GPU BLAKE3 kernel's source, run on the CPU: same digests as the blake3 package.

CI has no GPU, so the CUDA C of ``thaw_blake3_level`` is compiled for the host with a small
shim: every CUDA thread of a block is a ``std::thread``, ``__shared__`` arrays are statics
shared by them, ``__syncthreads`` is a ``std::barrier``. The launches are the ones
:func:`plan_levels` makes for the GPU. The same cases run on a real GPU in
``tests/unit/test_accel_gpu.py``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

blake3 = pytest.importorskip("blake3")

from thaw_agents.accel._blake3 import SOURCE, plan_levels  # noqa: E402

_SHIM = r"""
#include <algorithm>
#include <barrier>
#include <thread>
#include <vector>
using std::min;
struct uint4 { unsigned int x, y, z, w; };
struct dim3_ { unsigned int x; };
thread_local dim3_ threadIdx;
static dim3_ blockIdx;
static std::barrier<>* block_barrier;
#define __device__
#define __global__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads() block_barrier->arrive_and_wait()
static inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, int n) {
    n &= 31;
    return n ? (lo >> n) | (hi << (32 - n)) : lo;
}
"""

_RUNNER = r"""
extern "C" void run_grid(const long long* table, int grid, int leaf) {
    for (int b = 0; b < grid; b++) {
        blockIdx.x = b;
        std::barrier<> barrier(GROUP);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (int t = 0; t < GROUP; t++)
            threads.emplace_back([=] { threadIdx.x = t; thaw_blake3_level(table, leaf); });
        for (auto& thread : threads) thread.join();
    }
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ to compile the kernel for the host")
    folder = tmp_path_factory.mktemp("blake3")
    source = folder / "kernel.cpp"
    source.write_text(_SHIM + SOURCE.replace("#pragma unroll", "") + _RUNNER)
    library = folder / "kernel.so"
    result = subprocess.run(
        [compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-o", str(library), str(source), "-lpthread"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 and "barrier" in result.stderr:
        pytest.skip("the host compiler has no C++20 <barrier>")
    assert result.returncode == 0, result.stderr
    return ctypes.CDLL(str(library))


def _digests(lib: ctypes.CDLL, data: np.ndarray, regions: list[tuple[int, int]]) -> list[str]:
    roots = np.zeros((len(regions), 32), np.uint8)
    scratch: list[np.ndarray] = []

    def alloc(nbytes: int) -> int:
        scratch.append(np.zeros(nbytes, np.uint8))
        return scratch[-1].ctypes.data

    pointers = np.asarray([data.ctypes.data + o for o, _ in regions], dtype=np.int64)
    sizes = np.asarray([n for _, n in regions], dtype=np.int64)
    for table, leaf in plan_levels(pointers, sizes, roots.ctypes.data, alloc):
        lib.run_grid(table.ctypes.data_as(ctypes.c_void_p), len(table), leaf)
    return [row.tobytes().hex() for row in roots]


def _expected(data: np.ndarray, regions: list[tuple[int, int]]) -> list[str]:
    return [blake3.blake3(data[o : o + n].tobytes()).hexdigest() for o, n in regions]


def test_block_and_chunk_edges_aligned_and_not(emulated: ctypes.CDLL) -> None:
    data = np.random.default_rng(0).integers(0, 256, 700_000, dtype=np.uint8)
    regions = [
        (0, 0),  # the empty input: one zero-length root block
        (0, 1),
        (5, 63),  # unaligned start: the byte-wise loads
        (16, 64),
        (16, 65),
        (32, 1023),
        (64, 1024),  # exactly one chunk: the root is the chunk's last block
        (1, 1025),
        (0, 2048),
        (0, 3072),  # three chunks: an odd node promoted
        (7, 5000),
        (0, 256 * 1024),  # one full group
        (0, 257 * 1024),  # a second group of one chunk
        (3, 300_000),
        (4096, 513 * 1024 + 17),
    ]
    assert _digests(emulated, data, regions) == _expected(data, regions)


def test_three_levels(emulated: ctypes.CDLL) -> None:
    """More than 256 x 256 chunks: leaf groups, a level of 257 values, then the root."""
    data = np.random.default_rng(1).integers(0, 256, (64 << 20) + 4096, dtype=np.uint8)
    regions = [(16, (64 << 20) + 1024 + 5), (0, 3)]
    assert _digests(emulated, data, regions) == _expected(data, regions)


def test_plan_puts_each_digest_in_its_row() -> None:
    """Regions finish at different levels; every one ends in its own root row, once."""
    sizes = np.asarray([0, 1024, 300 * 1024, 256 * 1024 * 300], dtype=np.int64)
    roots_ptr = 1 << 40
    outs: list[int] = []
    levels = list(plan_levels(np.zeros(4, np.int64), sizes, roots_ptr, lambda n: 1 << 30))
    for table, _ in levels:
        outs += [int(o) for o, root in zip(table[:, 4], table[:, 5], strict=True) if root]
    assert sorted(outs) == [roots_ptr + 32 * r for r in range(4)]
    assert [leaf for _, leaf in levels] == [1, 0, 0]
