"""RL rollout simulator: tree-GRPO style rollouts from a snapshotted trunk and a nested pivot fork.

What it shows:
1. a trunk (a few-shot arithmetic problem prompt, about 1,000 tokens) is prefilled once and
   forked to a snapshot; 16 seeded rollouts are sampled from it, each loading the trunk's KV
   from the snapshot instead of prefilling it;
2. every rollout gets a programmatic reward (below); a pivot is chosen in the middle of the best
   rollout, the trunk snapshot is forked again at the pivot (a fork of a fork: a child snapshot
   that stores only the blocks after its parent's), and N rollouts are resampled from the pivot;
3. side by side, the same algorithm on an engine without prefix caching (the baseline: every
   rollout prefills its whole prompt): per-rollout TTFT, phase times, prompt tokens prefilled vs
   copied from snapshots.

Each mode runs in its own fresh engine process, one after the other. In thaw mode the engine's
prefix cache is cleared after each fork, so the rollouts start from the snapshot files as a
separate rollout worker would (vLLM reports those tokens as ``num_cached_tokens``), not from the
KV that the fork request left behind.

The reward (deliberately simple, programmatic, no model in the loop):
  +1.00  the first ``Answer: <number>`` line gives the right number;
  +0.25  there is an ``Answer: <number>`` line at all (format);
  +0.25  times the fraction of the problem's given numbers quoted in the reasoning (grounding);
  -0.002 per generated token (brevity).

Run (the default model on a CPU, a few minutes; ``--small`` for a smoke test)::

    .venv/bin/python demos/rl_rollout_simulator.py [--model PATH] [--small] [--json out.json]

The engines are kept small (512 MiB of KV cache, 4,096-token context); with a bigger model on a
GPU, raise ``--kv-cache-mib``. ``--help`` lists the size options.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Any

import _demo  # a sibling module: this file runs as a script

SYSTEM = (
    "You solve arithmetic word problems. Reason in one or two short sentences, "
    "then write the final line as 'Answer: <number>'."
)
# (question, reasoning, answer) templates for the few-shot part of the trunk.
TEMPLATES = (
    (
        "A shop sells pencils at {a} cents each. How much do {b} pencils cost, in cents?",
        "Each pencil costs {a} cents, so {b} pencils cost {a} x {b} = {ab} cents.",
        "{ab}",
    ),
    (
        "A train travels {ab} km in {b} hours. What is its average speed in km per hour?",
        "Speed is distance divided by time: {ab} / {b} = {a} km per hour.",
        "{a}",
    ),
    (
        "Tom has {a} apples and buys {b} more. How many apples does he have now?",
        "He starts with {a} apples and adds {b}, so {a} + {b} = {apb} apples.",
        "{apb}",
    ),
    (
        "A box holds {ab} cookies shared equally by {b} children. How many cookies does each child get?",
        "Each child gets {ab} / {b} = {a} cookies.",
        "{a}",
    ),
)
PAIRS = ((7, 3), (12, 4), (9, 6), (15, 2), (8, 5))
PROBLEM = "A cyclist rides 45 km in 3 hours. What is her average speed in km per hour?"
ANSWER = 15
GIVEN = (45, 3)


def trunk_messages() -> list[dict[str, str]]:
    """The problem prompt: worked examples, then the problem."""
    shots = []
    for index, (a, b) in enumerate(PAIRS):
        for question, reasoning, answer in TEMPLATES[index % 2 :] + TEMPLATES[: index % 2]:
            values = {"a": a, "b": b, "ab": a * b, "apb": a + b}
            shots.append(
                f"Question: {question.format(**values)}\n{reasoning.format(**values)}\n"
                f"Answer: {answer.format(**values)}"
            )
    user = "Here are worked examples.\n\n" + "\n\n".join(shots)
    user += f"\n\nNow solve this one.\nQuestion: {PROBLEM}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def reward(text: str, num_tokens: int) -> tuple[float, dict[str, Any]]:
    """The programmatic reward described in the module docstring, with its parts."""
    match = re.search(r"Answer:\s*(-?\d+(?:\.\d+)?)", text)
    answer = float(match.group(1)) if match else None
    reasoning = text[: match.start()] if match else text
    quoted = sum(1 for n in GIVEN if re.search(rf"(?<![\d.]){n}(?![\d.])", reasoning))
    parts = {
        "correct": 1.0 if answer is not None and answer == ANSWER else 0.0,
        "format": 0.25 if match else 0.0,
        "grounding": 0.25 * quoted / len(GIVEN),
        "brevity": -0.002 * num_tokens,
    }
    return round(sum(parts.values()), 3), parts


# -- one mode, in a fresh engine process -------------------------------------------------------
def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.renderers import ChatParams

    import thaw_agents

    thaw = args.phase == "thaw"
    started = time.perf_counter()
    kwargs = {**_demo.ENGINE_KWARGS, "kv_cache_memory_bytes": args.kv_cache_mib << 20}
    if not thaw:
        kwargs["enable_prefix_caching"] = False  # the baseline: every request prefills its prompt
    # Every prompt of a batch prefills in one step. vLLM 0.32's CPU backend fails a seeded request
    # whose prefill is split over steps ("CPU Generator does not use offset"), which is what the
    # baseline's long prompts would otherwise get.
    max_model_len = kwargs["max_model_len"]
    kwargs["max_num_batched_tokens"] = max_model_len * max(args.rollouts, args.pivot_rollouts, 2)
    llm = thaw_agents.make_llm(args.model, **kwargs)
    engine_start_s = time.perf_counter() - started
    _demo.report(f"{args.phase}: engine started in {engine_start_s:.1f} s; {args.rollouts} trunk rollouts")
    _demo.warm_up(llm)
    trunk = list(
        llm.renderer.render_chat(
            [trunk_messages()], ChatParams(chat_template_kwargs={"add_generation_prompt": True})
        )[1][0]["prompt_token_ids"]
    )

    def sampling(seed: int, max_tokens: int) -> Any:
        return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=seed)

    result: dict[str, Any] = {"mode": args.phase, "trunk_tokens": len(trunk)}
    result["engine_start_s"] = engine_start_s
    handle = child = None
    try:
        # Phase 1: rollouts from the trunk.
        phase_start = time.perf_counter()
        params = [sampling(1000 + i, args.max_tokens) for i in range(args.rollouts)]
        if thaw:
            fork_start = time.perf_counter()
            handle = thaw_agents.fork(llm, trunk)
            result["fork_trunk"] = {
                "id": handle.id,
                "s": time.perf_counter() - fork_start,
                "prefilled_tokens": len(trunk),  # a fresh engine: nothing of the trunk was cached
                "snapshot_tokens": handle.num_snapshot_tokens,
                "files": len(handle.paths),
                "bytes": handle.nbytes,
            }
            llm.reset_prefix_cache()  # rollouts now start from the snapshot file
            params = [thaw_agents.with_fork(p, handle) for p in params]
        rows, batch_s = _demo.timed_generate(llm, [trunk] * args.rollouts, params)
        for row in rows:
            row["reward"], row["reward_parts"] = reward(row["text"], row["output_tokens"])
        result["rollouts"] = rows
        result["rollouts_batch_s"] = batch_s
        result["trunk_phase_s"] = time.perf_counter() - phase_start

        # The pivot: the middle of the best rollout (ties: the first).
        best = max(range(len(rows)), key=lambda i: (rows[i]["reward"], -i))
        generated = rows[best]["token_ids"]
        pivot_tokens = generated[: max(1, len(generated) // 2)]
        pivot_prompt = trunk + pivot_tokens
        result["pivot"] = {
            "rollout": best,
            "reward": rows[best]["reward"],
            "tokens": len(pivot_tokens),
            "text": llm.get_tokenizer().decode(pivot_tokens),
        }

        # Phase 2: resample from the pivot.
        _demo.report(f"{args.phase}: best rollout #{best}; {args.pivot_rollouts} rollouts from its middle")
        phase_start = time.perf_counter()
        remaining = max(1, args.max_tokens - len(pivot_tokens))
        params = [sampling(2000 + j, remaining) for j in range(args.pivot_rollouts)]
        if thaw:
            assert handle is not None
            fork_start = time.perf_counter()
            child = handle.fork(llm, pivot_tokens)  # a fork of a fork: the nested snapshot
            result["fork_pivot"] = {
                "s": time.perf_counter() - fork_start,
                # Tokens the child covers beyond its parent's snapshot: the most the fork request
                # can have computed (the engine may serve some from its prefix cache).
                "new_tokens": len(pivot_prompt) - handle.num_snapshot_tokens,
                "snapshot_tokens": child.num_snapshot_tokens,
                "files": len(child.paths),
                "id": child.id,
                "parent": child.manifests[-1].parent.snapshot_id if child.manifests[-1].parent else None,
                "chain": [p.name for p in child.paths],
                "bytes_own": child.manifests[-1].container.payload_nbytes,
            }
            llm.reset_prefix_cache()  # pivot rollouts load the chain: trunk file + child file
            params = [thaw_agents.with_fork(p, child) for p in params]
        rows, batch_s = _demo.timed_generate(llm, [pivot_prompt] * args.pivot_rollouts, params)
        for row in rows:
            text = result["pivot"]["text"] + row["text"]
            row["reward"], row["reward_parts"] = reward(text, len(pivot_tokens) + row["output_tokens"])
        result["pivot_rollouts"] = rows
        result["pivot_batch_s"] = batch_s
        result["pivot_phase_s"] = time.perf_counter() - phase_start
    finally:
        if child is not None:
            child.delete()
        if handle is not None:
            handle.delete()
    result["total_s"] = result["trunk_phase_s"] + result["pivot_phase_s"]
    return result


# -- the orchestrating process -----------------------------------------------------------------
def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests": len(rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "prefilled_tokens": sum(r["prefilled_tokens"] for r in rows),
        "cached_tokens": sum(r["cached_tokens"] for r in rows),
        "mean_ttft_s": statistics.fmean(r["ttft_s"] for r in rows),
        "mean_reward": statistics.fmean(r["reward"] for r in rows),
        "best_reward": max(r["reward"] for r in rows),
    }


def print_report(thaw: dict[str, Any], base: dict[str, Any]) -> None:
    ms = _demo.ms
    for phase, label in (("rollouts", "trunk rollout"), ("pivot_rollouts", "pivot rollout")):
        table = []
        for i, (t, b) in enumerate(zip(thaw[phase], base[phase], strict=True)):
            table.append(
                [
                    f"{label} {i:2d}",
                    f"{t['reward']:+.2f}",
                    f"{b['reward']:+.2f}",
                    ms(t["ttft_s"]),
                    ms(b["ttft_s"]),
                    t["prompt_tokens"],
                    t["prefilled_tokens"],
                    t["cached_tokens"],
                    b["prefilled_tokens"],
                    b["cached_tokens"],
                ]
            )
        _demo.print_table(
            f"{label}s, thaw vs baseline (prompt tokens: prefilled / from snapshot)",
            [
                label,
                "reward thaw",
                "reward base",
                "TTFT thaw",
                "TTFT base",
                "prompt",
                "thaw prefill",
                "thaw snapshot",
                "base prefill",
                "base cached",
            ],
            table,
        )
    ft, fp = thaw["fork_trunk"], thaw["fork_pivot"]
    st, sb = summarise(thaw["rollouts"]), summarise(base["rollouts"])
    pt, pb = summarise(thaw["pivot_rollouts"]), summarise(base["pivot_rollouts"])

    def step(name: str, t: dict[str, Any], b: dict[str, Any], t_s: float, b_s: float) -> list[Any]:
        return [
            f"{name} x{t['requests']}",
            t["requests"],
            t["prompt_tokens"],
            t["prefilled_tokens"],
            t["cached_tokens"],
            b["prefilled_tokens"],
            b["cached_tokens"],
            ms(t_s),
            ms(b_s),
            ms(t["mean_ttft_s"]),
            ms(b["mean_ttft_s"]),
        ]

    def fork_row(name: str, prompt: int, prefilled: Any, snapshot: str, seconds: float) -> list[Any]:
        return [name, 1, prompt, prefilled, snapshot, "-", "-", ms(seconds), "-", "-", "-"]

    pivot_prompt = thaw["trunk_tokens"] + thaw["pivot"]["tokens"]
    pivot_snapshot = f"{fp['snapshot_tokens']} in {fp['files']} files"
    trunk_snapshot = f"{ft['snapshot_tokens']} saved"
    rows = [
        fork_row(
            "fork trunk (one prefill)", thaw["trunk_tokens"], ft["prefilled_tokens"], trunk_snapshot, ft["s"]
        ),
        step("trunk rollouts", st, sb, thaw["rollouts_batch_s"], base["rollouts_batch_s"]),
        fork_row(
            "fork pivot (fork of a fork)", pivot_prompt, f"<={fp['new_tokens']}", pivot_snapshot, fp["s"]
        ),
        step("pivot rollouts", pt, pb, thaw["pivot_batch_s"], base["pivot_batch_s"]),
        None,
        [
            "total",
            "",
            "",
            ft["prefilled_tokens"] + st["prefilled_tokens"] + pt["prefilled_tokens"],
            st["cached_tokens"] + pt["cached_tokens"],
            sb["prefilled_tokens"] + pb["prefilled_tokens"],
            sb["cached_tokens"] + pb["cached_tokens"],
            ms(thaw["total_s"]),
            ms(base["total_s"]),
            "",
            "",
        ],
    ]
    _demo.print_table(
        "summary: prompt tokens prefilled vs copied from snapshots; times include the forks",
        [
            "step",
            "requests",
            "prompt tok",
            "thaw prefill",
            "thaw snapshot",
            "base prefill",
            "base cached",
            "thaw time",
            "base time",
            "thaw TTFT",
            "base TTFT",
        ],
        rows,
    )
    out = _demo.console
    for name, run in (("thaw", thaw), ("baseline", base)):
        pivot = run["pivot"]
        out.print(
            f"\n{name}: best trunk rollout #{pivot['rollout']} (reward {pivot['reward']:+.2f}); "
            f"pivot after {pivot['tokens']} tokens: {_demo.clip(pivot['text'], 120)!r}",
            markup=False,
        )
        out.print(
            f"  mean reward: trunk rollouts {summarise(run['rollouts'])['mean_reward']:+.2f}, "
            f"pivot rollouts {summarise(run['pivot_rollouts'])['mean_reward']:+.2f}; "
            f"engine start {run['engine_start_s']:.1f} s (not in the times above)"
        )
    best = max(thaw["pivot_rollouts"], key=lambda r: r["reward"])
    out.print(
        f"nested snapshot: {fp['chain'][0]} <- {fp['chain'][-1]} "
        f"(the child stores {fp['bytes_own'] / 1e6:.2f} MB of its own; the trunk file is shared)",
        markup=False,
    )
    _demo.print_replies(
        "the best pivot rollout (thaw, clipped)", [("pivot + rollout:", thaw["pivot"]["text"] + best["text"])]
    )
    out.print(f"[dim]{_demo.load_note({'thaw': thaw, 'baseline': base})}[/dim]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder or id (default: SmolLM2-135M)")
    parser.add_argument("--small", action="store_true", help="a reduced size for smoke tests")
    parser.add_argument("--rollouts", type=int, help="rollouts from the trunk (default 16; --small 3)")
    parser.add_argument("--pivot-rollouts", type=int, help="rollouts from the pivot (default 8; --small 2)")
    parser.add_argument("--max-tokens", type=int, help="tokens per rollout (default 80; --small 32)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine (default 512)")
    parser.add_argument("--json", help="write the results (both modes) to this JSON file")
    _demo.add_output_args(parser)
    parser.add_argument("--phase", choices=("thaw", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rollouts = args.rollouts or (3 if args.small else 16)
    args.pivot_rollouts = args.pivot_rollouts or (2 if args.small else 8)
    args.max_tokens = args.max_tokens or (32 if args.small else 80)
    if args.phase:
        _demo.write_json(args.phase_out, run_mode(args))
        return

    common = [
        f"--rollouts={args.rollouts}",
        f"--pivot-rollouts={args.pivot_rollouts}",
        f"--max-tokens={args.max_tokens}",
        f"--kv-cache-mib={args.kv_cache_mib}",
    ] + ([f"--model={args.model}"] if args.model else [])
    log = _demo.quiet_engine_logs("rl-rollouts", args.verbose)
    _demo.intro(
        [
            f"[bold]RL rollouts from a snapshot[/bold]: {args.rollouts} sampled rollouts from one trunk, "
            f"then {args.pivot_rollouts} more from the middle of the best one",
            "(a fork of a fork). thaw starts each rollout from a snapshot; the baseline prefills it.",
        ]
    )
    results = {}
    for mode in ("thaw", "baseline"):
        results[mode] = _demo.run_phase(
            __file__, [f"--phase={mode}", *common], label=f"{mode} in a fresh engine process", log=log
        )
    print_report(results["thaw"], results["baseline"])
    _demo.model_note(args.model)
    if args.json:
        _demo.write_json(args.json, {"args": vars(args), **results})


if __name__ == "__main__":
    main()
