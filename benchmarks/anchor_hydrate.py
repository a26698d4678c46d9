"""Our KV restore vs thaw-vllm 0.6.0's, side by side in one fresh engine, on a 4,000-token trunk.

A parent engine computes a ``--trunk``-token prefix and forks it twice: with ``thaw_agents.fork``
(saved to a file in /dev/shm) and with the anchor's ``thaw_vllm.fork`` (its handle folder, also in
/dev/shm; the prefix cache holds the trunk alone then, as the anchor snapshots every cached block).
Then a fresh engine process (nothing cached; its snapshot store in /dev/shm) measures, for a
request of prefix + a short suffix (``max_tokens=1``, greedy), the wall time from the start of
each mode's own work to the request's end (load + TTFT):

  with_fork    ``ForkHandle.load(file)``, then the request with ``with_fork(params, handle)``:
               the blocks are loaded inside the branch's own request
  hydrate      ``ForkHandle.load(file)`` + ``handle.hydrate(llm)``, then a plain request
  anchor       thaw-vllm's ``ForkHandle.load(folder)`` + ``.hydrate(llm)``, then a plain request
  cache hit    the prefix already sits in this engine's prefix cache (the floor)
  with_fork, engine-checked   with_fork after ``ForkHandle.load(verify=False)``: no up-front
               pass over every checksum, the engine's per-block checks only (``--engine-checked``)
  re-prefill   the engine computes the whole prompt (only with ``--reprefill``)

The modes alternate within each of ``--rounds`` rounds (order reversed every other round), the
prefix cache is reset before each run, and one untimed warm-up pass runs every mode except
re-prefill first. Ratios are medians of per-round ratios, so machine load hits every mode alike.
"Beats the anchor beyond the noise" means: ours was faster in every round, and the gap between
the medians is larger than twice the larger median absolute deviation of the two modes (no
verdict with fewer than 3 rounds).
Correctness: each run's ``num_cached_tokens`` is recorded (a restore that gives no prefix-cache
hit shows 0), and after the rounds every mode generates 8 greedy tokens once, compared with the
cache hit's; every mode but re-prefill must serve the whole trunk from cache and agree (else the
script says CHECK FAILED and exits 1 after writing the JSON).

The anchor is installed for this benchmark only, never as a dependency::

    pip install --no-deps --target /tmp/anchor/site thaw_vllm-0.6.0-py3-none-any.whl

and found through ``--anchor-site /tmp/anchor/site`` (default: a normal import; exit status 2
when it cannot be imported). It reaches into the engine's scheduler and worker, so both engines
here run their engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ours included; on a
CPU build it needs the shims in ``_anchor.py`` (see there and the JSON notes).

Prints a table and writes JSON (``--out FILE``, else
benchmarks/results/anchor_hydrate-<machine>-<date>.json). vLLM's log lines go to a file
(named at the start) unless ``-v``.

Run: python benchmarks/anchor_hydrate.py --anchor-site /tmp/anchor/site [--rounds 5] [--reprefill]
     [--engine-checked] [--out FILE] [-v]
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
from _anchor import ANCHOR_VERSION, check_anchor, import_anchor
from _common import print_table, trunk_tokens, write_results

SUFFIX = " Question: which item above matters most, and why?"
OURS = ("with_fork", "hydrate", "with_fork, engine-checked")
VERIFY_TOKENS = 8

NOTES = (
    "load+TTFT = wall time of a max_tokens=1 greedy request for prefix + suffix in a fresh engine "
    "(prefix cache reset before each run), from the start of the mode's own work: with_fork = "
    "ForkHandle.load(file in /dev/shm) + the request carrying with_fork(params, handle); hydrate = "
    "ForkHandle.load + hydrate(llm) + a plain request; anchor = thaw_vllm.ForkHandle.load(folder in"
    " /dev/shm) + .hydrate(llm) + a plain request; cache hit = the prefix already in this engine's "
    "prefix cache; with_fork, engine-checked = with_fork after ForkHandle.load(verify=False). "
    "before_request = the part before the request is sent. Fork times (parent): ours includes the "
    "trunk's prefill, the anchor's is its freeze of a trunk already computed. One engine, engine "
    "core in-process for every mode (the anchor cannot reach a separate engine-core process). Modes"
    " alternate within each round, order reversed every other round, after one untimed warm-up "
    "pass; ratios are medians of per-round ratios. Beats the anchor beyond the noise: ours faster "
    "in every round AND (anchor median - ours median) > 2 x max(MAD ours, MAD anchor), MAD = median"
    " absolute deviation of a mode's per-round values (no verdict under 3 rounds). Checks: ours "
    "validates the file's header and every BLAKE3 region checksum in ForkHandle.load (verify=True, "
    "the default), then checks the model fingerprint, dtype, block size and KV layout against the "
    "engine, keys blocks by its own chain of token ids, and the engine checks each block's checksum"
    " again as it reads it; the anchor checks the model id (its path string), layer count, "
    "per-block shape, block-pool size and the payload's length, reads a JSON header and raw bytes "
    "(no pickle), and verifies no checksum and not the dtype: a changed byte is served, and the "
    "vLLM block hashes it inserts are taken from the file as they are. It writes the blocks back to"
    " the block ids they had in the parent and sets their hashes directly: a block there in use by "
    "a running request would be overwritten, and one already cached under another hash keeps that "
    "entry too (stale KV for that prefix); each run here starts from a reset prefix cache in an "
    "idle engine. On a CPU build the anchor runs its pure-Python fallback (its Rust/CUDA pipeline "
    "needs the thaw-native extension and a GPU): read the whole payload into one staging buffer, "
    "then copy it block by block and layer by layer into the cache; shims: no pinned memory and no "
    "CUDA synchronize, its strict mode relaxed (THAW_ALLOW_PYTHON_FALLBACK=1), each layer's "
    "[blocks, heads, tokens, K|V] cache shown to it as [1, blocks, ...] so its [kv, block] indexing"
    " takes whole blocks, and its fork() (which reads a .meta sidecar only its Rust writer makes) "
    "given the fallback file's own header."
)


# -- the two processes ------------------------------------------------------------------------


def _parent(args: argparse.Namespace, job: dict) -> dict:
    from vllm import SamplingParams

    import thaw_agents
    from thaw_agents.front import Request, front_for

    llm = thaw_agents.make_llm(args.model, max_model_len=args.max_model_len)
    anchor, shims = import_anchor(args.anchor_site)
    front = front_for(llm)
    tok = llm.get_tokenizer()
    ids = trunk_tokens(tok, args.trunk)
    one = SamplingParams(max_tokens=1, temperature=0)
    # Both snapshots hold the KV of one whole-trunk prefill, bit for bit what the child's
    # re-prefill and cache hit compute: a trunk computed in two pieces (a fork of a trunk that
    # is cached already recomputes its last block on top of the others) differs in the last
    # bits, enough to change a greedy continuation now and then, and the check below compares
    # tokens exactly. So ours computes the trunk itself (its fork time includes that prefill).
    start = time.perf_counter()
    handle = thaw_agents.fork(llm, ids)
    fork_s = time.perf_counter() - start
    start = time.perf_counter()
    handle.save(job["ours"])
    save_s = time.perf_counter() - start
    # The anchor's fork snapshots every block that has a hash in the pool: leave the trunk's only,
    # computed again in one prefill (its fork time is the freeze alone).
    llm.reset_prefix_cache()
    front.generate([Request(token_ids=ids, params=one)], stream=False)
    start = time.perf_counter()
    anchor_handle = anchor.fork(llm, state_dir=job["anchor"], prompt_token_ids=ids)
    anchor_fork_s = time.perf_counter() - start
    anchor_files = {p.name: p.stat().st_size for p in Path(job["anchor"]).iterdir()}
    return {
        "token_ids": ids,
        "suffix": tok.encode(SUFFIX, add_special_tokens=False),
        "snapshot_bytes": handle.nbytes,
        "snapshot_tokens": handle.num_snapshot_tokens,
        "fork_s": fork_s,
        "save_s": save_s,
        "anchor_fork_s": anchor_fork_s,
        "anchor_blocks": anchor_handle.num_kv_blocks,
        "anchor_prefix_tokens": anchor_handle.prefix_tokens,
        "anchor_files": anchor_files,
        "anchor_shims": shims,
    }


def _child(args: argparse.Namespace, job: dict) -> dict:
    from vllm import SamplingParams

    import thaw_agents
    from thaw_agents.front import Request, front_for

    llm = thaw_agents.make_llm(args.model, max_model_len=args.max_model_len)
    anchor, _ = import_anchor(args.anchor_site)
    front = front_for(llm)
    trunk = job["token_ids"]
    prompt = trunk + job["suffix"]
    # Warm the engine (the first request pays one-time costs) on an unrelated prompt.
    front.generate(
        [Request(token_ids=list(range(1000, 1100)), params=SamplingParams(max_tokens=1))], stream=False
    )
    anchor_stats: dict[str, Any] = {}

    def measure(mode: str, max_tokens: int = 1) -> dict[str, Any]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        llm.reset_prefix_cache()
        if mode == "cache hit":
            front.generate([Request(token_ids=trunk, params=params)], stream=False)
        start = time.perf_counter()
        if mode in OURS:
            handle = thaw_agents.ForkHandle.load(job["ours"], verify=mode != "with_fork, engine-checked")
            if mode == "hydrate":
                handle.hydrate(llm)
            else:
                params = thaw_agents.with_fork(params, handle)
        elif mode == "anchor":
            anchor_stats.update(anchor.ForkHandle.load(job["anchor"]).hydrate(llm)["kv"])
        before = time.perf_counter() - start
        (out,) = front.generate([Request(token_ids=prompt, params=params)], stream=False)
        return {
            "s": time.perf_counter() - start,
            "before_s": before,
            "cached": out.num_cached_tokens,
            "tokens": list(out.completions[0].token_ids),
        }

    modes = ["with_fork", "hydrate", "anchor", "cache hit"]
    modes += (["with_fork, engine-checked"] if args.engine_checked else []) + (
        ["re-prefill"] if args.reprefill else []
    )
    for mode in modes:  # warm-up: first-call costs of each path (imports, buffers) left out
        if mode != "re-prefill":
            measure(mode)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            runs[mode].append(measure(mode))
    verify = {mode: measure(mode, VERIFY_TOKENS) for mode in modes}
    return {"runs": runs, "verify": verify, "anchor_restore": anchor_stats}


# -- the report -------------------------------------------------------------------------------


def _mad(values: list[float]) -> float:
    mid = statistics.median(values)
    return statistics.median(abs(v - mid) for v in values)


def _report(args: argparse.Namespace, case: dict, got: dict, load_avg: list[float]) -> dict:
    runs = got["runs"]
    ms = {mode: [r["s"] * 1e3 for r in rows] for mode, rows in runs.items()}

    def ratio(mode: str, base: str) -> float:
        """Median over rounds of the per-round ratio (same round, same machine load)."""
        return statistics.median(a / b for a, b in zip(ms[mode], ms[base], strict=True))

    expected = got["verify"]["cache hit"]["tokens"]
    want = case["snapshot_tokens"]  # every mode but re-prefill must serve the whole trunk
    modes = []
    for mode, rows in runs.items():
        served = min(r["cached"] for r in [*rows, got["verify"][mode]])
        modes.append(
            {
                "mode": mode,
                "load_ttft_ms": statistics.median(ms[mode]),
                "load_ttft_all_ms": ms[mode],
                "before_request_ms": statistics.median(r["before_s"] * 1e3 for r in rows),
                "ratio_to_anchor": ratio(mode, "anchor"),
                "ratio_to_cache_hit": ratio(mode, "cache hit"),
                "cached_tokens_all": [r["cached"] for r in rows],
                "cached_tokens": min(r["cached"] for r in rows),
                "first_tokens_agree": len({tuple(r["tokens"]) for r in rows}) == 1,
                "verify_tokens": got["verify"][mode]["tokens"],
                "verify_cached_tokens": got["verify"][mode]["cached"],
                "verify_agrees_with_cache_hit": got["verify"][mode]["tokens"] == expected,
                "check_ok": got["verify"][mode]["tokens"] == expected
                and (mode == "re-prefill" or served >= want),
            }
        )
    comparisons = []
    for mode in (m for m in OURS if m in ms):
        per_round = [a / b for a, b in zip(ms[mode], ms["anchor"], strict=True)]
        gap = statistics.median(ms["anchor"]) - statistics.median(ms[mode])
        noise = 2 * max(_mad(ms[mode]), _mad(ms["anchor"]))
        comparisons.append(
            {
                "ours": mode,
                "ours_ms": statistics.median(ms[mode]),
                "anchor_ms": statistics.median(ms["anchor"]),
                "per_round_ratio": per_round,
                "median_ratio": statistics.median(per_round),
                "faster_every_round": max(per_round) < 1.0,
                "median_gap_ms": gap,
                "noise_ms": noise,
                "beats_anchor_beyond_noise": len(per_round) >= 3 and max(per_round) < 1.0 and gap > noise,
            }
        )
    return {
        "benchmark": "anchor_hydrate",
        "anchor": f"thaw-vllm {ANCHOR_VERSION}",
        "parameters": vars(args) | {"out": str(args.out), "io": None},
        "trunk_tokens": args.trunk,
        "suffix_tokens": len(case["suffix"]),
        "snapshot": {
            "ours_bytes": case["snapshot_bytes"],
            "ours_tokens": case["snapshot_tokens"],
            "ours_fork_ms": case["fork_s"] * 1e3,
            "ours_save_ms": case["save_s"] * 1e3,
            "anchor_files": case["anchor_files"],
            "anchor_blocks": case["anchor_blocks"],
            "anchor_prefix_tokens": case["anchor_prefix_tokens"],
            "anchor_fork_ms": case["anchor_fork_s"] * 1e3,
        },
        "anchor_restore": got["anchor_restore"],
        "anchor_shims": case["anchor_shims"],
        "modes": modes,
        "checks_passed": all(m["check_ok"] for m in modes),
        "comparisons": comparisons,
        "loadavg_1m_before_after": load_avg,
        "notes": NOTES,
    }


def _log_file() -> Path | None:
    """The file vLLM's log goes to: the one ``thaw-agents bench`` set up already, else a new one."""
    config = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
    if config:
        try:
            return Path(json.loads(Path(config).read_text())["handlers"]["file"]["filename"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # someone else's logging configuration: leave the terminal as it is
    from thaw_agents._logfile import send_vllm_logs_to_file

    return send_vllm_logs_to_file("anchor_hydrate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor-site", default=None, help="folder thaw-vllm was installed into (--target)")
    parser.add_argument("--trunk", type=int, default=4000, help="trunk tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reprefill", action="store_true", help="also measure re-prefilling the prompt")
    parser.add_argument(
        "--engine-checked",
        action="store_true",
        help="also with_fork after ForkHandle.load(verify=False) (only the engine's per-block checks)",
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true", help="vLLM's log in the terminal")
    parser.add_argument("--role", choices=["parent", "child"], help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        job = json.loads(args.io.read_text())
        result = (_parent if args.role == "parent" else _child)(args, job)
        args.io.with_suffix(".out").write_text(json.dumps(result))
        return

    problem = check_anchor(args.anchor_site)
    if problem:
        print(f"anchor_hydrate: {problem}", file=sys.stderr)
        sys.exit(2)
    log = None if args.verbose else _log_file()
    if log:
        print(f"vLLM's log (and the engines' stderr): {log}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="thaw-anchor-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="thaw-anchor-bench-", dir="/dev/shm"))
    store = Path(tempfile.mkdtemp(prefix="thaw-bench-store-", dir="/dev/shm"))
    job = {"ours": str(shm / "trunk.thaw"), "anchor": str(shm / "anchor")}
    argv = [sys.executable, __file__, "--trunk", str(args.trunk), "--rounds", str(args.rounds)]
    argv += ["--max-model-len", str(args.max_model_len)]
    argv += ["--anchor-site", args.anchor_site] if args.anchor_site else []
    argv += ["--model", args.model] if args.model else []
    argv += ["--reprefill"] if args.reprefill else []
    argv += ["--engine-checked"] if args.engine_checked else []
    # Both engines run their core in this process: the anchor reaches into scheduler and worker.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    load_before = os.getloadavg()[0]

    def run(role: str, job: dict, env: dict) -> dict:
        io = scratch / f"{role}.json"
        io.write_text(json.dumps(job))
        with open(log or os.devnull, "a") as sink:
            proc = subprocess.run(
                [*argv, "--role", role, "--io", str(io)], env=env, stderr=sink if log else None
            )
        if proc.returncode != 0:
            if log:
                sys.stderr.write("".join(log.read_text(errors="replace").splitlines(True)[-40:]))
            raise SystemExit(f"anchor_hydrate: the {role} process failed (exit status {proc.returncode})")
        return json.loads(io.with_suffix(".out").read_text())

    try:
        case = run("parent", job, env)
        # The fresh engine's snapshot store is in /dev/shm (the shm file is hard-linked into it).
        got = run("child", job | case, env | {"THAW_AGENTS_STORE": str(store)})
    finally:
        for folder in (scratch, shm, store):
            shutil.rmtree(folder, ignore_errors=True)
    result = _report(args, case, got, [load_before, os.getloadavg()[0]])

    print()
    print_table(
        ["mode", "load+TTFT ms", "min ms", "max ms", "x anchor", "x cache hit", "cached", "before req ms"],
        [
            [
                m["mode"],
                m["load_ttft_ms"],
                min(m["load_ttft_all_ms"]),
                max(m["load_ttft_all_ms"]),
                m["ratio_to_anchor"],
                m["ratio_to_cache_hit"],
                m["cached_tokens"],
                m["before_request_ms"],
            ]
            for m in result["modes"]
        ],
    )
    print()
    for m in result["modes"]:
        if not m["check_ok"]:
            print(f"CHECK FAILED: {m['mode']}: cached {m['cached_tokens_all']}, tokens {m['verify_tokens']}")
    for c in result["comparisons"]:
        verdict = "not beyond the noise"
        if c["beats_anchor_beyond_noise"]:
            verdict = "beats the anchor beyond the noise"
        elif len(c["per_round_ratio"]) < 3:
            verdict = "too few rounds for a verdict (3 at least)"
        print(
            f"{c['ours']} vs anchor: {c['ours_ms']:.1f} vs {c['anchor_ms']:.1f} ms, per-round ratio "
            f"median {c['median_ratio']:.3f} (max {max(c['per_round_ratio']):.3f}), gap "
            f"{c['median_gap_ms']:.1f} ms vs noise {c['noise_ms']:.1f} ms: {verdict}"
        )
    path = write_results("anchor_hydrate", result, args.out)
    print(f"\nwrote {path}")
    if not result["checks_passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
