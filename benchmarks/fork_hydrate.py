"""Fork and hydrate vs re-prefill, in a fresh engine, by prefix length.

For each prefix length (default 256 / 1,000 / 4,000 tokens) a parent engine forks the prefix
and saves it to shared memory and to a file; then a fresh engine process (nothing cached)
measures the time to first token of prefix + a short suffix five ways:

  re-prefill   the engine computes the whole prompt
  cache hit    the prefix already sits in the engine's own prefix cache (the floor)
  shm          ``with_fork``: the request loads the prefix from the snapshot in /dev/shm
  shm, engine-checked   the same with ``ForkHandle.load(verify=False)``: no up-front pass over
               every checksum (the engine still checks each block as it reads it)
  file         the same from a file on disk, evicted from the page cache first (cold read)
  hydrate      ``hydrate()`` from /dev/shm (costs no engine step), then a plain request, which
               loads the prefix inside its own step

The fresh engine's snapshot store (``THAW_AGENTS_STORE``) is ``--store shm`` (default: a folder in
/dev/shm, as a deployment that hands snapshots over through shared memory sets it, so the shm
snapshot is hard-linked into it and the cold file is read once into it) or ``--store disk`` (the
default store under ~/.cache, so the shm snapshot is copied to disk and the file is linked).

Goals: shm <= 1.3x and file <= 1.6x the cache hit; hydrate <= 1.1x with_fork. The modes
alternate within each of --repeats rounds (order reversed every other round); ratios are
medians of per-round ratios, so machine load hits every mode alike. ``--profile`` adds the
top functions of one with_fork request by cumulative time. Prints a table and writes JSON
(``--out FILE``, else benchmarks/results/fork_hydrate-<machine>-<date>.json).

Run: python benchmarks/fork_hydrate.py [--lengths 256 1000 4000] [--quick] [--profile] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, trunk_tokens, write_results

SUFFIX = " Question: which item above matters most, and why?"


def _parent(args: argparse.Namespace, scratch: Path) -> dict:
    import thaw_agents

    llm = thaw_agents.make_llm(args.model, max_model_len=args.max_model_len)
    tok = llm.get_tokenizer()
    out = {}
    for length in args.lengths:
        ids = trunk_tokens(tok, length)
        start = time.perf_counter()
        handle = thaw_agents.fork(llm, ids)
        fork_s = time.perf_counter() - start
        shm = Path("/dev/shm") / f"thaw-bench-{os.getpid()}-{length}.thaw"
        start = time.perf_counter()
        handle.save(shm)
        save_shm_s = time.perf_counter() - start
        disk = scratch / f"prefix-{length}.thaw"
        start = time.perf_counter()
        handle.save(disk)
        save_file_s = time.perf_counter() - start
        out[str(length)] = {
            "token_ids": ids,
            "suffix": tok.encode(SUFFIX, add_special_tokens=False),
            "shm": str(shm),
            "file": str(disk),
            "snapshot_nbytes": handle.nbytes,
            "snapshot_tokens": handle.num_snapshot_tokens,
            "fork_s": fork_s,
            "save_shm_s": save_shm_s,
            "save_file_s": save_file_s,
        }
    return out


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


MODES = ("re-prefill", "cache hit", "shm", "shm, engine-checked", "file", "hydrate")
LOADS = ("shm", "shm, engine-checked", "file", "hydrate")


def _child(args: argparse.Namespace, cases: dict) -> dict:
    from vllm import SamplingParams

    import thaw_agents
    from thaw_agents.front import Request, front_for

    llm = thaw_agents.make_llm(args.model, max_model_len=args.max_model_len)
    front = front_for(llm)
    one = SamplingParams(max_tokens=1, temperature=0)
    # Warm the engine (first request pays one-time costs) on an unrelated prompt.
    front.generate([Request(token_ids=list(range(1000, 1100)), params=one)], stream=False)

    def measure(mode: str, case: dict) -> tuple[float, float, int]:
        """(TTFT of prefix + suffix from the start of the mode's own work, load time, cached)."""
        prompt = case["token_ids"] + case["suffix"]
        llm.reset_prefix_cache()
        params, load = one, 0.0
        if mode == "cache hit":  # the prefix sits in this engine's own prefix cache already
            front.generate([Request(token_ids=case["token_ids"], params=one)], stream=False)
        if mode == "file":
            _evict(case["file"])
        start = time.perf_counter()
        if mode in LOADS:
            source = case["file" if mode == "file" else "shm"]
            handle = thaw_agents.ForkHandle.load(source, verify=mode != "shm, engine-checked")
            load = time.perf_counter() - start
            if mode == "hydrate":
                handle.hydrate(llm)  # then a plain request, served from the prefix cache
            else:
                params = thaw_agents.with_fork(one, handle)
        (out,) = front.generate([Request(token_ids=prompt, params=params)], stream=False)
        return time.perf_counter() - start, load, out.num_cached_tokens

    results = {}
    for length, case in cases.items():
        runs: dict[str, list[tuple[float, float, int]]] = {m: [] for m in MODES}
        for r in range(args.repeats):  # modes alternate within each round, order reversed every other
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                runs[mode].append(measure(mode, case))
        if args.profile:
            results[f"profile-{length}"] = _profile(lambda case=case: measure("shm", case))
        results[length] = {
            mode: {
                "ttft_s": statistics.median(t for t, _, _ in rows),
                "ttft_all_s": [t for t, _, _ in rows],
                "load_s": statistics.median(x for _, x, _ in rows),
                "cached_tokens": min(c for _, _, c in rows),
            }
            for mode, rows in runs.items()
        }
    return results


def _profile(run: Any) -> list[dict[str, Any]]:
    """Where one with_fork request spends its time: the top functions by cumulative time
    (the engine runs in this process, so the scheduler's and the worker's work shows)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, calls, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "thaw_agents" in path or "vllm/v1/core" in path or "vllm/v1/engine" in path:
            rows.append(
                {"function": f"{Path(path).name}:{line}:{name}", "calls": calls, "cum_ms": cumulative * 1e3}
            )
    return sorted(rows, key=lambda r: -r["cum_ms"])[:30]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1000, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="lengths 256 and 4000, 3 repeats")
    parser.add_argument("--profile", action="store_true", help="profile one with_fork request per length")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--store", choices=["shm", "disk"], default="shm", help="where the fresh engine's snapshot store is"
    )
    parser.add_argument("--role", choices=["parent", "child"], help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats = [256, 4000], 3
    if args.role == "parent":
        args.io.write_text(json.dumps(_parent(args, args.io.parent)))
        return
    if args.role == "child":
        if args.profile:  # the engine core in this process, so the profile sees its scheduler and worker
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cases = json.loads(args.io.read_text())
        args.io.with_suffix(".out").write_text(json.dumps(_child(args, cases)))
        return

    scratch = Path(
        tempfile.mkdtemp(
            prefix="thaw-bench-",
            dir=Path(__file__).parent / "scratch" if (Path(__file__).parent / "scratch").exists() else None,
        )
    )
    io = scratch / "cases.json"
    common = [
        sys.executable,
        __file__,
        "--io",
        str(io),
        "--max-model-len",
        str(args.max_model_len),
        "--repeats",
        str(args.repeats),
        "--lengths",
        *map(str, args.lengths),
        *(["--profile"] if args.profile else []),
    ]
    if args.model:
        common += ["--model", args.model]
    try:
        subprocess.run([*common, "--role", "parent"], check=True)
        cases = json.loads(io.read_text())
        child_env = dict(os.environ)
        if args.store == "shm":
            child_env["THAW_AGENTS_STORE"] = tempfile.mkdtemp(prefix="thaw-bench-store-", dir="/dev/shm")
        try:
            subprocess.run([*common, "--role", "child"], check=True, env=child_env)
        finally:
            if args.store == "shm":
                shutil.rmtree(child_env["THAW_AGENTS_STORE"], ignore_errors=True)
        measured = json.loads(io.with_suffix(".out").read_text())
    finally:
        for case in json.loads(io.read_text()).values() if io.exists() else []:
            Path(case["shm"]).unlink(missing_ok=True)
    rows, report, goals = [], [], []
    for length in map(str, args.lengths):
        case, got = cases[length], measured[length]

        def ratio(mode: str, base: str, got: dict = got) -> float:
            """Median over rounds of the per-round ratio (same round, same machine load)."""
            pairs = zip(got[mode]["ttft_all_s"], got[base]["ttft_all_s"], strict=True)
            return statistics.median(a / b for a, b in pairs)

        for mode in MODES:
            m = got[mode]
            save_s = {"file": case["save_file_s"]}.get(mode, case["save_shm_s"] if "shm" in mode else 0.0)
            loads = mode in LOADS
            entry = {
                "prefix_tokens": int(length),
                "mode": mode,
                "ttft_ms": m["ttft_s"] * 1e3,
                "ttft_all_ms": [t * 1e3 for t in m["ttft_all_s"]],
                "ratio_to_reprefill": ratio(mode, "re-prefill"),
                "ratio_to_cache_hit": ratio(mode, "cache hit"),
                "cached_tokens": m["cached_tokens"],
                "snapshot_bytes": case["snapshot_nbytes"] if loads else 0,
                "save_ms": save_s * 1e3,
                "load_ms": m["load_s"] * 1e3,
                "fork_ms": case["fork_s"] * 1e3,
            }
            if mode == "hydrate":
                entry["ratio_to_with_fork"] = ratio("hydrate", "shm")
            report.append(entry)
            rows.append(
                [
                    length,
                    mode,
                    entry["ttft_ms"],
                    entry["ratio_to_reprefill"],
                    entry["ratio_to_cache_hit"],
                    entry["cached_tokens"],
                    entry["snapshot_bytes"] / 1e6,
                    entry["save_ms"],
                    entry["load_ms"],
                ]
            )
        for name, value, goal in (
            ("shm / cache hit", ratio("shm", "cache hit"), 1.3),
            ("shm, engine-checked / cache hit", ratio("shm, engine-checked", "cache hit"), 1.3),
            ("cold file / cache hit", ratio("file", "cache hit"), 1.6),
            ("hydrate()+request / with_fork", ratio("hydrate", "shm"), 1.1),
        ):
            goals.append({"prefix_tokens": int(length), "ratio": name, "value": value, "goal": goal})
    print()
    print_table(
        [
            "prefix",
            "mode",
            "TTFT ms",
            "x re-prefill",
            "x cache hit",
            "cached",
            "snapshot MB",
            "save ms",
            "load ms",
        ],
        rows,
    )
    for g in goals:
        met = "met" if g["value"] <= g["goal"] else "NOT met"
        print(f"{g['prefix_tokens']:>6} {g['ratio']}: {g['value']:.3f} (goal <= {g['goal']}: {met})")
    for key, top in measured.items():
        if key.startswith("profile-"):
            print(f"\n{key} (one shm with_fork request; cumulative ms)")
            for row in top[:15]:
                print(f"  {row['cum_ms']:9.2f}  {row['calls']:6d}  {row['function']}")
    path = write_results(
        "fork_hydrate",
        {
            "benchmark": "fork_hydrate",
            "parameters": vars(args) | {"out": str(args.out), "io": None},
            "cases": report,
            "goals": goals,
            "profiles": {k: v for k, v in measured.items() if k.startswith("profile-")},
            "store": args.store,
            "notes": "TTFT = wall time of a max_tokens=1 request for prefix + suffix in a fresh engine "
            "(prefix cache reset each run), from the start of the mode's own work: shm/file (with_fork) "
            "and hydrate include ForkHandle.load (header + checksum validation), hydrate includes "
            "hydrate(); cache hit = the prefix already in this engine's prefix cache; file runs evict "
            "the snapshot from the page cache first. Modes alternate within each round; ratios are "
            "medians of per-round ratios.",
        },
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
