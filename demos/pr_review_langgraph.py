"""PR review as a LangGraph fan-out: four specialists over one shared diff, thaw vs baseline.

A routing step fans the review out with ``Send`` to four specialist branches (security,
performance, style, correctness). Every branch's prompt is the same trunk (the reviewer's
instructions, the file under review and the diff, shipped in ``demos/pr_review_data/``) plus
one line naming its specialty.

  thaw      ``fork_sends`` snapshots the trunk once in the routing step; each branch's
            ChatThaw call starts from it (``fork=``) and prefills only its own last line.
  baseline  the same graph on an engine with prefix caching off: every branch prefills its
            whole prompt.

Each branch is an async node that streams, so the four run concurrently (the engine batches
them) and time to first token is measured where the user would see it.
Prints a side-by-side table (per-branch TTFT, prompt tokens prefilled vs served from
cache/snapshot, total time) and the reviews.

Run: ``make demo`` (both modes), or
``.venv/bin/python demos/pr_review_langgraph.py --mode thaw|baseline|both [--model PATH] [--json OUT] [-v]``
(``-v`` shows vLLM's log lines, which otherwise go to a file named at the start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import _demo  # a sibling module: this file runs as a script
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

DATA = Path(__file__).resolve().parent / "pr_review_data"
SPECIALISTS = {
    "security": "Review only for security: injection, unsafe input handling, secrets.",
    "performance": "Review only for performance: algorithmic complexity and wasted work.",
    "style": "Review only for style: naming, type hints, readability.",
    "correctness": "Review only for correctness: off-by-one errors, ordering, changed behaviour.",
}


class ReviewState(TypedDict):
    diff: str
    source: str
    reviews: Annotated[list[dict[str, Any]], operator.add]


def trunk_messages(state: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("system", "You are a senior Python reviewer. Be specific and brief: name the line and the fix."),
        (
            "human",
            f"The file under review, orders.py:\n```python\n{state['source']}```\n\n"
            f"The pull request's diff:\n```diff\n{state['diff']}```",
        ),
    ]


def build_graph(llm: Any, mode: str, on_branch_done: Any = None) -> Any:
    from thaw_agents import fork_sends

    def route(state: ReviewState) -> list[Send]:
        branches = [{"aspect": a, "diff": state["diff"], "source": state["source"]} for a in SPECIALISTS]
        if mode == "thaw":
            return fork_sends(llm, trunk_messages(state), "review", branches)
        return [Send("review", {**b, "fork": None}) for b in branches]

    async def review(branch: dict[str, Any]) -> dict[str, Any]:
        messages = [*trunk_messages(branch), ("human", SPECIALISTS[branch["aspect"]])]
        start = time.perf_counter()
        ttft = None
        full = None
        async for chunk in llm.astream(messages, fork=branch["fork"]):
            if ttft is None and chunk.content:
                ttft = time.perf_counter() - start
            full = chunk if full is None else full + chunk
        usage = full.usage_metadata
        if on_branch_done is not None:
            on_branch_done(branch["aspect"])
        return {
            "reviews": [
                {
                    "aspect": branch["aspect"],
                    "ttft_s": ttft if ttft is not None else time.perf_counter() - start,
                    "branch_s": time.perf_counter() - start,
                    "prompt_tokens": usage["input_tokens"],
                    "cached_tokens": usage["input_token_details"]["cache_read"],
                    "output_tokens": usage["output_tokens"],
                    "fork": branch["fork"],
                    "text": full.content,
                }
            ]
        }

    builder = StateGraph(ReviewState).add_node("review", review)
    builder = builder.add_conditional_edges(START, route, ["review"]).add_edge("review", END)
    return builder.compile()


def run_mode(mode: str, model: str | None, max_tokens: int) -> dict[str, Any]:
    import thaw_agents
    from thaw_agents import ChatThaw

    engine_kwargs: dict[str, Any] = {"max_model_len": 4096}
    if mode == "baseline":
        engine_kwargs["enable_prefix_caching"] = False
    llm = ChatThaw(model=model, temperature=0, max_tokens=max_tokens, engine_kwargs=engine_kwargs)
    what = "prefix caching off" if mode == "baseline" else "thaw on"
    try:
        with _demo.step(f"{mode}: starting an engine ({what})"):
            llm.invoke("Say ok.", max_tokens=2)  # start the engine outside the timed region
        state = {
            "diff": (DATA / "change.diff").read_text(),
            "source": (DATA / "orders.py").read_text(),
            "reviews": [],
        }
        work = "fork the trunk, then four branches" if mode == "thaw" else "four branches, each prefills all"
        with _demo.step(f"{mode}: {work}", total=len(SPECIALISTS)) as advance:
            start = time.perf_counter()
            # Async nodes: LangGraph runs the four branches concurrently, so the engine batches them.
            result = asyncio.run(build_graph(llm, mode, advance).ainvoke(state))
            total = time.perf_counter() - start
        for fork_id in {r["fork"] for r in result["reviews"] if r["fork"]}:
            thaw_agents.ForkHandle.from_id(fork_id).delete()  # the routing step's snapshot, now used
    finally:
        llm.close()
    reviews = sorted(result["reviews"], key=lambda r: list(SPECIALISTS).index(r["aspect"]))
    return {"mode": mode, "total_s": total, "branches": reviews}


def print_comparison(runs: list[dict[str, Any]], model: str | None) -> None:
    by_mode = {r["mode"]: r for r in runs}
    rows: list[Any] = []
    for aspect in SPECIALISTS:
        for mode in ("baseline", "thaw"):
            if mode in by_mode:
                b = next(x for x in by_mode[mode]["branches"] if x["aspect"] == aspect)
                rows.append(
                    [
                        aspect,
                        mode,
                        _demo.ms(b["ttft_s"]),
                        b["prompt_tokens"],
                        b["prompt_tokens"] - b["cached_tokens"],
                        b["cached_tokens"],
                    ]
                )
        rows.append(None)

    def mean_ttft(run: dict[str, Any]) -> float:
        return sum(b["ttft_s"] for b in run["branches"]) / len(run["branches"])

    for mode in ("baseline", "thaw"):
        if mode in by_mode:
            run = by_mode[mode]
            prefilled = sum(b["prompt_tokens"] - b["cached_tokens"] for b in run["branches"])
            cached = sum(b["cached_tokens"] for b in run["branches"])
            rows.append(
                [
                    f"all four, total {_demo.ms(run['total_s'])}",
                    mode,
                    f"mean {_demo.ms(mean_ttft(run))}",
                    sum(b["prompt_tokens"] for b in run["branches"]),
                    prefilled,
                    cached,
                ]
            )
    _demo.print_table(
        "PR review, four branches: time to first token and prompt tokens (prefilled vs from cache/snapshot)",
        ["branch", "mode", "TTFT", "prompt", "prefilled", "from cache"],
        rows,
    )
    if len(by_mode) == 2:
        base, thaw = by_mode["baseline"], by_mode["thaw"]
        _demo.console.print(
            f"thaw / baseline: total {thaw['total_s'] / base['total_s']:.2f}x, "
            f"mean branch TTFT {mean_ttft(thaw) / mean_ttft(base):.2f}x "
            "(thaw's total includes computing the trunk once)"
        )
    final = by_mode.get("thaw") or runs[-1]
    replies = [(f"[{b['aspect']}]", b["text"]) for b in final["branches"]]
    _demo.print_replies(f"the reviews ({final['mode']} run, clipped)", replies)
    _demo.model_note(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["thaw", "baseline", "both"], default="both")
    parser.add_argument("--model", default=None, help="a Hugging Face folder or id (default: SmolLM2-135M)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    _demo.add_output_args(parser)
    args = parser.parse_args()
    _demo.quiet_engine_logs("demo", args.verbose)
    _demo.intro(
        [
            "[bold]PR review as a LangGraph fan-out[/bold]: four specialists review one diff.",
            "[bold]thaw[/bold]: the shared trunk is computed once; each branch starts from its snapshot.",
            "[bold]baseline[/bold]: prefix caching off; every branch prefills its whole prompt.",
        ]
    )
    modes = ["baseline", "thaw"] if args.mode == "both" else [args.mode]
    runs = [run_mode(mode, args.model, args.max_tokens) for mode in modes]
    print_comparison(runs, args.model)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=2))


if __name__ == "__main__":
    main()
