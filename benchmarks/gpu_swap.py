"""``swap_weights`` on a GPU engine with CUDA graphs: correctness and the restore's share of it.

Roles, each in a fresh process:

  swap   an engine (CUDA graphs on) fills dummy weights and freezes them (file A); a second file
         (B) is A with every matrix's rows rolled by one (other weights, same shapes and
         fingerprint). Greedy output on A; ``swap_weights`` to B (timed: restore in the worker,
         vLLM's post-load processing, total); greedy on B; swap back to A: greedy equal to the
         first. Then B restored by the same pipeline into standalone GPU tensors (the floor).
  fresh  a new engine started on B (``load_format="thaw"``, CUDA graphs on): greedy equal to the
         swapped engine's on B, so the swap left no stale state behind (captured graphs included).

Prints a table and writes JSON (``--out``).

Run: python benchmarks/gpu_swap.py --model DIR --out FILE [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, run_role, serve_role
from gpu_engine import greedy, shutdown, ttft

HERE = Path(__file__).resolve()
PROMPT = "Write three short sentences about a lighthouse keeper and the sea."


def _engine(args: argparse.Namespace, **more: Any) -> Any:
    import thaw_agents

    kw: dict[str, Any] = {"max_model_len": 4096, "seed": 0, "gpu_memory_utilization": args.gpu_mem}
    kw.update(more)
    return thaw_agents.make_llm(args.model, **kw)


def _greedy(llm: Any) -> list[int]:
    return list(ttft(llm, llm.get_tokenizer().encode(PROMPT), greedy())[1].outputs[0].token_ids)


def _rolled_copy(src: str, dest: str) -> None:
    """``src``'s tensors with every matrix's rows rolled by one, frozen to ``dest``."""
    import torch

    from thaw_agents.weights import freeze_tensors, read_weights_manifest, restore_tensors

    manifest = read_weights_manifest(src)
    tensors = [
        (t.name, torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="cuda")) for t in manifest.tensors
    ]
    restore_tensors(src, tensors)
    for _, t in tensors:
        if t.dim() == 2:
            t.copy_(t.roll(1, dims=0))
    freeze_tensors(
        dest, tensors, model_name=manifest.model_name, model_fingerprint=manifest.model_fingerprint
    )
    del tensors
    torch.cuda.empty_cache()


def role_swap(args: argparse.Namespace, job: dict) -> dict:
    import torch

    import thaw_agents
    from thaw_agents.weights import read_weights_manifest, restore_tensors

    a, b = job["a"], job["b"]
    llm = _engine(
        args, load_format="thaw", model_loader_extra_config={"freeze_to": a, "load_format": "dummy"}
    )
    try:
        first = _greedy(llm)
        _rolled_copy(a, b)
        swaps = []
        for _ in range(args.repeats):
            to_b = thaw_agents.swap_weights(llm, b)
            on_b = _greedy(llm)
            to_a = thaw_agents.swap_weights(llm, a)
            on_a = _greedy(llm)
            swaps.append({"to_b": to_b, "to_a": to_a, "on_b": on_b, "back_equal": on_a == first})
        manifest = read_weights_manifest(b)
        targets = [
            (t.name, torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="cuda"))
            for t in manifest.tensors
        ]
        floor = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            restore_tensors(b, targets)
            torch.cuda.synchronize()
            floor.append(time.perf_counter() - start)
        return {
            "first": first,
            "on_b": swaps[0]["on_b"],
            "b_differs": swaps[0]["on_b"] != first,
            "on_b_stable": all(s["on_b"] == swaps[0]["on_b"] for s in swaps),
            "back_equal": all(s["back_equal"] for s in swaps),
            "nbytes": manifest.nbytes,
            "swap_restore_s": [s["to_b"].restore_s for s in swaps],
            "swap_process_s": [s["to_b"].process_s for s in swaps],
            "swap_total_s": [s["to_b"].total_s for s in swaps],
            "swap_route": swaps[0]["to_b"].route,
            "restore_only_s": floor,
        }
    finally:
        shutdown(llm)


def role_fresh(args: argparse.Namespace, job: dict) -> dict:
    start = time.perf_counter()
    llm = _engine(args, load_format="thaw", model_loader_extra_config={"snapshot": job["b"]})
    try:
        start_s = time.perf_counter() - start
        return {"start_s": start_s, "on_b": _greedy(llm)}
    finally:
        shutdown(llm)


ROLES = {"swap": role_swap, "fresh": role_fresh}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-mem", type=float, default=0.45)
    parser.add_argument("--weights-dir", default="/dev/shm/thaw-swap-weights")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/gpu_swap.json"), help="JSON output file"
    )
    parser.add_argument("--role-timeout", type=float, default=600)
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = ["--model", args.model, "--repeats", str(args.repeats), "--gpu-mem", str(args.gpu_mem)]
    if args.role:
        serve_role(args, ROLES)
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    folder = Path(args.weights_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = Path(f"/tmp/thaw-swap-io-{os.getpid()}")
    scratch.mkdir(mode=0o700)
    job = {"a": str(folder / "a.thaw"), "b": str(folder / "b.thaw")}
    try:
        swap = run_role(HERE, "swap", job, scratch, args.passthrough, args.role_timeout)
        fresh = (
            run_role(HERE, "fresh", job, scratch, args.passthrough, args.role_timeout)
            if "on_b" in swap
            else {}
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    summary: dict[str, Any] = {"machine": machine(), "swap": swap, "fresh": fresh}
    if "on_b" in swap and "on_b" in fresh:
        summary["fresh_equal"] = fresh["on_b"] == swap["on_b"]
        restore = statistics.median(swap["swap_restore_s"])
        floor = statistics.median(swap["restore_only_s"])
        summary["swap_restore_over_restore_only"] = restore / floor
        print_table(
            ["case (median)", "seconds"],
            [
                ["swap_weights total", statistics.median(swap["swap_total_s"])],
                ["restore in the worker", restore],
                ["vLLM post-load processing", statistics.median(swap["swap_process_s"])],
                ["restore only (same pipeline)", floor],
                ["fresh engine on B, start", fresh["start_s"]],
            ],
        )
        print(
            f"B differs from A: {swap['b_differs']}; fresh engine on B == swapped: {summary['fresh_equal']}; "
            f"swap back == first: {swap['back_equal']}; restore/restore only {restore / floor:.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str))
    print(args.out)


if __name__ == "__main__":
    main()
