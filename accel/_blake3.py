"""BLAKE3 digests of byte ranges of a tensor: on the GPU for CUDA tensors, else the blake3 package.

The GPU computes the same digests as the ``blake3`` package (32-byte output, no key), so a
restore can verify bytes where they landed instead of making the host CPUs read them again:
on an H100 host the CPUs hash ~45 GB/s while PCIe moves ~54 GB/s, and both compete with the
page-cache reads for the same cores.

BLAKE3 hashes 1 KiB chunks independently and joins their chaining values in a binary tree
whose left subtrees are the largest power of two of chunks. Pairing neighbours level by level
and promoting an odd last node builds exactly that tree, so a thread block can reduce any
aligned group of 256 chunks (or 256 nodes of a higher level) in shared memory. One launch per
level covers every region: 8 GiB in one region takes three launches (chunks, then 32,768
nodes, then 128).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["SOURCE", "PendingDigests", "blake3_digests", "blake3_hex", "launch_blake3_digests", "plan_levels"]

_CHUNK = 1024
_GROUP = 256
_BIG_REGION_NBYTES = 32 << 20
_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_PERMUTATION = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)


def _rounds() -> str:
    """The seven rounds as straight-line C: every message index a constant, so ``m`` stays in
    registers. The schedule is derived from the specification's permutation, not typed out."""
    order = list(range(16))
    lines = []
    for _ in range(7):
        m = [f"m[{i}]" for i in order]
        lines += [
            f"G(v[0], v[4], v[8], v[12], {m[0]}, {m[1]});",
            f"G(v[1], v[5], v[9], v[13], {m[2]}, {m[3]});",
            f"G(v[2], v[6], v[10], v[14], {m[4]}, {m[5]});",
            f"G(v[3], v[7], v[11], v[15], {m[6]}, {m[7]});",
            f"G(v[0], v[5], v[10], v[15], {m[8]}, {m[9]});",
            f"G(v[1], v[6], v[11], v[12], {m[10]}, {m[11]});",
            f"G(v[2], v[7], v[8], v[13], {m[12]}, {m[13]});",
            f"G(v[3], v[4], v[9], v[14], {m[14]}, {m[15]});",
        ]
        order = [order[p] for p in _PERMUTATION]
    return "\n    ".join(lines)


