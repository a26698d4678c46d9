"""Fork and hydrate vs re-prefill, in a fresh engine, by prefix length.

For each prefix length (default 256 / 1,000 / 4,000 tokens) a parent engine forks the prefix
and saves it to shared memory and to a file; then a fresh engine process (nothing cached)
measures the time to first token of prefix + a short suffix three ways, baseline first:

  re-prefill   the engine computes the whole prompt
  shm          the request loads the prefix from the snapshot in /dev/shm
  file         the same from a file on disk, evicted from the page cache first (cold read)

Each case runs --repeats times (median reported); the prefix cache is reset between runs.
Prints a table and writes benchmarks/results/fork_hydrate-<machine>-<date>.json.

Run: .venv/bin/python benchmarks/fork_hydrate.py [--lengths 256 1000 4000] [--model PATH]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

SUFFIX = " Question: which item above matters most, and why?"


def _prefix_tokens(tokenizer, length: int) -> list[int]:
    words = ("inventory", "shipment", "invoice", "warehouse", "customer", "order", "delay", "refund")
    text = " ".join(f"Item {i}: {words[i % len(words)]} {i * 7 % 1000}." for i in range(length))
    ids = tokenizer.encode(text)
    assert len(ids) >= length, "the generated text is too short"
    return ids[:length]


def _parent(args: argparse.Namespace, scratch: Path) -> dict:
    import thaw_agents

    llm = thaw_agents.make_llm(args.model, max_model_len=args.max_model_len)
    tok = llm.get_tokenizer()
    out = {}
    for length in args.lengths:
        ids = _prefix_tokens(tok, length)
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


def _child(args: argparse.Namespace, cases: dict) -> dict:
    from vllm import SamplingParams

    import thaw_agents
    from thaw_agents.front import Request, front_for

    llm = thaw_agents.make_llm(args.model, max_model_len=args.max_model_len)
    front = front_for(llm)
    one = SamplingParams(max_tokens=1, temperature=0)
    # Warm the engine (first request pays one-time costs) on an unrelated prompt.
    front.generate([Request(token_ids=list(range(1000, 1100)), params=one)], stream=False)
    results = {}
    for length, case in cases.items():
        prompt = case["token_ids"] + case["suffix"]
        rows = {}
        for mode in ("re-prefill", "shm", "file"):
            ttft, load, cached = [], [], []
            for _ in range(args.repeats):
                llm.reset_prefix_cache()
                params = one
                start = time.perf_counter()
                if mode != "re-prefill":
                    if mode == "file":
                        _evict(case["file"])
                        start = time.perf_counter()
                    handle = thaw_agents.ForkHandle.load(case[mode])
                    load.append(time.perf_counter() - start)
                    params = thaw_agents.with_fork(one, handle)
                (out,) = front.generate([Request(token_ids=prompt, params=params)], stream=False)
                ttft.append(time.perf_counter() - start)
                cached.append(out.num_cached_tokens)
            rows[mode] = {
                "ttft_s": statistics.median(ttft),
                "ttft_all_s": ttft,
                "load_s": statistics.median(load) if load else 0.0,
                "cached_tokens": min(cached),
            }
        results[length] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1000, 4000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--role", choices=["parent", "child"], help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "parent":
        args.io.write_text(json.dumps(_parent(args, args.io.parent)))
        return
    if args.role == "child":
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
    ]
    if args.model:
        common += ["--model", args.model]
    try:
        subprocess.run([*common, "--role", "parent"], check=True)
        cases = json.loads(io.read_text())
        subprocess.run([*common, "--role", "child"], check=True)
        measured = json.loads(io.with_suffix(".out").read_text())
    finally:
        for case in json.loads(io.read_text()).values() if io.exists() else []:
            Path(case["shm"]).unlink(missing_ok=True)
    rows, report = [], []
    for length in map(str, args.lengths):
        base = measured[length]["re-prefill"]["ttft_s"]
        case = cases[length]
        for mode in ("re-prefill", "shm", "file"):
            m = measured[length][mode]
            save_s = {"re-prefill": 0.0, "shm": case["save_shm_s"], "file": case["save_file_s"]}[mode]
            rows.append(
                [
                    length,
                    mode,
                    m["ttft_s"] * 1e3,
                    m["ttft_s"] / base,
                    m["cached_tokens"],
                    case["snapshot_nbytes"] / 1e6 if mode != "re-prefill" else 0.0,
                    save_s * 1e3,
                    m["load_s"] * 1e3,
                ]
            )
            report.append(
                {
                    "prefix_tokens": int(length),
                    "mode": mode,
                    "ttft_ms": m["ttft_s"] * 1e3,
                    "ttft_all_ms": [t * 1e3 for t in m["ttft_all_s"]],
                    "ratio_to_reprefill": m["ttft_s"] / base,
                    "cached_tokens": m["cached_tokens"],
                    "snapshot_bytes": case["snapshot_nbytes"] if mode != "re-prefill" else 0,
                    "save_ms": save_s * 1e3,
                    "load_ms": m["load_s"] * 1e3,
                    "fork_ms": case["fork_s"] * 1e3,
                }
            )
    print()
    print_table(
        ["prefix", "mode", "TTFT ms", "x re-prefill", "cached", "snapshot MB", "save ms", "load ms"], rows
    )
    path = write_results(
        "fork_hydrate",
        {
            "benchmark": "fork_hydrate",
            "parameters": vars(args) | {"out": str(args.out), "io": None},
            "cases": report,
            "notes": "TTFT = wall time of a max_tokens=1 request in a fresh engine (prefix cache reset each "
            "run), median of repeats; shm/file TTFT include ForkHandle.load (header + checksum "
            "validation); file runs evict the snapshot from the page cache first.",
        },
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
