"""Fork over HTTP: one trunk, 4 branches on ``thaw-agents serve``, against re-prefill and in-process.

Each round is a new conversation: a trunk of about --trunk-tokens tokens (different every round
and mode) and --branches branches (the trunk plus a short question each), --max-tokens tokens
each (greedy), all branches of a round sent at once and streamed. --rounds rounds per mode, after
one warm-up round:

  re-prefill       the ``openai`` client; every branch computes the whole prompt (a unique
                   ``cache_salt`` per request keeps vLLM's prefix cache out)
  snapshot         the ``openai`` client; the trunk is snapshotted (POST /v1/thaw/snapshots), then
                   every branch names it in ``kv_transfer_params`` and has its own ``cache_salt``:
                   the trunk's KV comes from the snapshot file, not from the prefix cache
  ChatThaw http    ``ChatThaw(base_url=...)`` as ``fork_fanout`` runs a round: the trunk is
                   snapshotted on the server, each branch streams with ``fork=<id>`` (the server's
                   prefix cache still holds the trunk, so no file is read)
  ChatThaw local   the same round with an in-process ``ChatThaw`` (same model, same engine
                   arguments) beside the server; the modes' rounds are interleaved

Per branch: TTFT (request sent to first text chunk, as the client sees it) and tokens served from
cache or snapshot; per round: wall time (snapshot included). Goals: snapshot TTFT <= 0.2x
re-prefill; ChatThaw over HTTP <= 1.2x in-process for the same round.

Prints a table and writes benchmarks/results/serve_fanout-<machine>-<date>.json (or --out).

Run: .venv/bin/python benchmarks/serve_fanout.py [--rounds 3] [--url http://host:8000 --api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

QUESTIONS = (
    "What is the biggest risk in these orders?",
    "Which customer should we call first, and why?",
    "Summarise the refunds in two sentences.",
    "What would you automate in this workflow?",
    "Which warehouse is the bottleneck?",
    "List three follow-up tasks for the team.",
)
WORDS = ("inventory", "shipment", "invoice", "warehouse", "customer", "order", "delay", "refund")


def trunk(seed: int, lines: int) -> list[dict[str, str]]:
    """A readable operations log, different for every ``seed``."""
    log = [f"Operations log {seed} for region {seed * 13 % 97}."]
    log += [f"Item {i}: {WORDS[(i + seed) % len(WORDS)]} {(i * 7 + seed) % 1000}." for i in range(lines)]
    return [
        {"role": "system", "content": "You are an operations analyst. Answer briefly."},
        {"role": "user", "content": "\n".join(log)},
    ]


def branches(messages: list[dict[str, str]], count: int) -> list[list[dict[str, str]]]:
    return [[*messages, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(count)]


# -- the server ------------------------------------------------------------------------------
def start_server(args: argparse.Namespace, store: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [
        sys.executable, "-m", "thaw_agents.cli", "serve", args.model, "--port", str(port),
        "--api-key", args.api_key, "--max-model-len", str(args.max_model_len), "--seed", "0",
    ]  # fmt: skip
    env = {**os.environ, "THAW_AGENTS_STORE": str(store), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = open(store.parent / "server.log", "wb")  # noqa: SIM115 - the server owns it until it exits
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {store.parent / 'server.log'}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as resp:
            if resp.status == 200:
                return proc, url
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError("the server did not start in 600 s")


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# -- rounds with the openai client -----------------------------------------------------------
async def openai_branch(client: Any, model: str, messages: list, extra: dict, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft = None
    usage = None
    stream = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    return {
        "ttft_s": ttft if ttft is not None else time.perf_counter() - start,
        "total_s": time.perf_counter() - start,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage else None,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "output_tokens": usage.completion_tokens if usage else None,
    }


async def openai_round(url: str, model: str, args: argparse.Namespace, seed: int, snapshot: bool) -> dict:
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0) as client:
        return await _openai_round(client, model, args, seed, snapshot)


async def _openai_round(client: Any, model: str, args: argparse.Namespace, seed: int, snapshot: bool) -> dict:
    start = time.perf_counter()
    messages = trunk(seed, args.lines)
    snap: dict[str, Any] = {}
    if snapshot:
        snap = await client.post("/thaw/snapshots", body={"messages": messages}, cast_to=object)
    snapshot_s = time.perf_counter() - start

    def extra() -> dict:
        body: dict[str, Any] = {"cache_salt": uuid.uuid4().hex}
        if snapshot:
            body["kv_transfer_params"] = {"thaw": {"snapshot_id": snap["id"]}}
        return body

    results = await asyncio.gather(
        *(
            openai_branch(client, model, b, extra(), args.max_tokens)
            for b in branches(messages, args.branches)
        )
    )
    return {
        "round_s": time.perf_counter() - start,
        "snapshot_s": snapshot_s if snapshot else None,
        "snapshot_tokens": snap.get("num_snapshot_tokens"),
        "branches": results,
    }


# -- rounds with ChatThaw (over HTTP or in-process) --------------------------------------------
async def chat_branch(llm: Any, messages: list, fork: Any) -> dict:
    start = time.perf_counter()
    ttft = None
    last = None
    async for chunk in llm.astream(messages, fork=fork):
        if ttft is None and chunk.content:
            ttft = time.perf_counter() - start
        last = chunk
    usage = last.usage_metadata if last is not None else None
    return {
        "ttft_s": ttft if ttft is not None else time.perf_counter() - start,
        "total_s": time.perf_counter() - start,
        "cached_tokens": usage["input_token_details"]["cache_read"] if usage else None,
        "prompt_tokens": usage["input_tokens"] if usage else None,
        "output_tokens": usage["output_tokens"] if usage else None,
    }


async def chat_round(llm: Any, args: argparse.Namespace, seed: int) -> dict:
    from langchain_core.messages import convert_to_messages

    from thaw_agents.integrations.langgraph import _snapshot  # what fork_fanout runs

    start = time.perf_counter()
    messages = trunk(seed, args.lines)
    handle = await asyncio.to_thread(_snapshot, llm, list(convert_to_messages(messages)))
    snapshot_s = time.perf_counter() - start
    results = await asyncio.gather(*(chat_branch(llm, b, handle) for b in branches(messages, args.branches)))
    return {
        "round_s": time.perf_counter() - start,
        "snapshot_s": snapshot_s,
        "snapshot_tokens": handle.num_snapshot_tokens if handle else None,
        "branches": results,
    }


def run_rounds(makers: dict[str, Any], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Rounds of every mode, interleaved (mode after mode within a round), so that a change in
    the machine's load falls on every mode alike; round 0 warms up. Every round of every mode
    has a trunk of its own, except that ChatThaw over HTTP and in-process get the same ones."""
    out: dict[str, list[dict]] = {name: [] for name in makers}
    for index in range(args.rounds + 1):
        for number, (name, make_round) in enumerate(makers.items()):
            base = 3000 if name == "ChatThaw local" else 1000 * (number + 1)  # local: http's trunks
            result = asyncio.run(make_round(base + index))
            if index:
                out[name].append(result)
            ttfts = [b["ttft_s"] for b in result["branches"]]
            print(
                f"{name:15s} round {index}{' (warm-up)' if not index else ''}: {result['round_s']:.2f} s, "
                f"TTFT {min(ttfts):.3f}-{max(ttfts):.3f} s, cached "
                f"{[b['cached_tokens'] for b in result['branches']]}",
                flush=True,
            )
    return out


