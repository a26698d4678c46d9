"""accel on the CPU: block gather/scatter against a plain NumPy copy of the same bytes.

A vLLM-CPU-shaped paged cache (30 layers of ``[blocks, 3 KV heads, 128 tokens, 2 * 64]``
bf16, the default model's) and N random blocks. The baseline copies the same number of bytes
from one contiguous buffer into another preallocated one with ``np.copyto``: the best any
gather can do. Goal: gather and scatter at >= 50% of that baseline.

Run: ``python benchmarks/accel_cpu.py [--blocks 8 32] [--reps 30] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _common import print_table, write_results

from thaw_agents.accel import gather_blocks, scatter_blocks, staging_nbytes


def _median_s(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--num-blocks", type=int, default=256, help="blocks in the cache")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    layers = [
        torch.randn((args.num_blocks, 3, 128, 128), generator=gen).to(torch.bfloat16)
        for _ in range(args.layers)
    ]
    results, table = [], []
    for n in args.blocks:
        ids = random.Random(n).sample(range(args.num_blocks), n)
        targets = random.Random(n + 1).sample(range(args.num_blocks), n)
        row = staging_nbytes(layers, 1)
        nbytes = n * row
        staged = torch.empty((n, row), dtype=torch.uint8)
        src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        dst.fill(1)  # fault the pages in before timing
        baseline = _median_s(lambda: np.copyto(dst, src), args.reps)  # noqa: B023
        gather = _median_s(lambda: gather_blocks(layers, ids, out=staged), args.reps)  # noqa: B023
        scatter = _median_s(lambda: scatter_blocks(staged, layers, targets), args.reps)  # noqa: B023
        for case, seconds in (("gather", gather), ("scatter", scatter)):
            pct = 100 * baseline / seconds
            results.append(
                {
                    "case": case,
                    "num_blocks": n,
                    "nbytes": nbytes,
                    "baseline_ms": baseline * 1e3,
                    "thaw_ms": seconds * 1e3,
                    "pct_of_numpy_copy": pct,
                    "goal_met": pct >= 50,
                }
            )
            table.append(
                (
                    f"{case} {n} blocks",
                    f"{nbytes / 1e6:.1f}",
                    f"{baseline * 1e3:.2f}",
                    f"{seconds * 1e3:.2f}",
                    f"{nbytes / seconds / 1e9:.1f}",
                    f"{pct:.0f}%",
                )
            )
    print_table(["case", "MB", "numpy copy ms", "accel ms", "accel GB/s", "of numpy"], table)
    payload = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    print("wrote", write_results("accel_cpu", payload, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
