"""What forking costs the other requests of an engine: the stall of a snapshot save.

One request decodes (greedy, a long ``max_tokens``) in an ``AsyncLLM`` while the script sends,
back to back, ``--forks`` fork requests of a ``--trunk``-token prefix that is already in the
prefix cache (each computes one token and saves the trunk's blocks, ~92 MB on the default
model). The decoding request's inter-token latency (ITL) is measured three ways, each in a
fresh decode:

  alone        nothing else runs
  plain        the same requests on the trunk without saving (their own small step cost)
  forks        the requests save snapshots (the stall a save adds to the others)

Both ways of writing run one after the other, each in its own engine: ``background`` (the
connector's writer thread, the default) and ``in-step`` (each snapshot written inside the engine
step, as the connector worked before; ``save_in_step`` in the connector config). ``--rounds``
repeats the three cases in turn and pools their samples, so the p99 rests on more than a few
dozen gaps. The goal: ITL p99 with forks / without forks <= 1.10, where "without" is ``plain``
(the same requests, no save: what remains is the save's own stall); forks / alone is printed too.
The load average is recorded: on a shared machine the figures are noise.

Prints a table and writes benchmarks/results/fork_stall-<machine>-<date>.json (or ``--out``).

Run: .venv/bin/python benchmarks/fork_stall.py [--trunk 4000] [--forks 8] [--rounds 3] [--only background]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import trunk_tokens, write_results

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
MODES = ("background", "in-step")


async def _one_token(front: Any, tokens: list[int], transfer: dict[str, Any] | None) -> dict | None:
    from vllm import SamplingParams

    from thaw_agents.front import Request

    params = SamplingParams(max_tokens=1, temperature=0.0)
    request = Request(token_ids=tokens, params=params, kv_transfer_params=transfer)
    (result,) = await front.agenerate([request], stream=False)
    return result.report


async def _fork(front: Any, spec: Any, tokens: list[int]) -> float:
    """One fork as thaw_agents.fork does it; the seconds until the snapshot is written."""
    from thaw_agents._manifest import derive_snapshot
    from thaw_agents.connector.params import await_save, save_failure, save_params

    start = time.perf_counter()
    sid = derive_snapshot(spec, tokens).snapshot_id
    report = await _one_token(front, tokens, save_params(sid, len(tokens)))
    while report and report.get("status") == "pending":  # await_save, without blocking the loop
        await asyncio.sleep(0.005)
        result = (await front.arpc("thaw_save_result", (sid,)))[0]
        report = result or report
    failure = save_failure(await_save(report, lambda: None), sid, sid)
    if failure is not None:
        raise failure
    return time.perf_counter() - start


async def _decode_while(front: Any, prompt: list[int], max_tokens: int, side: Any) -> list[float]:
    """Inter-token latencies (ms) of one greedy decode while ``side(stamps)`` runs beside it
    (``max_tokens`` must outlast it: tokens after the decode ends are not measured)."""
    from vllm import SamplingParams

    from thaw_agents.front import Request

    request = Request(
        token_ids=prompt, params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )
    stamps: list[float] = []  # one per token, when its delta arrived
    started = asyncio.Event()

    async def decode() -> None:
        async for delta in front.astream(request):
            stamps.extend([time.perf_counter()] * max(1, len(delta.token_ids)))
            if len(stamps) >= 8:
                started.set()

    task = asyncio.create_task(decode())
    await started.wait()  # measure in steady decoding, not the prefill
    first = len(stamps)
    await side(stamps)
    last = len(stamps)
    await task
    window = stamps[first - 1 : last]
    return [(b - a) * 1e3 for a, b in itertools.pairwise(window)]


def _p(values: list[float], q: int) -> float:
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def run(args: argparse.Namespace, save_in_step: bool) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import thaw_agents
    from thaw_agents._kvspec import KVSpec
    from thaw_agents.front import AsyncLLMFront

    kwargs = thaw_agents.engine_kwargs(
        args.model,
        max_model_len=args.trunk + 512,
        kv_connector_extra_config={"save_in_step": save_in_step},
    )
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    front = AsyncLLMFront(engine)
    itl: dict[str, list[float]] = {"alone": [], "plain": [], "forks": []}
    fork_s: list[float] = []
    try:
        spec = KVSpec.from_json((await front.adescribe())["spec"])
        tok = engine.tokenizer
        trunk = trunk_tokens(tok, args.trunk)
        prompt = tok.encode("Count slowly from one to a thousand: one, two, three,")
        await _fork(front, spec, trunk)  # the trunk in the prefix cache, the code paths warm

        async def alone(stamps: list[float]) -> None:
            target = len(stamps) + args.alone_tokens
            while len(stamps) < target:
                await asyncio.sleep(0.005)

        async def plain(stamps: list[float]) -> None:
            for _ in range(args.forks):
                await _one_token(front, trunk, None)

        async def forks(stamps: list[float]) -> None:
            for _ in range(args.forks):
                fork_s.append(await _fork(front, spec, trunk))

        for _ in range(args.rounds):
            for name, side in (("alone", alone), ("plain", plain), ("forks", forks)):
                itl[name] += await _decode_while(front, prompt, args.max_tokens, side)
    finally:
        engine.shutdown()
    rows = {
        name: {
            "tokens": len(values),
            "itl_p50_ms": _p(values, 50),
            "itl_p99_ms": _p(values, 99),
            "itl_max_ms": max(values) if values else float("nan"),
        }
        for name, values in itl.items()
    }
    return {
        "save_in_step": save_in_step,
        "snapshot_nbytes": (args.trunk // spec.block_size) * spec.block_nbytes,
        "fork_ms_median": statistics.median(fork_s) * 1e3 if fork_s else None,
        "itl": rows,
        "p99_ratio_forks_vs_plain": rows["forks"]["itl_p99_ms"] / rows["plain"]["itl_p99_ms"],
        "p99_ratio_forks_vs_alone": rows["forks"]["itl_p99_ms"] / rows["alone"]["itl_p99_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model path (default: the default model)")
    parser.add_argument("--trunk", type=int, default=4000, help="trunk tokens")
    parser.add_argument("--forks", type=int, default=8, help="forks saved while the request decodes")
    parser.add_argument("--max-tokens", type=int, default=400, help="tokens the decoding request makes")
    parser.add_argument("--alone-tokens", type=int, default=64, help="tokens measured alone")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alone/plain/forks, pooled")
    parser.add_argument("--only", choices=MODES, default=None, help="run one way of writing only")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args()
    modes = [args.only] if args.only else list(MODES)
    from thaw_agents._logfile import send_vllm_logs_to_file

    print(f"vLLM's log: {send_vllm_logs_to_file('fork_stall')}; writers: {', '.join(modes)}", flush=True)
    load_before = os.getloadavg()
    runs = {}
    for mode in modes:
        runs[mode] = asyncio.run(run(args, save_in_step=mode == "in-step"))
        gc.collect()  # the engine's finaliser runs now, not at interpreter exit
    result = {
        "benchmark": "fork_stall",
        "trunk_tokens": args.trunk,
        "forks_per_round": args.forks,
        "rounds": args.rounds,
        "runs": runs,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
    }

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ITL of a decoding request while forks of a {args.trunk}-token trunk are saved")
    for column in ("writer", "case", "tokens", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column in ("writer", "case") else "right")
    for mode, run_result in runs.items():
        for name, row in run_result["itl"].items():
            table.add_row(
                mode,
                name,
                str(row["tokens"]),
                f"{row['itl_p50_ms']:.1f}",
                f"{row['itl_p99_ms']:.1f}",
                f"{row['itl_max_ms']:.1f}",
            )
    console = Console()
    console.print(table)
    for mode, run_result in runs.items():
        console.print(
            f"{mode}: p99 forks/plain {run_result['p99_ratio_forks_vs_plain']:.2f} (goal <= 1.10), "
            f"forks/alone {run_result['p99_ratio_forks_vs_alone']:.2f}; a fork took "
            f"{run_result['fork_ms_median'] or 0:.0f} ms (median)"
        )
    console.print(f"load average (1 min) before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}")
    print(write_results("fork_stall", result, args.out))


if __name__ == "__main__":
    main()
