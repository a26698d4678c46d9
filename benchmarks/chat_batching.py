"""ChatThaw under concurrency vs vLLM's own batched generate, on the same 8 chat prompts.

Three ways to answer 8 prompts (64 max tokens, temperatures 0.0 .. 0.7, seeded):

  batched generate  one ``vllm.LLM.chat`` call with all 8 conversations (the baseline: vLLM's
                    own offline batching)
  concurrent        8 concurrent ``ChatThaw.ainvoke`` calls (continuous batching in AsyncLLM)
  sequential        8 ``ChatThaw.invoke`` calls, one after another

Reports output tokens per second and the ratio to the batched baseline (goal: concurrent >=
0.9x). Each mode runs --repeats times after a warm-up; the median is reported. Prints a table
and writes benchmarks/results/chat_batching-<machine>-<date>.json.

Run: .venv/bin/python benchmarks/chat_batching.py [--repeats 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results

TOPICS = ["the sea", "a library", "winter", "a train", "coffee", "a garden", "the moon", "a market"]


def _conversations() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a short poem about {t}."}] for t in TOPICS]


def bench_generate(args: argparse.Namespace) -> list[tuple[float, int]]:
    from vllm import SamplingParams

    import thaw_agents

    llm = thaw_agents.make_llm(args.model, max_model_len=2048)
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=0.1 * i, seed=i) for i in range(8)]
    llm.chat(_conversations(), params, use_tqdm=False)  # warm-up
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.chat(_conversations(), params, use_tqdm=False)
        runs.append((time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)))
    llm.llm_engine.engine_core.shutdown()
    return runs


def bench_chatthaw(args: argparse.Namespace) -> dict[str, list[tuple[float, int]]]:
    from thaw_agents.integrations.langchain import ChatThaw

    chat = ChatThaw(model=args.model, max_tokens=args.max_tokens, engine_kwargs={"max_model_len": 2048})
    convs = [c[0]["content"] for c in _conversations()]

    async def concurrent() -> list:
        return await asyncio.gather(
            *[chat.ainvoke(p, temperature=0.1 * i, seed=i) for i, p in enumerate(convs)]
        )

    asyncio.run(concurrent())  # warm-up
    out: dict[str, list[tuple[float, int]]] = {"concurrent": [], "sequential": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        msgs = asyncio.run(concurrent())
        out["concurrent"].append(
            (time.perf_counter() - start, sum(m.usage_metadata["output_tokens"] for m in msgs))
        )
        start = time.perf_counter()
        msgs = [chat.invoke(p, temperature=0.1 * i, seed=i) for i, p in enumerate(convs)]
        out["sequential"].append(
            (time.perf_counter() - start, sum(m.usage_metadata["output_tokens"] for m in msgs))
        )
    chat.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    modes = {"batched generate": bench_generate(args), **bench_chatthaw(args)}
    tps = {m: statistics.median(tokens / secs for secs, tokens in runs) for m, runs in modes.items()}
    base = tps["batched generate"]
    rows, cases = [], []
    for mode, runs in modes.items():
        secs = statistics.median(s for s, _ in runs)
        tokens = statistics.median(t for _, t in runs)
        rows.append([mode, secs, tokens, tps[mode], tps[mode] / base])
        cases.append(
            {
                "mode": mode,
                "seconds": secs,
                "output_tokens": tokens,
                "tokens_per_s": tps[mode],
                "ratio_to_batched": tps[mode] / base,
                "runs": runs,
            }
        )
    print()
    print_table(["mode", "seconds", "output tokens", "tokens/s", "x batched"], rows)
    path = write_results(
        "chat_batching",
        {"benchmark": "chat_batching", "parameters": vars(args) | {"out": None}, "cases": cases},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
