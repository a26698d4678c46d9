"""The real vLLM engine path on a GPU: hydrate, fork rounds, ChatThaw, weights; fidelity checked.

Phases (``--phases``, each in its own processes, each a JSON under ``--out-dir``):

  hydrate  a parent engine forks 2k/4k/8k-token trunks into a shared-memory store and saves a
           copy to a file; it records its own cold TTFT and its prefix-cache-hit TTFT of trunk +
           suffix, and its greedy output from the cache hit. A fresh engine process then measures
           re-prefill, hydrate from shared memory and hydrate from a cold file (TTFT and load),
           the engine's own restore time of the blocks, and checks tokens served and greedy
           output against the parent's cache-hit run (same batch composition: one request).
  rounds   fork rounds in the parent engine: a new 2,000-token trunk every round, 4 branches x
           64 tokens (greedy, ignore_eos), median of --rounds after a warm-up round, both as
           ``fork_completions`` (the parent's prefix cache serves the branches) and as ``fork``
           (a durable snapshot is written) + the branches. ``rounds-eager`` repeats it eager.
  chat     8 concurrent ``ChatThaw.ainvoke`` vs one batched ``LLM.chat`` of the same 8
           conversations (64 tokens, temperatures 0.0-0.7, seeded): output tokens per second.
  weights  random 8B-shaped safetensors in the page cache; a fresh engine from them (start to
           first token), ``thaw freeze`` to /dev/shm, a fresh engine with ``load_format="thaw"``
           from it (start to first token); greedy output of the two compared.

Engines are built with ``thaw_agents.engine_kwargs`` plus ``--load-format`` (``dummy`` for the
KV phases: timing does not depend on the weights' values) and ``--gpu-mem``. CUDA graphs are on
(vLLM's default on GPU) unless ``--eager``. Runs on CPU too, with the default model (small).

Run: python benchmarks/gpu_engine.py --model DIR --load-format dummy --out-dir OUT
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, trunk_tokens

SUFFIX = " Question: which item above matters most, and why?"
QUESTIONS = (
    " Question: what is the biggest risk in these orders?",
    " Question: which customer should we call first, and why?",
    " Question: summarise the refunds in two sentences.",
    " Question: what would you automate in this workflow?",
)
TOPICS = ["the sea", "a library", "winter", "a train", "coffee", "a garden", "the moon", "a market"]
HERE = Path(__file__).resolve()


# -- engine helpers ----------------------------------------------------------------------------
def _on_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def overrides(args: argparse.Namespace, *, eager: bool | None = None, load_format: str | None = None) -> dict:
    kw: dict[str, Any] = {"max_model_len": args.max_model_len, "seed": 0}
    fmt = load_format if load_format is not None else args.load_format
    if fmt:
        kw["load_format"] = fmt
    if _on_cuda():
        kw["gpu_memory_utilization"] = args.gpu_mem
        kw["enforce_eager"] = args.eager if eager is None else eager
    return kw


def make_llm(args: argparse.Namespace, model: str | None = None, **more: Any) -> Any:
    import thaw_agents

    kw = overrides(args)
    kw.update(more)
    return thaw_agents.make_llm(model or args.model, **kw)


def shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        torch.cuda.empty_cache()


def ttft(llm: Any, ids: list[int], params: Any) -> tuple[float, Any]:
    from vllm import TokensPrompt

    start = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)[0]
    return time.perf_counter() - start, out


def suffix_tokens(tokenizer: Any, block_size: int) -> list[int]:
    ids = tokenizer.encode(SUFFIX, add_special_tokens=False)
    return ids[: max(1, block_size - 1)]  # no extra full block: the count served stays exact


def one_token() -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0)


def greedy(n: int = 16) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def describe(llm: Any) -> dict:
    return dict(llm.collective_rpc("thaw_describe")[0])


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_role(args: argparse.Namespace, role: str, io: Path, extra: list[str] | None = None) -> None:
    cmd = [sys.executable, str(HERE), "--role", role, "--io", str(io), *(extra or []), *args.passthrough]
    subprocess.run(cmd, check=True, timeout=args.role_timeout)


# -- hydrate -----------------------------------------------------------------------------------
def role_parent(args: argparse.Namespace, io: Path) -> dict:
    import thaw_agents

    llm = make_llm(args)
    tok = llm.get_tokenizer()
    block = llm.llm_engine.vllm_config.cache_config.block_size
    spec = describe(llm)
    ttft(llm, list(range(1000, 1100)), one_token())  # first request pays one-time costs
    cases = {}
    for length in args.lengths:
        ids = trunk_tokens(tok, length, salt=length)
        suffix = suffix_tokens(tok, block)
        prompt = ids + suffix
        cold, _ = ttft(llm, prompt, one_token())  # a new prompt on a warm engine: full prefill
        llm.reset_prefix_cache()
        start = time.perf_counter()
        handle = thaw_agents.fork(llm, ids)  # prefill + snapshot into the (shared-memory) store
        fork_s = time.perf_counter() - start
        hits = [ttft(llm, prompt, one_token())[0] for _ in range(args.repeats)]
        _, ref = ttft(llm, prompt, greedy())
        file_path = Path(args.file_dir) / f"prefix-{length}.thaw"
        start = time.perf_counter()
        handle.save(file_path)
        save_file_s = time.perf_counter() - start
        cases[str(length)] = {
            "token_ids": ids,
            "suffix": suffix,
            "snapshot_id": handle.id,
            "file": str(file_path),
            "snapshot_nbytes": handle.nbytes,
            "snapshot_tokens": handle.num_snapshot_tokens,
            "parent_cold_ttft_s": cold,
            "parent_hit_ttft_s": statistics.median(hits),
            "parent_hit_ttft_all_s": hits,
            "parent_hit_cached": ref.num_cached_tokens,
            "parent_greedy": list(ref.outputs[0].token_ids),
            "fork_s": fork_s,
            "save_file_s": save_file_s,
        }
    out = {"cases": cases, "spec": spec.get("spec"), "block_size": block}
    if "rounds" in args.phases:
        out["rounds"] = fork_rounds(llm, args)
    shutdown(llm)
    return out


def role_child(args: argparse.Namespace, io: Path) -> dict:
    import thaw_agents

    cases = json.loads(io.read_text())["cases"]
    llm = make_llm(args)
    store = Path(describe(llm)["store"])
    ttft(llm, list(range(1000, 1100)), one_token())
    results = {}
    for length, case in cases.items():
        prompt = case["token_ids"] + case["suffix"]
        rows: dict[str, Any] = {}
        for mode in ("re-prefill", "file", "shm", "hydrate"):
            times, loads, cached, restore = [], [], [], []
            for _ in range(args.repeats):
                llm.reset_prefix_cache()
                params = one_token()
                start = time.perf_counter()
                if mode == "file":
                    (store / f"{case['snapshot_id']}.thaw").unlink(missing_ok=True)
                    evict(case["file"])
                    start = time.perf_counter()
                    handle = thaw_agents.ForkHandle.load(case["file"], verify=False)
                elif mode in ("shm", "hydrate"):
                    handle = thaw_agents.ForkHandle.from_id(case["snapshot_id"])
                if mode == "hydrate":  # then a plain request, which loads the prefix itself
                    handle.hydrate(llm)
                    loads.append(time.perf_counter() - start)
                elif mode != "re-prefill":
                    loads.append(time.perf_counter() - start)
                    params = thaw_agents.with_fork(params, handle)
                seconds, out = ttft(llm, prompt, params)
                times.append(seconds)
                cached.append(out.num_cached_tokens)
                if mode != "re-prefill":
                    restore.append(describe(llm).get("last_load", {}))
            rows[mode] = {
                "ttft_s": statistics.median(times),
                "ttft_all_s": times,
                "load_s": statistics.median(loads) if loads else 0.0,
                "cached_tokens": min(cached),
                "restore": restore,
            }
        # Fidelity: greedy output after a hydrate equals the parent's own cache-hit output.
        fidelity = {}
        for mode in ("shm", "file", "hydrate"):
            llm.reset_prefix_cache()
            if mode == "file":
                (store / f"{case['snapshot_id']}.thaw").unlink(missing_ok=True)
                evict(case["file"])
                handle = thaw_agents.ForkHandle.load(case["file"], verify=False)
            else:
                handle = thaw_agents.ForkHandle.from_id(case["snapshot_id"])
            if mode == "hydrate":
                handle.hydrate(llm)
                _, out = ttft(llm, prompt, greedy())
            else:
                _, out = ttft(llm, prompt, thaw_agents.with_fork(greedy(), handle))
            fidelity[mode] = {
                "tokens_equal": list(out.outputs[0].token_ids) == case["parent_greedy"],
                "cached_tokens": out.num_cached_tokens,
                "expected_cached": case["snapshot_tokens"],
                "report": (out.kv_transfer_params or {}).get("thaw"),
            }
        rows["fidelity"] = fidelity
        results[length] = rows
    shutdown(llm)
    return results


def summarize_hydrate(parent: dict, child: dict) -> tuple[list[list[Any]], list[dict]]:
    table, report = [], []
    for length, case in parent["cases"].items():
        m = child[length]
        base = m["re-prefill"]["ttft_s"]
        hit = case["parent_hit_ttft_s"]
        for mode in ("re-prefill", "shm", "file", "hydrate"):
            r = m[mode]
            restore_ms = [x.get("ms") for x in r["restore"] if x]
            row = {
                "prefix_tokens": int(length),
                "mode": mode,
                "ttft_ms": r["ttft_s"] * 1e3,
                "ttft_all_ms": [t * 1e3 for t in r["ttft_all_s"]],
                "load_ms": r["load_s"] * 1e3,
                "load_plus_ttft_over_reprefill": (r["load_s"] + r["ttft_s"]) / base,
                "ttft_over_parent_cache_hit": r["ttft_s"] / hit,
                "cached_tokens": r["cached_tokens"],
                "engine_restore_ms": statistics.median(restore_ms) if restore_ms else None,
                "engine_restore_all": r["restore"],
                "snapshot_bytes": case["snapshot_nbytes"] if mode != "re-prefill" else 0,
            }
            if mode != "re-prefill":
                row["fidelity"] = m["fidelity"][mode]
            if mode == "hydrate":  # hydrate() + a plain request vs with_fork, load included
                shm = m["shm"]
                row["over_with_fork"] = (r["load_s"] + r["ttft_s"]) / (shm["load_s"] + shm["ttft_s"])
            report.append(row)
            table.append(
                [
                    length,
                    mode,
                    row["ttft_ms"],
                    row["load_ms"],
                    row["load_plus_ttft_over_reprefill"],
                    row["ttft_over_parent_cache_hit"],
                    row["cached_tokens"],
                    row["engine_restore_ms"] or 0.0,
                    "yes" if mode == "re-prefill" or m["fidelity"][mode]["tokens_equal"] else "NO",
                ]
            )
        report.append(
            {
                "prefix_tokens": int(length),
                "mode": "parent",
                "cold_ttft_ms": case["parent_cold_ttft_s"] * 1e3,
                "cache_hit_ttft_ms": hit * 1e3,
                "cache_hit_all_ms": [t * 1e3 for t in case["parent_hit_ttft_all_s"]],
                "fork_ms": case["fork_s"] * 1e3,
                "save_file_ms": case["save_file_s"] * 1e3,
                "snapshot_bytes": case["snapshot_nbytes"],
            }
        )
    return table, report


# -- fork rounds -------------------------------------------------------------------------------
def fork_rounds(llm: Any, args: argparse.Namespace) -> dict:
    from vllm import SamplingParams, TokensPrompt

    import thaw_agents

    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, Any] = {}
    for mode, offset in (("fork_completions", 100), ("fork+snapshot", 200)):
        rounds = []
        for r in range(args.rounds + 1):  # round 0 warms up and is dropped
            trunk = trunk_tokens(tok, args.trunk_tokens, salt=offset + r)
            prompts = [trunk + tok.encode(q, add_special_tokens=False) for q in QUESTIONS[: args.branches]]
            start = time.perf_counter()
            if mode == "fork_completions":
                results = thaw_agents.fork_completions(llm, prompts, params)
                tokens = [len(x.token_ids) for x in results]
                cached = [x.num_cached_tokens for x in results]
            else:
                handle = thaw_agents.fork(llm, trunk)
                outs = llm.generate(
                    [TokensPrompt(prompt_token_ids=p) for p in prompts],
                    thaw_agents.with_fork(params, handle),
                    use_tqdm=False,
                )
                tokens = [len(o.outputs[0].token_ids) for o in outs]
                cached = [o.num_cached_tokens for o in outs]
            wall = time.perf_counter() - start
            if mode != "fork_completions":
                handle.delete()
            if r:
                rounds.append({"round_s": wall, "tokens": tokens, "cached": cached})
        out[mode] = {
            "round_s": statistics.median(x["round_s"] for x in rounds),
            "round_all_s": [x["round_s"] for x in rounds],
            "tokens_per_branch": min(min(x["tokens"]) for x in rounds),
            "cached_min": min(min(x["cached"]) for x in rounds),
        }
    return out


def role_rounds(args: argparse.Namespace, io: Path) -> dict:
    llm = make_llm(args)
    out = fork_rounds(llm, args)
    shutdown(llm)
    return out


# -- ChatThaw ----------------------------------------------------------------------------------
def role_chat(args: argparse.Namespace, io: Path) -> dict:
    import asyncio

    from vllm import SamplingParams

    convs = [[{"role": "user", "content": f"Write a short poem about {t}."}] for t in TOPICS]
    kw = overrides(args)
    if io.name.endswith("batched.json"):
        llm = make_llm(args)
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=0.1 * i, seed=i) for i in range(8)]
        llm.chat(convs, params, use_tqdm=False)  # warm-up
        runs = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            outs = llm.chat(convs, params, use_tqdm=False)
            runs.append((time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)))
        shutdown(llm)
        return {"batched": runs}
    from thaw_agents.integrations.langchain import ChatThaw

    chat = ChatThaw(model=args.model, max_tokens=args.max_tokens, engine_kwargs=kw)
    prompts = [c[0]["content"] for c in convs]

    async def concurrent() -> list:
        return await asyncio.gather(
            *[chat.ainvoke(p, temperature=0.1 * i, seed=i) for i, p in enumerate(prompts)]
        )

    asyncio.run(concurrent())  # warm-up (starts the engine)
    runs = []
    checks = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        msgs = asyncio.run(concurrent())
        runs.append((time.perf_counter() - start, sum(m.usage_metadata["output_tokens"] for m in msgs)))
        checks.append([bool(m.content) for m in msgs])
    chat.close()
    return {"concurrent": runs, "all_answered": all(all(c) for c in checks)}


# -- weights -----------------------------------------------------------------------------------
def make_safetensors(src_model: str, dest: Path, shards: int = 4) -> dict:
    """Random bf16 weights of ``src_model``'s config (Llama names) as safetensors in ``dest``."""
    import torch
    from safetensors.torch import save_file

    if (dest / "model.safetensors.index.json").exists():
        return json.loads((dest / "thaw-bench.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src_model):
        if not name.endswith(".safetensors") and not os.path.isdir(os.path.join(src_model, name)):
            shutil.copy(os.path.join(src_model, name), dest / name)
    cfg = json.loads((dest / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    names = list(shapes)
    per = -(-len(names) // shards)
    index, total, start = {}, 0, time.perf_counter()
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for n in part:
            if n.endswith("norm.weight"):
                t = torch.ones(shapes[n], dtype=torch.bfloat16)
            else:
                t = (torch.randn(shapes[n], generator=gen, device=device, dtype=torch.float32) * 0.02).to(
                    torch.bfloat16
                )
            tensors[n] = t.cpu()
            total += tensors[n].numel() * 2
            index[n] = fname
        save_file(tensors, str(dest / fname), metadata={"format": "pt"})
        del tensors
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    info = {"nbytes": total, "write_s": time.perf_counter() - start, "tensors": len(names)}
    (dest / "thaw-bench.json").write_text(json.dumps(info))
    return info


def role_weights_engine(args: argparse.Namespace, io: Path) -> dict:
    """One fresh engine from safetensors or from a thaw file: start to first token, greedy output."""
    spec = json.loads(io.read_text())
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    thaw_log = logging.getLogger("thaw_agents")
    thaw_log.addHandler(handler)
    thaw_log.setLevel(logging.INFO)  # the loader's "restored ... GB/s, route" line
    import thaw_agents.weights as wv

    wv.register()  # the entry point registers it too where the package is installed
    from vllm import LLM

    import thaw_agents

    kw = overrides(args, load_format=spec["load_format"])
    if spec.get("snapshot"):
        kw["model_loader_extra_config"] = {"snapshot": spec["snapshot"]}
    kw.pop("max_model_len", None)
    start = time.perf_counter()
    llm = LLM(**thaw_agents.engine_kwargs(spec["model"], max_model_len=2048, **kw))
    built = time.perf_counter() - start
    tok = llm.get_tokenizer()
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 8)
    first_s, _ = ttft(llm, tok.encode("Hello there. " * 4), one_token())
    _, out = ttft(llm, ids, greedy(16))
    result = {
        "engine_build_s": built,
        "first_request_s": first_s,
        "start_to_first_token_s": built + first_s,
        "greedy": list(out.outputs[0].token_ids),
    }
    shutdown(llm)
    return result


def role_freeze(args: argparse.Namespace, io: Path) -> dict:
    spec = json.loads(io.read_text())
    from thaw_agents.weights import freeze_model, register

    register()
    kw = {"gpu_memory_utilization": args.gpu_mem} if _on_cuda() else {}
    start = time.perf_counter()
    freeze_model(spec["model"], spec["output"], **kw)
    return {"freeze_s": time.perf_counter() - start, "nbytes": os.path.getsize(spec["output"])}


def phase_weights(args: argparse.Namespace, scratch: Path) -> dict:
    st_dir = Path(args.weights_dir)
    info = make_safetensors(args.model, st_dir)
    snap = Path(args.shm_dir) / "thaw-bench-weights.thaw"
    out: dict[str, Any] = {"safetensors": info}
    io = scratch / "weights-st.json"
    io.write_text(json.dumps({"model": str(st_dir), "load_format": "auto"}))
    # The files were just written: they are in the page cache.
    run_role(args, "weights-engine", io)
    out["from_safetensors"] = json.loads(io.with_suffix(".out").read_text())
    io = scratch / "weights-freeze.json"
    io.write_text(json.dumps({"model": str(st_dir), "output": str(snap)}))
    if not snap.exists():
        run_role(args, "freeze", io)
        out["freeze"] = json.loads(io.with_suffix(".out").read_text())
    io = scratch / "weights-thaw.json"
    io.write_text(json.dumps({"model": str(st_dir), "load_format": "thaw", "snapshot": str(snap)}))
    run_role(args, "weights-engine", io)
    out["from_thaw_shm"] = json.loads(io.with_suffix(".out").read_text())
    out["greedy_equal"] = out["from_safetensors"]["greedy"] == out["from_thaw_shm"]["greedy"]
    if not args.keep_weights:
        snap.unlink(missing_ok=True)
    return out


# -- main --------------------------------------------------------------------------------------
ROLES = {
    "parent": role_parent,
    "child": role_child,
    "rounds": role_rounds,
    "chat": role_chat,
    "weights-engine": role_weights_engine,
    "freeze": role_freeze,
}


def _write(out_dir: Path, name: str, data: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--load-format", default=None, help="e.g. dummy (KV phases)")
    parser.add_argument("--phases", nargs="+", default=["hydrate", "rounds", "chat", "weights"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trunk-tokens", type=int, default=2000)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--gpu-mem", type=float, default=0.45)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--weights-dir", default="/var/tmp/thaw-bench-w8b")
    parser.add_argument("--keep-weights", action="store_true")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--file-dir", default="/var/tmp/thaw-bench-files")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--role-timeout", type=float, default=900)
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--io", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from thaw_agents.models import resolve_model

        args.model = str(resolve_model(None))
    args.passthrough = [
        "--model", args.model, "--max-model-len", str(args.max_model_len), "--gpu-mem", str(args.gpu_mem),
        "--repeats", str(args.repeats), "--rounds", str(args.rounds), "--branches", str(args.branches),
        "--max-tokens", str(args.max_tokens), "--trunk-tokens", str(args.trunk_tokens),
        "--file-dir", args.file_dir, "--shm-dir", args.shm_dir, "--weights-dir", args.weights_dir,
        "--lengths", *map(str, args.lengths), "--phases", *args.phases,
    ]  # fmt: skip
    if args.load_format:
        args.passthrough += ["--load-format", args.load_format]
    if args.eager:
        args.passthrough += ["--eager"]
    if args.role:
        result = ROLES[args.role](args, args.io)
        args.io.with_suffix(".out").write_text(json.dumps(result, default=str))
        return

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Parent and child share one store in shared memory (the same-host hand-off).
    store = Path(args.shm_dir) / f"thaw-bench-store-{os.getpid()}"
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["THAW_AGENTS_STORE"] = str(store)
    Path(args.file_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(args.file_dir) / f"io-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    info = machine()
    tag = f"-{args.tag}" if args.tag else ""
    summary: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "io"}}
    try:
        if "hydrate" in args.phases:
            io = scratch / "hydrate.json"
            run_role(args, "parent", io)
            parent = json.loads(io.with_suffix(".out").read_text())
            io.write_text(json.dumps(parent))
            run_role(args, "child", io)
            child = json.loads(io.with_suffix(".out").read_text())
            table, report = summarize_hydrate(parent, child)
            print_table(
                ["tokens", "mode", "TTFT ms", "load ms", "(load+TTFT)/re-prefill", "TTFT/hit", "served",
                 "restore ms", "greedy equal"],
                table,
            )  # fmt: skip
            data = {"machine": info, "spec": parent.get("spec"), "rows": report}
            if "rounds" in parent:
                data["rounds_cuda_graphs" if not args.eager else "rounds_eager"] = parent["rounds"]
                print(json.dumps(parent["rounds"], indent=1))
            print(_write(args.out_dir, f"gpu_hydrate{tag}", data))
            summary["hydrate"] = data
        if "rounds-eager" in args.phases:
            io = scratch / "rounds-eager.json"
            run_role(args, "rounds", io, ["--eager"])
            data = {"machine": info, "rounds_eager": json.loads(io.with_suffix(".out").read_text())}
            print(json.dumps(data["rounds_eager"], indent=1))
            print(_write(args.out_dir, f"gpu_rounds_eager{tag}", data))
        if "chat" in args.phases:
            io = scratch / "chat-batched.json"
            run_role(args, "chat", io)
            batched = json.loads(io.with_suffix(".out").read_text())["batched"]
            io = scratch / "chat-concurrent.json"
            run_role(args, "chat", io)
            conc = json.loads(io.with_suffix(".out").read_text())
            b = statistics.median(t / s for s, t in batched)
            c = statistics.median(t / s for s, t in conc["concurrent"])
            data = {
                "machine": info,
                "batched_runs": batched,
                "concurrent_runs": conc["concurrent"],
                "batched_tokens_per_s": b,
                "concurrent_tokens_per_s": c,
                "concurrent_over_batched": c / b,
                "all_answered": conc["all_answered"],
            }
            print_table(["mode", "tokens/s", "x batched"], [["batched", b, 1.0], ["concurrent", c, c / b]])
            print(_write(args.out_dir, f"gpu_chat{tag}", data))
        if "weights" in args.phases:
            data = {"machine": info, **phase_weights(args, scratch)}
            print(json.dumps({k: v for k, v in data.items() if k != "machine"}, indent=1, default=str))
            print(_write(args.out_dir, f"gpu_weights{tag}", data))
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
