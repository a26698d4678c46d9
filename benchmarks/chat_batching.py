"""ChatThaw under concurrency vs vLLM's own batched chat, on the same N chat prompts.

For each concurrency N (default 8 and 64; 64 max tokens, temperatures 0.0 .. 0.7, seeded):

  batched chat   one ``vllm.LLM.chat`` call with all N conversations (the baseline: vLLM's
                 own offline batching)
  asyncllm       N concurrent ``AsyncLLM.generate`` calls on ChatThaw's own engine, final
                 output only, prompts rendered beforehand (what the engine gives with no
                 ChatThaw code at all)
  concurrent     N concurrent ``ChatThaw.ainvoke`` calls
  sequential     N ``ChatThaw.invoke`` calls one after another (N <= 8 only)

Then ChatThaw's own Python work per call: one-token ``ainvoke`` calls one at a time against
the same call straight to the engine, alternating (median difference, in ms).

Both engines live side by side for the whole run (each engine core in its own process, as
vLLM runs by default), and the modes alternate within every round, so machine load hits all
of them alike. Reports output tokens per second, median over ``--repeats`` rounds after a
warm-up, and the ratio to the batched baseline of the same N (goals: concurrent >= 0.97x at
8, >= 0.95x at 64). Prints a table and writes JSON (``--out FILE``, else
benchmarks/results/chat_batching-<machine>-<date>.json).

Run: python benchmarks/chat_batching.py [--repeats 5] [--concurrency 8 64] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

TOPICS = ["the sea", "a library", "winter", "a train", "coffee", "a garden", "the moon", "a market"]
GOALS = {8: 0.97, 64: 0.95}
ENGINE = {"max_model_len": 2048, "kv_cache_memory_bytes": 1 << 30}


def _prompts(n: int) -> list[str]:
    return [
        f"Write a short poem about {TOPICS[i % 8]}" + ("." if i < 8 else f", take {i // 8}.")
        for i in range(n)
    ]


def _sampling(i: int) -> dict[str, Any]:
    return {"temperature": 0.1 * (i % 8), "seed": i}


class Bench:
    """The two engines and one timed round of each mode."""

    def __init__(self, args: argparse.Namespace) -> None:
        from vllm import SamplingParams

        import thaw_agents
        from thaw_agents.integrations.langchain import ChatThaw

        self.max_tokens = args.max_tokens
        self.llm = thaw_agents.make_llm(args.model, **ENGINE)
        self.chat = ChatThaw(model=args.model, max_tokens=args.max_tokens, engine_kwargs=dict(ENGINE))
        self.params = [
            SamplingParams(max_tokens=args.max_tokens, **_sampling(i)) for i in range(max(args.concurrency))
        ]

    def close(self) -> None:
        self.chat.close()
        self.llm.llm_engine.engine_core.shutdown()

    def batched(self, n: int) -> int:
        convs = [[{"role": "user", "content": p}] for p in _prompts(n)]
        outs = self.llm.chat(convs, self.params[:n], use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def concurrent(self, n: int) -> int:
        async def run() -> list[Any]:
            calls = [self.chat.ainvoke(p, **_sampling(i)) for i, p in enumerate(_prompts(n))]
            return await asyncio.gather(*calls)

        return sum(m.usage_metadata["output_tokens"] for m in asyncio.run(run()))

    def sequential(self, n: int) -> int:
        msgs = [self.chat.invoke(p, **_sampling(i)) for i, p in enumerate(_prompts(n))]
        return sum(m.usage_metadata["output_tokens"] for m in msgs)

    def asyncllm(self, n: int, prompts: list[list[int]]) -> int:
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from thaw_agents.integrations import _runtime

        engine = _runtime.acquire(self.chat._engine_args()).result().engine

        async def one(i: int) -> int:
            params = self.params[i].clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY
            last = None
            async for out in engine.generate(
                TokensPrompt(prompt_token_ids=prompts[i]), params, f"bench-{i}-{time.time()}"
            ):
                last = out
            return len(last.outputs[0].token_ids)

        async def run() -> int:
            return sum(await asyncio.gather(*(one(i) for i in range(n))))

        return _runtime.runtime.run(run())

    def call_overhead(self, calls: int) -> dict[str, float]:
        """ChatThaw's own Python work per call: one-token calls one at a time, ``ainvoke`` vs the
        raw engine (prompt rendered beforehand), alternating; the median difference."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from thaw_agents.integrations import _runtime

        prompt = _prompts(1)
        (ids,) = self.rendered(1)

        engine = _runtime.acquire(self.chat._engine_args()).result().engine
        params = SamplingParams(max_tokens=1, temperature=0, output_kind=RequestOutputKind.FINAL_ONLY)

        async def raw() -> None:
            async for _ in engine.generate(
                TokensPrompt(prompt_token_ids=ids), params, f"ovh-{time.time_ns()}"
            ):
                pass

        chat, raw_s = [], []
        for _ in range(calls):
            start = time.perf_counter()
            asyncio.run(self.chat.ainvoke(prompt[0], max_tokens=1, temperature=0))
            chat.append(time.perf_counter() - start)
            start = time.perf_counter()
            _runtime.runtime.run(raw())
            raw_s.append(time.perf_counter() - start)
        return {
            "chatthaw_ms": statistics.median(chat) * 1e3,
            "raw_engine_ms": statistics.median(raw_s) * 1e3,
            "overhead_ms": statistics.median(a - b for a, b in zip(chat, raw_s, strict=True)) * 1e3,
        }

    def rendered(self, n: int) -> list[list[int]]:
        from thaw_agents.integrations import _runtime
        from thaw_agents.integrations._request import prompt_token_ids

        engine = _runtime.acquire(self.chat._engine_args()).result().engine

        async def run() -> list[list[int]]:
            return [await prompt_token_ids(engine, [{"role": "user", "content": p}]) for p in _prompts(n)]

        return _runtime.runtime.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--overhead-calls", type=int, default=20, help="one-token calls timed for the overhead"
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds, concurrency 8 only")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.concurrency = 3, [8]
    # Each engine core in its own process (vLLM's default), so the two engines can live side by side.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    bench = Bench(args)
    runs: dict[tuple[int, str], list[tuple[float, int]]] = {}
    try:
        prompts = {n: bench.rendered(n) for n in args.concurrency}
        modes = {
            "batched chat": bench.batched,
            "asyncllm": lambda n: bench.asyncllm(n, prompts[n]),
            "concurrent": bench.concurrent,
            "sequential": bench.sequential,
        }
        for n in args.concurrency:  # warm-up
            for name, mode in modes.items():
                if name != "sequential" or n <= 8:
                    mode(n)
        for r in range(args.repeats):
            for n in args.concurrency:
                order = list(modes.items())
                order = order if r % 2 == 0 else order[::-1]  # alternate who goes first
                for name, mode in order:
                    if name == "sequential" and n > 8:
                        continue
                    start = time.perf_counter()
                    tokens = mode(n)
                    runs.setdefault((n, name), []).append((time.perf_counter() - start, tokens))
            print(f"round {r + 1}/{args.repeats} done", flush=True)
        overhead = bench.call_overhead(args.overhead_calls)
    finally:
        bench.close()
    rows, cases = [], []
    for n in args.concurrency:
        base = statistics.median(t / s for s, t in runs[(n, "batched chat")])
        for name in modes:
            if (n, name) not in runs:
                continue
            mode_runs = runs[(n, name)]
            tps = statistics.median(t / s for s, t in mode_runs)
            # The ratio per round (same round, same load), then the median of those.
            paired = statistics.median(
                (t / s) / (bt / bs)
                for (s, t), (bs, bt) in zip(mode_runs, runs[(n, "batched chat")], strict=True)
            )
            rows.append([n, name, statistics.median(s for s, _ in mode_runs), tps, paired])
            case = {"concurrency": n, "mode": name, "tokens_per_s": tps, "ratio_to_batched": paired}
            case |= {"baseline_tokens_per_s": base, "runs": mode_runs}
            if name == "concurrent" and n in GOALS:
                case |= {"goal": GOALS[n], "met": paired >= GOALS[n]}
            cases.append(case)
    print()
    print_table(["N", "mode", "seconds", "tokens/s", "x batched"], rows)
    for case in cases:
        if "goal" in case:
            met = "met" if case["met"] else "NOT met"
            print(
                f"concurrent {case['concurrency']}: {case['ratio_to_batched']:.3f}x "
                f"(goal >= {case['goal']}: {met})"
            )
    print(
        f"per call (one token, one at a time): ChatThaw {overhead['chatthaw_ms']:.1f} ms, raw engine "
        f"{overhead['raw_engine_ms']:.1f} ms, ChatThaw's own work {overhead['overhead_ms']:.2f} ms"
    )
    path = write_results(
        "chat_batching",
        {
            "benchmark": "chat_batching",
            "parameters": vars(args) | {"out": None},
            "cases": cases,
            "call_overhead": overhead,
            "notes": "tokens/s median over rounds; x batched = median over rounds of the ratio to the "
            "batched LLM.chat of the same round (both engines alive, modes alternating).",
        },
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