SOURCE = (
    r"""
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define CHUNK_START 1u
#define CHUNK_END 2u
#define PARENT 4u
#define ROOT 8u
#define GROUP """
    + str(_GROUP)
    + r"""

__device__ __forceinline__ u32 rotr(u32 x, int n) { return __funnelshift_r(x, x, n); }

#define G(a, b, c, d, x, y)                                                         \
    a = a + b + (x); d = rotr(d ^ a, 16); c = c + d; b = rotr(b ^ c, 12);           \
    a = a + b + (y); d = rotr(d ^ a, 8);  c = c + d; b = rotr(b ^ c, 7);

__device__ __forceinline__ void iv(u32 cv[8]) {
"""
    + "".join(f"    cv[{i}] = {w}u;\n" for i, w in enumerate(_IV))
    + r"""}

// cv <- the first 8 words of BLAKE3's compression output (a chaining value, or the digest
// when flags hold ROOT).
__device__ __forceinline__ void compress(u32 cv[8], const u32 m[16], u64 counter, u32 len, u32 flags) {
    u32 v[16];
    #pragma unroll
    for (int i = 0; i < 8; i++) v[i] = cv[i];
    u32 k[8];
    iv(k);
    v[8] = k[0]; v[9] = k[1]; v[10] = k[2]; v[11] = k[3];
    v[12] = (u32)counter; v[13] = (u32)(counter >> 32); v[14] = len; v[15] = flags;
    """
    + _rounds()
    + r"""
    #pragma unroll
    for (int i = 0; i < 8; i++) cv[i] = v[i] ^ v[i + 8];
}

// One 64-byte message block, zero padded past len. Little-endian words, like the host.
__device__ __forceinline__ void load_block(u32 m[16], const unsigned char* p, int len, bool vec) {
    if (len == 64 && vec) {
        const uint4* q = (const uint4*)p;
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint4 w = q[i];
            m[4 * i] = w.x; m[4 * i + 1] = w.y; m[4 * i + 2] = w.z; m[4 * i + 3] = w.w;
        }
        return;
    }
    #pragma unroll
    for (int i = 0; i < 16; i++) {
        u32 w = 0;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            if (4 * i + j < len) w |= (u32)p[4 * i + j] << (8 * j);
        }
        m[i] = w;
    }
}

// The chaining value of chunk `chunk` of a region of `total` bytes (the digest when root).
__device__ void chunk_cv(const unsigned char* data, i64 total, i64 chunk, bool root, u32 cv[8]) {
    const i64 start = chunk * 1024;
    const i64 rest = total - start;
    const int len = rest < 1024 ? (int)rest : 1024;
    const int blocks = len == 0 ? 1 : (len + 63) / 64;
    const unsigned char* p = data + start;
    const bool vec = (((u64)p) & 15ull) == 0ull;
    iv(cv);
    for (int b = 0; b < blocks; b++) {
        const int blen = min(64, len - 64 * b);
        u32 m[16];
        load_block(m, p + 64 * b, blen, vec);
        u32 flags = b == 0 ? CHUNK_START : 0u;
        if (b == blocks - 1) flags |= CHUNK_END | (root ? ROOT : 0u);
        compress(cv, m, (u64)chunk, (u32)blen, flags);
    }
}

// table[g] = {src, total bytes, first item, items (1..GROUP), out, root}. A block reduces its
// group's items (chunks of src when leaf, else 32-byte chaining values at src) to one value.
extern "C" __global__ void __launch_bounds__(GROUP)
thaw_blake3_level(const i64* __restrict__ table, int leaf) {
    const i64* e = table + 6 * (i64)blockIdx.x;
    const unsigned char* src = (const unsigned char*)e[0];
    int n = (int)e[3];
    const bool root = e[5] != 0;
    __shared__ u32 cvs[GROUP][9];  // padded row: no bank conflicts between neighbours
    const int t = threadIdx.x;
    if (t < n) {
        u32 cv[8];
        if (leaf) {
            chunk_cv(src, e[1], e[2] + t, root && n == 1, cv);
        } else {
            const uint4* q = (const uint4*)(src + (e[2] + t) * 32);
            const uint4 a = q[0], b = q[1];
            cv[0] = a.x; cv[1] = a.y; cv[2] = a.z; cv[3] = a.w;
            cv[4] = b.x; cv[5] = b.y; cv[6] = b.z; cv[7] = b.w;
        }
        #pragma unroll
        for (int i = 0; i < 8; i++) cvs[t][i] = cv[i];
    }
    __syncthreads();
    while (n > 1) {
        const int half = n >> 1;
        const bool carry = (n & 1) && t == half;
        u32 cv[8];
        if (t < half) {
            u32 m[16];
            #pragma unroll
            for (int i = 0; i < 8; i++) { m[i] = cvs[2 * t][i]; m[8 + i] = cvs[2 * t + 1][i]; }
            iv(cv);
            compress(cv, m, 0ull, 64u, PARENT | ((root && n == 2) ? ROOT : 0u));
        } else if (carry) {
            #pragma unroll
            for (int i = 0; i < 8; i++) cv[i] = cvs[n - 1][i];
        }
        __syncthreads();
        if (t < half || carry) {
            #pragma unroll
            for (int i = 0; i < 8; i++) cvs[t][i] = cv[i];
        }
        n = half + (n & 1);
        __syncthreads();
    }
    u32* out = (u32*)e[4];
    if (t < 8) out[t] = cvs[0][t];
}
"""
)


