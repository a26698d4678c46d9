"""Placement: a fork round with placement="parent", "pool" and "auto", by branch count.

One parent engine with --max-num-seqs batch slots, and ForkPool(workers=--workers) with the
same engine arguments. For each branch count in --branches, --rounds rounds after one warm-up
round; in every round the three placements run one after the other (their order rotates from
round to round), each on a new conversation: a --trunk-tokens trunk and one short question per
branch, --max-tokens greedy tokens each (ignore_eos). Branch counts above --max-num-seqs do not
fit the parent's batch, so "auto" should pick the pool there and the parent below. The pool's
workers stay up (idle) while the parent runs, as beside a user's auto round.

Per branch count: the median round time of each placement, what "auto" chose (and its reason),
and auto's time over the better placement's (the one with the smaller median), taken round by
round and then the median: the goal is <= 1.05 ("auto is never worse than the better of the two
by more than 5%").

Prints a table and writes benchmarks/results/placement-<machine>-<date>.json (or --out).

Run: .venv/bin/python benchmarks/placement.py [--quick] [--branches 2,4,8,16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, trunk_tokens, write_results

PLACEMENTS = ("parent", "pool", "auto")
GOAL = 1.05


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_model_len": args.max_model_len,
        "kv_cache_memory_bytes": args.kv_cache_mib << 20,
        "max_num_seqs": args.max_num_seqs,
        "seed": 0,
    }


def _round(llm: Any, pool: Any, args: argparse.Namespace, count: int, placement: str, salt: int) -> dict:
    from vllm import SamplingParams

    import thaw_agents

    tok = llm.get_tokenizer()
    trunk = trunk_tokens(tok, args.trunk_tokens, salt=salt)
    prompts = [
        trunk + tok.encode(f" Question {i}: what is the biggest risk in item {i}?", add_special_tokens=False)
        for i in range(count)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = thaw_agents.fork_completions(llm, prompts, params, pool, placement=placement)
    wall = time.perf_counter() - start
    return {
        "round_s": wall,
        "placements": sorted({r.placement for r in results}),
        "reason": results[0].reason,
        "tokens": min(len(r.token_ids) for r in results),
    }


def _case(llm: Any, pool: Any, args: argparse.Namespace, count: int, salt: int) -> dict[str, Any]:
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds + 1):  # round 0 warms each placement up and is dropped
        order = PLACEMENTS[r % 3 :] + PLACEMENTS[: r % 3]
        done = {p: _round(llm, pool, args, count, p, salt + 10 * r + i) for i, p in enumerate(order)}
        if r:
            rounds.append(done)
    median = {p: statistics.median(x[p]["round_s"] for x in rounds) for p in PLACEMENTS}
    better = min(("parent", "pool"), key=median.__getitem__)
    ratio = statistics.median(x["auto"]["round_s"] / x[better]["round_s"] for x in rounds)
    chosen = sorted({where for x in rounds for where in x["auto"]["placements"]})
    return {
        "branches": count,
        "round_s": median,
        "better": better,
        "auto_chose": "+".join(chosen),
        "auto_reason": rounds[-1]["auto"]["reason"],
        "auto_vs_better": ratio,
        "passed": ratio <= GOAL,
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", default="2,4,8,16", help="branch counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trunk-tokens", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="the parent's (and workers') batch slots")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short check that it runs: branches 2,6, 4 slots, 1 round, 256-token trunk, 8 tokens",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.branches, args.max_num_seqs, args.rounds = "2,6", 4, 1
        args.trunk_tokens, args.max_tokens = 256, 8
    counts = [int(c) for c in args.branches.split(",")]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import thaw_agents

    llm = thaw_agents.make_llm(args.model, **_overrides(args))
    start = time.perf_counter()
    with thaw_agents.ForkPool(
        args.model, workers=args.workers, transport=args.transport, progress=False, **_overrides(args)
    ) as pool:
        boot_s = time.perf_counter() - start
        cases = [_case(llm, pool, args, count, salt=1000 * (i + 1)) for i, count in enumerate(counts)]
        transport = pool.transport

    print()
    print_table(
        ["branches", "parent s", "pool s", "auto s", "auto chose", "better", "auto / better", f"<= {GOAL}"],
        [
            [
                c["branches"],
                c["round_s"]["parent"],
                c["round_s"]["pool"],
                c["round_s"]["auto"],
                c["auto_chose"],
                c["better"],
                c["auto_vs_better"],
                "pass" if c["passed"] else "FAIL",
            ]
            for c in cases
        ],
    )
    for c in cases:
        print(f"  {c['branches']} branches, auto: {c['auto_reason']}")
    path = write_results(
        "placement",
        {
            "benchmark": "placement",
            "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            | {"transport": transport},
            "goal": f"auto's round time <= {GOAL} x the better of parent and pool",
            "passed": all(c["passed"] for c in cases),
            "cases": cases,
            "pool_boot_s": boot_s,
            "notes": "Round times are medians over rounds; auto / better is the median of per-round ratios "
            "against the placement with the smaller median. 'worker' in auto_chose means the pool. "
            "Every round is a new trunk; the parent and the workers share this host's cores on CPU.",
        },
        args.out,
    )
    print(f"\npool boot {boot_s:.1f} s ({args.workers} workers, transport {transport}); wrote {path}")


if __name__ == "__main__":
    main()
