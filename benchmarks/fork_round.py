"""Fork rounds: one trunk, several branches, three ways to run them.

Each round is a new conversation: a trunk of about --trunk-tokens tokens (different every
round) and --branches branches (the trunk plus a short question each), --max-tokens tokens
each (greedy, ignore_eos). --rounds rounds per mode, after one warm-up round:

  (a) re-prefill  one engine with prefix caching off: every branch computes the whole prompt
  (b) parent      fork_completions without a pool: the trunk runs once in the parent engine,
                  whose prefix cache then serves it to every branch (no copy)
  (c) pool        fork_completions with ForkPool(workers=--workers): the trunk runs once in the
                  parent, is snapshotted, shipped through shared memory, and each worker
                  hydrates it and runs its share of the branches

Per round: wall time. Per branch: TTFT (request entering its engine to first token), first
token since the round started (includes the trunk, snapshot, shipping and hydrate), tokens
served from cache or snapshot, and the KV bytes moved between processes.
(a) runs in its own process first; (b) and (c) share the parent engine. Each engine is built
with the same arguments (thaw's engine_kwargs, plus the overrides below).

Prints a table and writes benchmarks/results/fork_round-<machine>-<date>.json.

Run: .venv/bin/python benchmarks/fork_round.py [--rounds 5] [--branches 4] [--workers 2]
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

QUESTIONS = (
    " Question: what is the biggest risk in these orders?",
    " Question: which customer should we call first, and why?",
    " Question: summarise the refunds in two sentences.",
    " Question: what would you automate in this workflow?",
    " Question: which warehouse is the bottleneck?",
    " Question: list three follow-up tasks for the team.",
)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_model_len": args.max_model_len, "kv_cache_memory_bytes": args.kv_cache_mib << 20, "seed": 0}


def _trunk_ids(tokenizer: Any, round_index: int, length: int) -> list[int]:
    words = ("inventory", "shipment", "invoice", "warehouse", "customer", "order", "delay", "refund")
    lines = [f"Conversation {round_index}: operations log for region {round_index * 13 % 97}."]
    lines += [
        f"Item {i}: {words[(i + round_index) % len(words)]} {(i * 7 + round_index) % 1000}."
        for i in range(length)
    ]
    ids = tokenizer.encode(" ".join(lines))
    return ids[:length]


def _prompts(tokenizer: Any, args: argparse.Namespace, round_index: int) -> list[list[int]]:
    trunk = _trunk_ids(tokenizer, round_index, args.trunk_tokens)
    return [trunk + tokenizer.encode(q, add_special_tokens=False) for q in QUESTIONS[: args.branches]]


def _params(args: argparse.Namespace) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)


def _reprefill(args: argparse.Namespace) -> dict[str, Any]:
    """(a): a plain engine with the same arguments, prefix caching off (runs in its own process)."""
    from vllm import LLM

    import thaw_agents
    from thaw_agents.front import Request, front_for  # its step loop times each first token

    kwargs = thaw_agents.engine_kwargs(args.model, **_overrides(args))
    kwargs.pop("kv_transfer_config")
    kwargs.pop("worker_extension_cls")
    kwargs["enable_prefix_caching"] = False
    llm = LLM(**kwargs)
    front = front_for(llm)
    tok = llm.get_tokenizer()
    rounds = []
    for r in range(args.rounds + 1):  # round 0 warms the engine and is dropped
        prompts = _prompts(tok, args, r)
        start = time.perf_counter()
        results = front.generate([Request(token_ids=p, params=_params(args)) for p in prompts])
        wall = time.perf_counter() - start
        if r:
            rounds.append(
                {
                    "round_s": wall,
                    "branches": [
                        {
                            "ttft_s": x.ttft_s,
                            "first_token_s": x.ttft_s,
                            "cached": x.num_cached_tokens,
                            "prompt_tokens": x.num_prompt_tokens,
                            "tokens": len(x.completions[0].token_ids),
                        }
                        for x in results
                    ],
                    "bytes_moved": 0,
                }
            )
    return {"rounds": rounds}


def _fork_rounds(llm: Any, args: argparse.Namespace, pool: Any, offset: int) -> list[dict[str, Any]]:
    import thaw_agents

    tok = llm.get_tokenizer()
    rounds = []
    for r in range(args.rounds + 1):
        prompts = _prompts(tok, args, offset + r)
        start = time.perf_counter()
        placement = "pool" if pool else "parent"
        results = thaw_agents.fork_completions(llm, prompts, _params(args), pool, placement=placement)
        wall = time.perf_counter() - start
        if not r:
            continue
        read_by_worker = {x.worker: x.snapshot_nbytes for x in results if x.placement == "worker"}
        rounds.append(
            {
                "round_s": wall,
                "trunk_s": results[0].timings.trunk_s,
                "ship_s": results[0].timings.ship_s,
                "branches": [
                    {
                        "ttft_s": x.timings.ttft_s,
                        "first_token_s": x.timings.first_token_s,
                        "hydrate_s": x.timings.hydrate_s,
                        "cached": x.num_cached_tokens,
                        "worker": x.worker,
                        "prompt_tokens": x.num_prompt_tokens,
                        "tokens": len(x.token_ids),
                        "reason": x.reason,
                    }
                    for x in results
                ],
                # KV that crossed a process boundary: each worker read the whole trunk snapshot once.
                "bytes_moved": sum(read_by_worker.values()),
            }
        )
    return rounds


def _summary(name: str, rounds: list[dict[str, Any]], base_ttft: float | None) -> dict[str, Any]:
    branches = [b for r in rounds for b in r["branches"]]
    ttft = statistics.median(b["ttft_s"] for b in branches)
    return {
        "mode": name,
        "round_s": statistics.median(r["round_s"] for r in rounds),
        "ttft_s": ttft,
        "first_token_s": statistics.median(b["first_token_s"] for b in branches),
        "ttft_vs_reprefill": ttft / base_ttft if base_ttft else 1.0,
        "cached_tokens": min(b["cached"] for b in branches),
        "bytes_moved_per_round": statistics.median(r["bytes_moved"] for r in rounds),
        "tokens_per_branch": min(b["tokens"] for b in branches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--branches", type=int, default=4, choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trunk-tokens", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--role", choices=["reprefill"], help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.role == "reprefill":
        args.io.write_text(json.dumps(_reprefill(args)))
        return

    import thaw_agents

    io = Path(tempfile.mkdtemp(prefix="thaw-round-")) / "reprefill.json"
    command = [sys.executable, __file__, "--role", "reprefill", "--io", str(io)]
    for flag in ("rounds", "branches", "max_tokens", "trunk_tokens", "max_model_len", "kv_cache_mib"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.model:
        command += ["--model", args.model]
    subprocess.run(command, check=True)
    modes = {"re-prefill": json.loads(io.read_text())["rounds"]}

    llm = thaw_agents.make_llm(args.model, **_overrides(args))
    modes["parent"] = _fork_rounds(llm, args, None, offset=100)
    start = time.perf_counter()
    with thaw_agents.ForkPool(
        args.model, workers=args.workers, transport=args.transport, **_overrides(args)
    ) as pool:
        boot_s = time.perf_counter() - start
        modes["pool"] = _fork_rounds(llm, args, pool, offset=200)
        transport = pool.transport

    base = _summary("re-prefill", modes["re-prefill"], None)["ttft_s"]
    summaries = [_summary(name, rounds, base) for name, rounds in modes.items()]
    print()
    print_table(
        [
            "mode",
            "round s",
            "branch TTFT ms",
            "x re-prefill",
            "1st token since round start ms",
            "cached tokens",
            "KV moved MB/round",
        ],
        [
            [
                s["mode"],
                s["round_s"],
                s["ttft_s"] * 1e3,
                s["ttft_vs_reprefill"],
                s["first_token_s"] * 1e3,
                s["cached_tokens"],
                s["bytes_moved_per_round"] / 1e6,
            ]
            for s in summaries
        ],
    )
    path = write_results(
        "fork_round",
        {
            "benchmark": "fork_round",
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            | {"transport": transport, "io": None},
            "summary": summaries,
            "rounds": modes,
            "pool_boot_s": boot_s,
            "notes": "Medians over rounds (round time) and over all branches (TTFT). Branch TTFT counts from "
            "the request entering its engine; the first-token column from the start of the round "
            "(trunk prefill, snapshot write, shipping and hydrate included for the pool). Each round "
            "uses a new trunk. Pool workers are pinned to separate cores (VLLM_CPU_OMP_THREADS_BIND).",
        },
        args.out,
    )
    print(f"\npool boot {boot_s:.1f} s ({args.workers} workers, transport {transport}); wrote {path}")


if __name__ == "__main__":
    main()
