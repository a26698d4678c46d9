"""Weights into a running engine (``swap_weights``) vs starting an engine on them.

Cases, each engine in its own process (an in-process engine owns process-wide state), the
baseline first:

  fresh auto    a new engine from the model's checkpoint (load_format="auto"): construction
                to the first generated token (``import vllm`` done before the clock starts)
  fresh thaw    the same with load_format="thaw" from the weights file
  swap          ``swap_weights`` into a running engine, alternating two weights files (the
                model's and a perturbed copy, as an RL step makes); ``restore`` is the part in
                the worker (verified restore + vLLM's post-load processing), ``total`` adds the
                prefix-cache reset and the one-token step that tells the scheduler the new
                fingerprint (on CPU its first forward builds the GEMM kernels
                of the repacked weights, as a fresh engine's first request does)
  restore only  the same files restored into standalone tensors by the same pipeline: the
                floor a swap is compared with (goal: swap <= restore only + 10%)
  vllm reload   vLLM's own ``reload_weights`` from the checkpoint folder, where it works

Timings on a shared CPU machine are noisy: compare the ratios (same run), not the seconds.
Prints a table and writes benchmarks/results/swap-<machine>-<date>.json (or --out FILE).

Run: .venv/bin/python benchmarks/swap.py [--model PATH] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

SETTINGS: dict[str, Any] = {"max_model_len": 1024, "seed": 0}


def _first_token(llm: Any) -> None:
    from vllm import SamplingParams, TokensPrompt

    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=1), use_tqdm=False)


def _shutdown(llm: Any) -> None:
    import contextlib

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def case_prepare(model: str, scratch: Path, repeats: int) -> dict[str, Any]:
    """The model's weights file and a perturbed copy (what one RL step would produce)."""
    import torch

    from thaw_agents.weights import freeze_model, freeze_tensors, read_weights_manifest, restore_tensors

    a, b = scratch / "a.thaw", scratch / "b.thaw"
    freeze_model(model, a)
    manifest = read_weights_manifest(a)
    tensors = {e.name: torch.empty(e.shape, dtype=getattr(torch, e.dtype)) for e in manifest.tensors}
    restore_tensors(a, tensors)
    generator = torch.Generator().manual_seed(0)
    for tensor in tensors.values():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor.add_((noise * 1e-3).to(tensor.dtype))
    freeze_tensors(b, tensors, model_name="perturbed", model_fingerprint=manifest.model_fingerprint)
    return {"nbytes": manifest.nbytes, "num_tensors": len(manifest.tensors)}


def case_fresh(model: str, scratch: Path, repeats: int, load_format: str) -> dict[str, Any]:
    import vllm  # noqa: F401  (imported before the clock starts)

    import thaw_agents

    kwargs: dict[str, Any] = dict(SETTINGS)
    if load_format == "thaw":
        kwargs.update(load_format="thaw", model_loader_extra_config={"snapshot": str(scratch / "a.thaw")})
    start = time.perf_counter()
    llm = thaw_agents.make_llm(model, **kwargs)
    _first_token(llm)
    seconds = time.perf_counter() - start
    _shutdown(llm)
    return {"seconds": seconds}


def case_swap(model: str, scratch: Path, repeats: int) -> dict[str, Any]:
    import torch

    import thaw_agents
    from thaw_agents.weights import read_weights_manifest, restore_tensors

    llm = thaw_agents.make_llm(model, **SETTINGS)
    _first_token(llm)
    files = [scratch / "b.thaw", scratch / "a.thaw"]
    totals, restores, processes, floors = [], [], [], []
    thaw_agents.swap_weights(llm, files[1])  # warm-up: page cache, first-call costs
    for i in range(2 * repeats):
        result = thaw_agents.swap_weights(llm, files[i % 2])
        totals.append(result.total_s)
        restores.append(result.restore_s)
        processes.append(result.process_s)
    manifest = read_weights_manifest(files[0])
    targets = {e.name: torch.empty(e.shape, dtype=getattr(torch, e.dtype)) for e in manifest.tensors}
    restore_tensors(files[0], targets)
    for i in range(2 * repeats):
        floors.append(restore_tensors(files[i % 2], targets).seconds)
    out: dict[str, Any] = {
        "swap_total_s": statistics.median(totals),
        "swap_restore_s": statistics.median(restores),
        "swap_process_s": statistics.median(processes),
        "restore_only_s": statistics.median(floors),
        "runs": {
            "swap_total_s": totals,
            "swap_restore_s": restores,
            "swap_process_s": processes,
            "restore_only_s": floors,
        },
    }
    reloads = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            llm.collective_rpc("reload_weights", kwargs={"weights_path": model, "is_checkpoint_format": True})
            llm.reset_prefix_cache()
            reloads.append(time.perf_counter() - start)
        out["vllm_reload_s"] = statistics.median(reloads)
    except Exception as exc:  # not every vLLM build or model supports it
        out["vllm_reload_error"] = f"{type(exc).__name__}: {exc}"[:300]
    _shutdown(llm)
    return out


CASES = {
    "prepare": case_prepare,
    "fresh-auto": lambda m, s, r: case_fresh(m, s, r, "auto"),
    "fresh-thaw": lambda m, s, r: case_fresh(m, s, r, "thaw"),
    "swap": case_swap,
}


def _child(case: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--case", case, "--model", args.model, "--scratch", str(scratch)]
    argv += ["--repeats", str(args.repeats)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: the default model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from thaw_agents.models import default_model

        args.model = str(default_model())
    if args.case:
        print(json.dumps(CASES[args.case](args.model, args.scratch, args.repeats)))
        return
    with tempfile.TemporaryDirectory(prefix="thaw-swap-bench-") as tmp:
        scratch = Path(tmp)
        results = {case: _child(case, args, scratch) for case in CASES}
    auto = results["fresh-auto"]["seconds"]
    swap = results["swap"]
    rows = [
        ["fresh engine, load_format=auto", auto, 1.0],
        [
            "fresh engine, load_format=thaw",
            results["fresh-thaw"]["seconds"],
            results["fresh-thaw"]["seconds"] / auto,
        ],
        ["swap_weights (total)", swap["swap_total_s"], swap["swap_total_s"] / auto],
        ["  restore in the worker", swap["swap_restore_s"], swap["swap_restore_s"] / auto],
        ["  vLLM post-load processing", swap["swap_process_s"], swap["swap_process_s"] / auto],
        ["restore only (same pipeline)", swap["restore_only_s"], swap["restore_only_s"] / auto],
    ]
    if "vllm_reload_s" in swap:
        rows.append(["vLLM reload_weights (checkpoint)", swap["vllm_reload_s"], swap["vllm_reload_s"] / auto])
    print_table(["case (median)", "seconds", "vs fresh auto"], rows)
    overhead = swap["swap_restore_s"] / swap["restore_only_s"]
    print(f"\nweights: {results['prepare']['nbytes']:,} bytes")
    print(f"swap's restore / restore only: {overhead:.2f} (goal <= 1.10)")
    print(f"swap total / restore only: {swap['swap_total_s'] / swap['restore_only_s']:.2f}")
    if "vllm_reload_error" in swap:
        print(f"vLLM reload_weights: {swap['vllm_reload_error']}")
    payload = {
        "parameters": {"model": args.model, "repeats": args.repeats, **SETTINGS},
        "results": results,
        "swap_restore_over_restore_only": overhead,
        "swap_total_over_restore_only": swap["swap_total_s"] / swap["restore_only_s"],
        "note": "CPU timings on a shared machine: compare ratios within one run",
    }
    print(write_results("swap", payload, args.out))


if __name__ == "__main__":
    main()
