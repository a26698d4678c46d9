"""How fork's costs grow: with the trunk's length, and with the number of branches.

Trunk length (256 doubling up to the model's context limit), in one engine, --repeats rounds,
the steps of a round back to back (so load hits them alike):

  fork        ``fork()``: the trunk's prefill and the snapshot's write (prefix cache reset first)
  save        ``ForkHandle.save`` to /dev/shm, and the snapshot's size
  load        ``ForkHandle.load`` from there (headers, checksums, into the store)
  TTFT        trunk + a short question, max_tokens=1, three ways: re-prefill (cache reset),
              cache hit (the trunk already in the prefix cache), with_fork (cache reset, the
              trunk loaded from the snapshot); ratios with_fork / re-prefill and / cache hit

Branch count (1 to 32, doubling), trunk --trunk-tokens, --branch-tokens greedy tokens each:
``fork_completions`` in the parent engine, and with a ``ForkPool`` (--workers local workers);
round time and the median per-branch TTFT, median over --repeats rounds.

Each curve's slope is the exponent k of a least-squares fit ``y ~ x^k`` (k = 1: linear). Prints
tables, writes JSON (``--out FILE``, else benchmarks/results/scale-<machine>-<date>.json) and a
PNG beside it. ``--quick``: lengths to 2,048, branches to 8, one repeat, no pool.

Run: python benchmarks/scale.py [--quick] [--max-len N] [--no-pool] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, trunk_tokens, write_results

QUESTION = " Question: which item above matters most, and why? Answer {n}:"


def slope(xs: list[float], ys: list[float]) -> float:
    """The exponent k of the least-squares fit y ~ x^k (on log-log axes)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den


