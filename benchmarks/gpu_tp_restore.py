"""Weights restore on several GPUs at once, outside vLLM: where a tensor-parallel load's time goes.

Each GPU gets its own process and its own weights file in ``/dev/shm`` (random bf16 tensors in
the shapes of an 8B model's rank share, ``--gb`` per rank). Cases, each timed per process:

  one        rank 0 alone (the one-GPU figure)
  parallel   every rank at once, each in its own process (what a TP engine's workers do)
  omp1       parallel, with ``torch.set_num_threads(1)`` in each process, as vLLM's multiprocess
             executor sets for its workers ("Reducing Torch parallelism ... to 1")

Prints a table and writes JSON (``--out``).

Run: python benchmarks/gpu_tp_restore.py [--ranks 2] [--gb 7.4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _tensors(rank: int, gb: float) -> list[tuple[str, Any]]:
    import torch

    per = 256 << 20  # 256 MiB tensors, like an 8B model's larger matrices per rank
    n = max(1, int(gb * 1e9 // per))
    device = torch.device("cuda", rank)
    shape = (per // 2,)
    return [(f"t{i}", torch.empty(shape, dtype=torch.bfloat16, device=device).normal_()) for i in range(n)]


def _worker(rank: int, gb: float, folder: str, threads: int | None, barrier: Any, queue: Any) -> None:
    import torch

    from thaw_agents.weights import freeze_tensors, restore_tensors

    torch.cuda.set_device(rank)
    if threads:
        torch.set_num_threads(threads)
    tensors = _tensors(rank, gb)
    path = os.path.join(folder, f"w.rank{rank}.thaw")
    if not os.path.exists(path):
        freeze_tensors(path, tensors, model_name="probe", model_fingerprint="sha256:probe")
    for _, t in tensors:
        t.zero_()
    torch.cuda.synchronize()
    barrier.wait()
    start = time.perf_counter()
    stats = restore_tensors(path, tensors)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    queue.put(
        {
            "rank": rank,
            "seconds": seconds,
            "nbytes": stats.nbytes,
            "gbps": stats.nbytes / seconds / 1e9,
            "route": stats.route,
            "cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
        }
    )


def _case(ranks: list[int], gb: float, folder: str, threads: int | None) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(ranks)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, gb, folder, threads, barrier, queue)) for r in ranks]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--gb", type=float, default=7.4, help="GB per rank")
    parser.add_argument("--folder", default="/dev/shm/thaw-tp-restore")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.update(NO_MULTICAST)
    Path(args.folder).mkdir(mode=0o700, exist_ok=True)
    cases = {
        "one": _case([0], args.gb, args.folder, None),
        "parallel": _case(list(range(args.ranks)), args.gb, args.folder, None),
        "omp1": _case(list(range(args.ranks)), args.gb, args.folder, 1),
        "one-omp1": _case([0], args.gb, args.folder, 1),
    }
    for path in Path(args.folder).glob("*.thaw"):
        path.unlink()
    rows = [
        [name, r["rank"], r["seconds"], r["gbps"], r["route"], r["cpus"], r["torch_threads"]]
        for name, results in cases.items()
        for r in results
    ]
    print_table(["case", "rank", "seconds", "GB/s", "route", "cpus", "torch threads"], rows)
    data = {"benchmark": "gpu_tp_restore", "machine": machine(), "gb_per_rank": args.gb, "cases": cases}
    out = args.out or Path("benchmarks/results/gpu_tp_restore.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str))
    print(out)


if __name__ == "__main__":
    main()