def lines_for(tokens: int, count: Any) -> int:
    """The log length whose trunk has about ``tokens`` tokens (``count``: messages -> tokens)."""
    lines = max(8, tokens // 8)
    for _ in range(6):
        got = count(trunk(0, lines))
        lines = max(8, round(lines * tokens / got))
    return lines


def summary(rounds: list[dict]) -> dict[str, Any]:
    all_branches = [b for r in rounds for b in r["branches"]]
    return {
        "ttft_s": statistics.median(b["ttft_s"] for b in all_branches),
        "branch_s": statistics.median(b["total_s"] for b in all_branches),
        "round_s": statistics.median(r["round_s"] for r in rounds),
        "snapshot_s": statistics.median(r["snapshot_s"] for r in rounds) if rounds[0]["snapshot_s"] else None,
        "cached_tokens": statistics.median(b["cached_tokens"] or 0 for b in all_branches),
        "prompt_tokens": statistics.median(b["prompt_tokens"] or 0 for b in all_branches),
        "output_tokens": statistics.median(b["output_tokens"] or 0 for b in all_branches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--trunk-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--url", default=None, help="an running thaw-agents serve (default: start one)")
    parser.add_argument("--api-key", default="bench-" + uuid.uuid4().hex[:8])
    parser.add_argument("--skip-local", action="store_true", help="no in-process ChatThaw round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        from thaw_agents.models import default_model

        args.model = str(default_model(progress=False))

    import openai

    from thaw_agents.integrations.langchain import ChatThaw

    modes: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="thaw-serve-bench-") as tmp:
        proc, url = (None, args.url) if args.url else start_server(args, Path(tmp) / "store")
        local = None
        try:
            sync = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key)
            served = sync.models.list().data[0].id

            def count(messages: list) -> int:  # vLLM's /tokenize renders like the chat path
                body = {"model": served, "messages": messages, "add_generation_prompt": False}
                return int(sync.post(url + "/tokenize", body=body, cast_to=object)["count"])

            args.lines = lines_for(args.trunk_tokens, count)
            remote = ChatThaw(base_url=url, api_key=args.api_key, temperature=0, max_tokens=args.max_tokens)
            makers: dict[str, Any] = {
                "re-prefill": lambda seed: openai_round(url, served, args, seed, False),
                "snapshot": lambda seed: openai_round(url, served, args, seed, True),
                "ChatThaw http": lambda seed: chat_round(remote, args, seed),
            }
            if not args.skip_local:
                local = ChatThaw(
                    model=args.model,
                    temperature=0,
                    max_tokens=args.max_tokens,
                    engine_kwargs={"max_model_len": args.max_model_len, "seed": 0},
                )
                makers["ChatThaw local"] = lambda seed: chat_round(local, args, seed)
            modes = run_rounds(makers, args)
            remote.close()
        finally:
            if local is not None:
                local.close()
            if proc is not None:
                stop_server(proc)

    stats = {mode: summary(rounds) for mode, rounds in modes.items()}
    base_ttft = stats["re-prefill"]["ttft_s"]
    rows = [
        [
            mode,
            s["ttft_s"],
            s["ttft_s"] / base_ttft,
            s["branch_s"],
            s["round_s"],
            s["snapshot_s"] if s["snapshot_s"] is not None else "-",
            int(s["cached_tokens"]),
            int(s["prompt_tokens"]),
            int(s["output_tokens"]),
        ]
        for mode, s in stats.items()
    ]
    print()
    print_table(
        ["mode", "TTFT s", "x re-prefill", "branch s", "round s", "snapshot s", "cached", "prompt", "output"],
        rows,
    )
    goals = {
        "snapshot_ttft_over_reprefill": {"value": stats["snapshot"]["ttft_s"] / base_ttft, "goal": 0.2},
    }
    if "ChatThaw local" in stats:
        http, local_s = stats["ChatThaw http"], stats["ChatThaw local"]
        goals["http_round_over_inprocess"] = {"value": http["round_s"] / local_s["round_s"], "goal": 1.2}
        goals["http_ttft_over_inprocess"] = {"value": http["ttft_s"] / local_s["ttft_s"], "goal": 1.2}
    for goal in goals.values():
        goal["met"] = goal["value"] <= goal["goal"]
    print()
    for name, goal in goals.items():
        print(f"{name}: {goal['value']:.3f} (goal <= {goal['goal']}: {'met' if goal['met'] else 'NOT met'})")
    params = {k: v for k, v in vars(args).items() if k not in {"api_key", "out"}}
    params["VLLM_ENABLE_V1_MULTIPROCESSING (in-process)"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    path = write_results(
        "serve_fanout",
        {"benchmark": "serve_fanout", "parameters": params, "summary": stats, "goals": goals, "modes": modes},
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