def plan_levels(
    pointers: np.ndarray, sizes: np.ndarray, roots_ptr: int, alloc: Callable[[int], int]
) -> Iterator[tuple[np.ndarray, int]]:
    """The launches that hash regions ``(pointers[r], sizes[r])``: ``(table, leaf)`` per level.

    Each table row is one thread block of :data:`thaw_blake3_level`; region ``r``'s digest
    lands at ``roots_ptr + 32 * r``. ``alloc(nbytes)`` returns the address of scratch for a
    level's chaining values, which must live until the launches have run.
    """
    src = pointers.astype(np.int64)
    sizes = sizes.astype(np.int64)
    count = np.maximum(1, -(-sizes // _CHUNK))
    active = np.arange(len(sizes))
    leaf = 1
    while len(active):
        groups = -(-count // _GROUP)
        is_root = groups == 1
        level = alloc(max(1, int(groups[~is_root].sum())) * 32)
        # Row per group: region r's g-th group covers items [g*GROUP, min(count, (g+1)*GROUP)).
        owner = np.repeat(np.arange(len(active)), groups)
        g = np.arange(len(owner)) - np.repeat(np.cumsum(groups) - groups, groups)
        first = g * _GROUP
        items = np.minimum(count[owner] - first, _GROUP)
        kept = np.where(is_root, 0, groups)
        slot = np.cumsum(kept) - kept
        out = np.where(is_root[owner], roots_ptr + 32 * active[owner], level + 32 * (slot[owner] + g))
        table = np.stack(
            [src[owner], sizes[active][owner], first, items, out, is_root[owner].astype(np.int64)], axis=1
        )
        yield np.ascontiguousarray(table, dtype=np.int64), leaf
        # The next level reduces each unfinished region's group values.
        still = ~is_root
        src = level + 32 * slot[still]
        count = groups[still]
        active = active[still]
        leaf = 0


def _launch_cuda(buffer: torch.Tensor, regions: Sequence[tuple[int, int]]) -> torch.Tensor:
    import torch

    from ._cuda import _state
    from ._kernels import kernel, require_cupy

    device = buffer.device.index or 0
    cp = require_cupy()
    launch = kernel("thaw_blake3_level", device, SOURCE)
    stream = torch.cuda.current_stream(device)
    offsets = np.asarray([o for o, _ in regions], dtype=np.int64)
    sizes = np.asarray([n for _, n in regions], dtype=np.int64)
    roots = torch.empty((len(regions), 32), dtype=torch.uint8, device=device)
    keep: list[torch.Tensor] = []

    def alloc(nbytes: int) -> int:
        keep.append(torch.empty(nbytes, dtype=torch.uint8, device=device))
        return keep[-1].data_ptr()

    for table, leaf in plan_levels(buffer.data_ptr() + offsets, sizes, roots.data_ptr(), alloc):
        # Pinned and non-blocking: a pageable copy would wait for everything queued on the stream.
        table_dev = torch.from_numpy(table).pin_memory().to(device, non_blocking=True)
        keep.append(table_dev)
        with cp.cuda.Device(device), _state(device).cupy_stream(stream.cuda_stream):
            launch((len(table),), (_GROUP,), (np.uint64(table_dev.data_ptr()), np.int32(leaf)))
    # The scratch and tables go back to PyTorch's allocator now: it reuses them only for work
    # queued later on this stream, after these launches.
    keep.clear()
    return roots


class PendingDigests:
    """Digests queued on a CUDA stream: :meth:`result` waits for them (not for the whole GPU)."""

    def __init__(self, roots: torch.Tensor) -> None:
        import torch

        self._roots = roots
        self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(roots.device))

    def result(self) -> list[str]:
        """The hex digests, in the order of the regions."""
        self._done.synchronize()
        return [row.tobytes().hex() for row in self._roots.cpu().numpy()]


def blake3_hex(view: np.ndarray | memoryview | bytes) -> str:
    """The BLAKE3 hex digest of one host buffer, on all cores when it is big (>= 32 MiB).

    Example:
        >>> blake3_hex(b"abc") == __import__("blake3").blake3(b"abc").hexdigest()
        True
    """
    import blake3

    view = memoryview(view)
    threads = blake3.blake3.AUTO if view.nbytes >= _BIG_REGION_NBYTES else 1
    hasher = blake3.blake3(max_threads=threads)
    hasher.update(view)
    return hasher.hexdigest()


def launch_blake3_digests(buffer: torch.Tensor, regions: Sequence[tuple[int, int]]) -> PendingDigests:
    """Queue :func:`blake3_digests` of a CUDA tensor on the current stream without waiting.

    Example:
        >>> pending = launch_blake3_digests(landing, [(0, 4096)])  # doctest: +SKIP
        >>> pending.result()  # doctest: +SKIP
        ['...']
    """
    flat = _checked(buffer, regions)
    if not flat.is_cuda:
        raise ValueError("launch_blake3_digests needs a CUDA tensor; use blake3_digests")
    return PendingDigests(_launch_cuda(flat, regions))


def _checked(buffer: torch.Tensor, regions: Sequence[tuple[int, int]]) -> torch.Tensor:
    import torch

    if not buffer.is_contiguous():
        raise ValueError("blake3 digests need a contiguous tensor")
    flat = buffer.reshape(-1).view(torch.uint8)
    for offset, nbytes in regions:
        if offset < 0 or nbytes < 0 or offset + nbytes > flat.numel():
            raise ValueError(f"region ({offset}, {nbytes}) lies outside the {flat.numel()}-byte buffer")
    return flat


def blake3_digests(buffer: torch.Tensor, regions: Sequence[tuple[int, int]]) -> list[str]:
    """The BLAKE3 hex digest of each ``(offset, nbytes)`` byte range of a contiguous tensor.

    On a CUDA tensor the digests are computed on its GPU (a few launches on the current
    stream for all regions, then one small device-to-host copy); on the CPU by the ``blake3``
    package, big regions multi-threaded. Both give what ``blake3.blake3(data).hexdigest()``
    gives.

    Example:
        >>> import torch
        >>> data = torch.arange(10, dtype=torch.uint8)
        >>> blake3_digests(data, [(0, 10)]) == [__import__("blake3").blake3(bytes(range(10))).hexdigest()]
        True
    """
    flat = _checked(buffer, regions)
    if not regions:
        return []
    if flat.is_cuda:
        return PendingDigests(_launch_cuda(flat, regions)).result()
    data = flat.numpy()
    views = [data[o : o + n] for o, n in regions]
    if len(views) == 1:
        return [blake3_hex(views[0])]
    with ThreadPoolExecutor(max_workers=min(8, len(views))) as pool:
        return list(pool.map(blake3_hex, views))
