"""Tensor parallel on GPUs: a TP=2 engine's KV snapshot and weights, restored per rank.

Each role runs in its own process (a fresh engine, as a user's second process would be):

  parent          TP=2, dummy weights frozen per rank as they load (``freeze_to`` with
                  ``{rank}``); forks a ``--trunk-tokens`` trunk into the store; its own greedy
                  continuation of trunk + suffix from its prefix cache; greedy of a plain prompt.
  child           TP=2 from the per-rank weights files (``load_format="thaw"``): each rank's
                  restore time; greedy of the plain prompt (equal: the weights are the parent's);
                  the snapshot hydrated (tokens served) and the parent's prompt continued (equal).
  corrupt         TP=2 with one byte of rank 1's weights file flipped: the start must fail with
                  the typed error (the byte is flipped back afterwards).
  single          TP=1 of the same model, dummy weights frozen to one file: hydrating the TP=2
                  snapshot is refused (SnapshotMismatchError, field ``tensor_parallel_size``).
  single-restore  TP=1 from that file: one GPU's restore of the whole model, for comparison.

Prints a table and writes JSON (``--out``). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0 and friends are set here for every process the script starts).

Run: python benchmarks/gpu_tp.py --model DIR --out FILE [--tp 2] [--trunk-tokens 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, run_role, serve_role, trunk_tokens
from gpu_engine import greedy, one_token, shutdown, suffix_tokens, ttft

HERE = Path(__file__).resolve()
PLAIN = "Write three short sentences about a lighthouse keeper and the sea."
# Multicast over NVLink can take a shared host's GPUs out of service: off in every process.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _engine(args: argparse.Namespace, tp: int, **more: Any) -> Any:
    import thaw_agents

    kw: dict[str, Any] = {"max_model_len": args.max_model_len, "seed": 0, "enforce_eager": args.eager}
    kw["gpu_memory_utilization"] = args.gpu_mem
    if tp > 1:
        kw.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    kw.update(more)
    return thaw_agents.make_llm(args.model, **kw)


def _frozen(template: str) -> dict[str, Any]:
    return {
        "load_format": "thaw",
        "model_loader_extra_config": {"freeze_to": template, "load_format": "dummy"},
    }


def _restored(template: str) -> dict[str, Any]:
    return {"load_format": "thaw", "model_loader_extra_config": {"snapshot": template}}


def _load_stats(llm: Any) -> list[dict[str, Any]]:
    return [dict(s or {}) for s in llm.collective_rpc("thaw_weights_loaded")]


def _plain_ids(llm: Any) -> list[int]:
    return llm.get_tokenizer().encode(PLAIN)


def role_parent(args: argparse.Namespace, job: dict) -> dict:
    import thaw_agents

    start = time.perf_counter()
    llm = _engine(args, args.tp, **_frozen(job["tp_weights"]))
    start_s = time.perf_counter() - start
    try:
        tok = llm.get_tokenizer()
        block = llm.llm_engine.vllm_config.cache_config.block_size
        trunk = trunk_tokens(tok, args.trunk_tokens, salt=0)
        suffix = suffix_tokens(tok, block)
        _, plain = ttft(llm, _plain_ids(llm), greedy())
        start = time.perf_counter()
        handle = thaw_agents.fork(llm, trunk)
        fork_s = time.perf_counter() - start
        hit_s, base = ttft(llm, trunk + suffix, greedy())
        spec = handle.spec
        return {
            "start_s": start_s,
            "trunk": trunk,
            "suffix": suffix,
            "snapshot_id": handle.id,
            "snapshot_tokens": handle.num_snapshot_tokens,
            "snapshot_nbytes": handle.nbytes,
            "tensor_parallel_size": spec.tensor_parallel_size,
            "kv_head_slices": [list(s) for s in spec.kv_head_slices],
            "kv_layout": spec.kv_layout,
            "fork_s": fork_s,
            "hit_cached": base.num_cached_tokens,
            "hit_greedy_s": hit_s,
            "greedy": list(base.outputs[0].token_ids),
            "plain_greedy": list(plain.outputs[0].token_ids),
            "rank_files": sorted(str(p) for p in Path(job["tp_weights"]).parent.glob("*.thaw")),
        }
    finally:
        shutdown(llm)


def role_child(args: argparse.Namespace, job: dict) -> dict:
    import thaw_agents

    parent = job["parent"]
    start = time.perf_counter()
    llm = _engine(args, args.tp, **_restored(job["tp_weights"]))
    start_s = time.perf_counter() - start
    try:
        ranks = _load_stats(llm)
        _, plain = ttft(llm, _plain_ids(llm), greedy())
        handle = thaw_agents.ForkHandle.from_id(parent["snapshot_id"])
        start = time.perf_counter()
        served = handle.hydrate(llm)
        hydrate_s = time.perf_counter() - start
        seconds, out = ttft(llm, parent["trunk"] + parent["suffix"], greedy())
        return {
            "start_s": start_s,
            "ranks": ranks,
            "plain_equal": list(plain.outputs[0].token_ids) == parent["plain_greedy"],
            "hydrated_tokens": served,
            "hydrate_s": hydrate_s,
            "cached_after_hydrate": out.num_cached_tokens,
            "greedy_equal": list(out.outputs[0].token_ids) == parent["greedy"],
            "greedy_after_hydrate_s": seconds,
        }
    finally:
        shutdown(llm)


def role_corrupt(args: argparse.Namespace, job: dict) -> dict:
    path = Path(job["tp_weights"].replace("{rank}", "1"))
    with path.open("r+b") as f:  # flip the last payload byte, and flip it back afterwards
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    try:
        llm = _engine(args, args.tp, **_restored(job["tp_weights"]))
    except Exception as exc:
        return {"started": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    else:
        shutdown(llm)
        return {"started": True}
    finally:
        with path.open("r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(byte)


def role_single(args: argparse.Namespace, job: dict) -> dict:
    import thaw_agents

    llm = _engine(args, 1, **_frozen(job["one_weights"]))
    try:
        handle = thaw_agents.ForkHandle.from_id(job["parent"]["snapshot_id"])
        try:
            handle.hydrate(llm)
        except thaw_agents.ThawError as exc:
            refused = {"error": type(exc).__name__, "field": getattr(exc, "field", None)}
        else:
            refused = {"error": None}
        out = ttft(llm, list(handle.token_ids), thaw_agents.with_fork(one_token(), handle))[1]
        refused["cached_with_fork"] = out.num_cached_tokens
        return refused
    finally:
        shutdown(llm)


def role_single_restore(args: argparse.Namespace, job: dict) -> dict:
    start = time.perf_counter()
    llm = _engine(args, 1, **_restored(job["one_weights"]))
    start_s = time.perf_counter() - start
    try:
        first_s = ttft(llm, _plain_ids(llm), greedy())[0]
        return {"start_s": start_s, "first_request_s": first_s, "ranks": _load_stats(llm)}
    finally:
        shutdown(llm)


ROLES = {
    "parent": role_parent,
    "child": role_child,
    "corrupt": role_corrupt,
    "single": role_single,
    "single-restore": role_single_restore,
}


def _run_role(args: argparse.Namespace, role: str, job: dict, scratch: Path) -> dict:
    start = time.perf_counter()
    result = run_role(HERE, role, job, scratch, args.passthrough, args.role_timeout)
    result["role_s"] = time.perf_counter() - start
    print(f"== {role}: {json.dumps({k: v for k, v in result.items() if k not in ('trunk', 'greedy')})[:600]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder (an 8B-shaped config: dummy weights)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--trunk-tokens", type=int, default=4000)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--gpu-mem", type=float, default=0.45)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--weights-dir", default="/dev/shm/thaw-tp-weights")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/gpu_tp.json"), help="JSON output file"
    )
    parser.add_argument("--role-timeout", type=float, default=600)
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(NO_MULTICAST)
    args.passthrough = [
        "--model", args.model, "--tp", str(args.tp), "--trunk-tokens", str(args.trunk_tokens),
        "--max-model-len", str(args.max_model_len), "--gpu-mem", str(args.gpu_mem),
    ]  # fmt: skip
    if args.eager:
        args.passthrough.append("--eager")
    if args.role:
        serve_role(args, ROLES)
        return

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    store = Path("/dev/shm") / f"thaw-tp-store-{os.getpid()}"
    store.mkdir(mode=0o700, parents=True)
    os.environ["THAW_AGENTS_STORE"] = str(store)
    weights = Path(args.weights_dir)
    (weights / "tp").mkdir(mode=0o700, parents=True, exist_ok=True)
    (weights / "one").mkdir(mode=0o700, parents=True, exist_ok=True)
    scratch = Path(f"/tmp/thaw-tp-io-{os.getpid()}")
    scratch.mkdir(mode=0o700)
    job: dict[str, Any] = {
        "tp_weights": str(weights / "tp" / "w.rank{rank}.thaw"),
        "one_weights": str(weights / "one" / "w.thaw"),
    }
    results: dict[str, Any] = {}
    try:
        job["parent"] = results["parent"] = _run_role(args, "parent", job, scratch)
        if "snapshot_id" in job["parent"]:
            for role in ("child", "corrupt", "single", "single-restore"):
                results[role] = _run_role(args, role, job, scratch)
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(weights, ignore_errors=True)
    ranks = results.get("child", {}).get("ranks", [])
    one = results.get("single-restore", {}).get("ranks", [{}])[0]
    rows = [
        [f"TP={args.tp} rank {i}", r.get("seconds"), r.get("nbytes", 0) / 1e9, r.get("gbps")]
        for i, r in enumerate(ranks)
    ]
    rows.append(["TP=1 (one GPU)", one.get("seconds"), one.get("nbytes", 0) / 1e9, one.get("gbps")])
    print_table(["weights restore", "seconds", "GB", "GB/s"], rows)
    summary = {
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k not in ("io", "passthrough")},
        "restore_s_per_rank": [r.get("seconds") for r in ranks],
        "restore_s_tp_total": max((r.get("seconds") or 0 for r in ranks), default=None),
        "restore_s_one_gpu": one.get("seconds"),
        **{k: {kk: vv for kk, vv in v.items() if kk not in ("trunk", "suffix")} for k, v in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str))
    print(args.out)


if __name__ == "__main__":
    main()