def length_curve(llm: Any, lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    import thaw_agents
    from thaw_agents.front import Request, front_for

    front = front_for(llm)
    tok = llm.get_tokenizer()
    one = SamplingParams(max_tokens=1, temperature=0)

    def ttft(ids: list[int], params: Any = one) -> tuple[float, int]:
        start = time.perf_counter()
        (out,) = front.generate([Request(token_ids=ids, params=params)], stream=False)
        return time.perf_counter() - start, out.num_cached_tokens

    rows = []
    for length in lengths:
        runs: dict[str, list[float]] = {}
        for r in range(repeats):
            trunk = trunk_tokens(tok, length, salt=r)
            q = [tok.encode(QUESTION.format(n=i), add_special_tokens=False) for i in range(3)]
            llm.reset_prefix_cache()
            runs.setdefault("re-prefill", []).append(ttft(trunk + q[0])[0])
            runs.setdefault("cache hit", []).append(ttft(trunk + q[1])[0])  # the trunk is cached now
            llm.reset_prefix_cache()
            start = time.perf_counter()
            handle = thaw_agents.fork(llm, trunk)
            runs.setdefault("fork", []).append(time.perf_counter() - start)
            shm = Path("/dev/shm") / f"thaw-scale-{os.getpid()}-{length}-{r}.thaw"
            try:
                start = time.perf_counter()
                handle.save(shm)
                runs.setdefault("save", []).append(time.perf_counter() - start)
                start = time.perf_counter()
                loaded = thaw_agents.ForkHandle.load(shm)
                runs.setdefault("load", []).append(time.perf_counter() - start)
            finally:
                shm.unlink(missing_ok=True)
            llm.reset_prefix_cache()
            took, cached = ttft(trunk + q[2], thaw_agents.with_fork(one, loaded))
            runs.setdefault("with_fork", []).append(took)
            assert cached >= loaded.num_snapshot_tokens - loaded.block_size, "the snapshot was not served"
            runs.setdefault("x re-prefill", []).append(took / runs["re-prefill"][-1])
            runs.setdefault("x cache hit", []).append(took / runs["cache hit"][-1])
            nbytes = handle.nbytes
            handle.delete()
        row = {"tokens": length, "snapshot_bytes": nbytes} | {
            k: statistics.median(v) for k, v in runs.items()
        }
        rows.append(row)
        print(
            f"length {length}: with_fork {row['with_fork'] * 1e3:.0f} ms, {row['x cache hit']:.2f}x hit",
            flush=True,
        )
    return rows


def branch_curve(llm: Any, pool: Any, counts: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    import thaw_agents

    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=args.branch_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    salt = 1000
    for where, target in (("parent", None), ("pool", pool)):
        if where == "pool" and pool is None:
            continue
        for count in counts:
            rounds, ttfts = [], []
            for r in range(args.repeats + 1):  # round 0 warms up and is dropped
                salt += 1
                trunk = trunk_tokens(tok, args.trunk_tokens, salt=salt)
                prompts = [
                    trunk + tok.encode(QUESTION.format(n=i), add_special_tokens=False) for i in range(count)
                ]
                start = time.perf_counter()
                results = thaw_agents.fork_completions(
                    llm, prompts, params, target, placement="pool" if target else "parent"
                )
                if r:
                    rounds.append(time.perf_counter() - start)
                    ttfts += [x.timings.ttft_s for x in results if x.timings.ttft_s is not None]
            row = {"where": where, "branches": count, "round_s": statistics.median(rounds)}
            row["ttft_s"] = statistics.median(ttfts) if ttfts else float("nan")
            rows.append(row)
            print(f"{where} {count} branches: round {row['round_s']:.2f} s", flush=True)
    return rows


def _plot(path: Path, lengths: list[dict[str, Any]], branches: list[dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        print("matplotlib is not installed (pip install 'thaw-agents[dev]'): no PNG")
        return None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    xs = [r["tokens"] for r in lengths]
    panels = [
        (
            axes[0][0],
            "time (s)",
            [("fork (prefill + write)", "fork"), ("save to shm", "save"), ("load", "load")],
        ),
        (
            axes[0][1],
            "TTFT (s)",
            [("re-prefill", "re-prefill"), ("cache hit", "cache hit"), ("with_fork", "with_fork")],
        ),
        (
            axes[0][2],
            "with_fork TTFT ratio",
            [("/ re-prefill", "x re-prefill"), ("/ cache hit", "x cache hit")],
        ),
    ]
    for ax, label, series in panels:
        for name, key in series:
            ax.plot(xs, [r[key] for r in lengths], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="trunk tokens", ylabel=label)
        ax.legend()
    ax = axes[1][0]
    ax.plot(xs, [r["snapshot_bytes"] / 1e6 for r in lengths], marker="o")
    ax.set(xscale="log", yscale="log", xlabel="trunk tokens", ylabel="snapshot MB")
    for ax, key, label in (
        (axes[1][1], "round_s", "round time (s)"),
        (axes[1][2], "ttft_s", "per-branch TTFT (s)"),
    ):
        for where in ("parent", "pool"):
            pts = [r for r in branches if r["where"] == where]
            if pts:
                ax.plot([r["branches"] for r in pts], [r[key] for r in pts], marker="o", label=where)
        ax.set(xscale="log", yscale="log", xlabel="branches", ylabel=label)
        ax.legend()
    for ax in axes.flat:  # doubling steps: base-2 axes with plain numbers
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-len", type=int, default=None, help="longest trunk (default: the model's limit)"
    )
    parser.add_argument("--max-branches", type=int, default=32)
    parser.add_argument("--trunk-tokens", type=int, default=1000)
    parser.add_argument("--branch-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-pool", action="store_true")
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--quick", action="store_true", help="lengths to 2,048, branches to 8, 1 repeat, no pool"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON output file (the PNG goes beside it)")
    args = parser.parse_args()
    if args.quick:
        args.max_len, args.max_branches, args.repeats, args.no_pool = 2048, 8, 1, True

    import thaw_agents
    from thaw_agents.models import resolve_model

    model = resolve_model(args.model)
    limit = args.max_len
    suffix_room = 64
    overrides: dict[str, Any] = {"seed": 0}
    llm = thaw_agents.make_llm(model, **overrides)
    context = llm.llm_engine.model_config.max_model_len
    if limit is None or limit + suffix_room > context:
        limit = context - suffix_room
    lengths = []
    length = 256
    while length < limit:
        lengths.append(length)
        length *= 2
    lengths.append(limit)
    counts = [c for c in (1, 2, 4, 8, 16, 32) if c <= args.max_branches]
    pool = None
    try:
        length_rows = length_curve(llm, lengths, args.repeats)
        if not args.no_pool:
            pool = thaw_agents.ForkPool(model, workers=args.workers, progress=False, **overrides).start()
        branch_rows = branch_curve(llm, pool, counts, args)
    finally:
        if pool is not None:
            pool.close()
        llm.llm_engine.engine_core.shutdown()

    xs = [r["tokens"] for r in length_rows]
    slopes = {
        f"{key} vs trunk tokens": slope(xs, [r[key] for r in length_rows])
        for key in (
            "fork",
            "save",
            "load",
            "snapshot_bytes",
            "re-prefill",
            "cache hit",
            "with_fork",
            "x cache hit",
        )
    }
    for where in ("parent", "pool"):
        pts = [r for r in branch_rows if r["where"] == where]
        if pts:
            for key in ("round_s", "ttft_s"):
                slopes[f"{where} {key} vs branches"] = slope(
                    [r["branches"] for r in pts], [r[key] for r in pts]
                )
    print()
    keys = ["fork", "save", "load", "re-prefill", "cache hit", "with_fork"]
    print_table(
        ["tokens", "MB", *[f"{k} ms" for k in keys], "x re-prefill", "x cache hit"],
        [
            [
                r["tokens"],
                r["snapshot_bytes"] / 1e6,
                *[r[k] * 1e3 for k in keys],
                r["x re-prefill"],
                r["x cache hit"],
            ]
            for r in length_rows
        ],
    )
    print()
    print_table(
        ["where", "branches", "round s", "TTFT ms"],
        [[r["where"], r["branches"], r["round_s"], r["ttft_s"] * 1e3] for r in branch_rows],
    )
    print("\nslopes (k in y ~ x^k; 1 = linear):")
    for name, k in slopes.items():
        print(f"  {name}: {k:.2f}")
    path = write_results(
        "scale",
        {
            "benchmark": "scale",
            "parameters": vars(args) | {"out": None, "lengths": lengths, "branch_counts": counts},
            "lengths": length_rows,
            "branches": branch_rows,
            "slopes": slopes,
            "notes": "Medians over repeats; per length the steps run back to back in one engine (ratios "
            "within a round). Slopes: least-squares exponent on log-log axes.",
        },
        args.out,
    )
    png = _plot(path.with_suffix(".png"), length_rows, branch_rows)
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
