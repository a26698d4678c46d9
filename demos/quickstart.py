"""Quickstart: the default model answers a chat prompt; a shared trunk is computed once.

Shows, on the CPU in about a minute:
1. SmolLM2-135M-Instruct (prepared offline) answering a chat prompt through vLLM;
2. a second request over the same ~1,200-token trunk served from the prefix cache;
3. the trunk forked to a snapshot file, and a branch in a *fresh engine process* that
   loads it instead of prefilling, with its time to first token against re-prefill.

Run: ``make quickstart`` (or ``.venv/bin/python demos/quickstart.py [--model PATH] [-v]``;
``-v`` shows vLLM's log lines, which otherwise go to a file named at the start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _demo  # a sibling module: this file runs as a script

TRUNK = "".join(
    f"\n# config_{i}.py\ndef parse_config(path):\n    result = {{}}\n    with open(path) as handle:\n"
    "        for number, line in enumerate(handle, 1):\n            line = line.strip()\n"
    "            if not line or line.startswith('#'):\n                continue\n"
    "            key, value = line.split('=', 1)\n            result[key.strip()] = value.strip()\n"
    "    return result\n"
    for i in range(10)
)
MESSAGES = [
    {"role": "system", "content": "You are a careful code reviewer."},
    {"role": "user", "content": "Here is the code under review:\n" + TRUNK},
]


def _branch(model: str | None, snapshot: str | None, question: str) -> dict:
    """Run one branch in this (fresh) process; print JSON."""
    from vllm import SamplingParams, TokensPrompt

    import thaw_agents

    llm = thaw_agents.make_llm(model, max_model_len=4096)
    from vllm.renderers import ChatParams

    prompt_ids = list(
        llm.renderer.render_chat(
            [[*MESSAGES, {"role": "user", "content": question}]],
            ChatParams(chat_template_kwargs={"add_generation_prompt": True}),
        )[1][0]["prompt_token_ids"]
    )
    params = SamplingParams(max_tokens=48, temperature=0)
    if snapshot:
        handle = thaw_agents.ForkHandle.load(snapshot)
        params = thaw_agents.with_fork(params, handle)
    start = time.perf_counter()
    first = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids)],
        SamplingParams(max_tokens=1, temperature=0, extra_args=params.extra_args),
        use_tqdm=False,
    )[0]
    ttft = time.perf_counter() - start
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt_ids)],
        SamplingParams(max_tokens=48, temperature=0),
        use_tqdm=False,
    )[0]
    return {
        "ttft_s": ttft,
        "cached": first.num_cached_tokens,
        "prompt_tokens": len(prompt_ids),
        "text": out.outputs[0].text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder or id (default: SmolLM2-135M)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    _demo.add_output_args(parser)
    parser.add_argument("--branch", help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.branch:
        print(json.dumps(_branch(args.model, args.snapshot, args.branch)))
        return

    log = _demo.quiet_engine_logs("quickstart", args.verbose)
    _demo.intro(
        [
            "[bold]thaw-agents quickstart[/bold]: one engine answers a chat prompt and serves a repeated "
            "~1,200-token trunk from its prefix cache;",
            "then the trunk is forked to a snapshot file, and a [italic]fresh[/italic] engine process "
            "starts a branch from that file, against one that prefills it again.",
        ]
    )
    from vllm import SamplingParams

    import thaw_agents

    with _demo.step("starting the engine"):
        llm = thaw_agents.make_llm(args.model, max_model_len=4096)
    answer = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=32, temperature=0),
        use_tqdm=False,
    )[0]
    _demo.print_replies("1. a chat answer", [("What is the capital of France?", answer.outputs[0].text)])

    params = SamplingParams(max_tokens=32, temperature=0)
    cache_rows = []
    for question in ("What does parse_config return?", "Which lines does it skip?"):
        out = llm.chat([*MESSAGES, {"role": "user", "content": question}], params, use_tqdm=False)[0]
        cache_rows.append([question, len(out.prompt_token_ids), out.num_cached_tokens])
    _demo.print_table(
        "2. two questions over one trunk, same engine",
        ["question", "prompt tokens", "from the prefix cache"],
        cache_rows,
    )

    with _demo.step("3. forking the trunk to a snapshot"):
        handle = thaw_agents.fork(llm, MESSAGES)
    with tempfile.TemporaryDirectory() as tmp:
        path = handle.save(Path(tmp) / "trunk.thaw")
        _demo.console.print(f"  {handle.num_snapshot_tokens} tokens, {handle.nbytes / 1e6:.1f} MB at {path}")
        question = "Name one bug risk in this code."
        rows = []
        for label, snapshot in (("re-prefill", None), ("thaw", str(path))):
            cmd = [sys.executable, __file__, "--branch", question]
            if args.model:
                cmd += ["--model", args.model]
            if snapshot:
                cmd += ["--snapshot", snapshot]
            with _demo.step(f"a fresh engine process runs one branch: {label}"):
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if log is not None:
                with open(log, "a") as sink:
                    sink.write(proc.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"the {label} branch failed:\n{proc.stderr[-4000:]}")
            rows.append((label, json.loads(proc.stdout.strip().splitlines()[-1])))
    handle.delete()
    _demo.print_table(
        "fresh engine process, one branch: thaw vs re-prefill",
        ["", "TTFT", "prompt tokens", "from snapshot / cache"],
        [[label, _demo.ms(row["ttft_s"]), row["prompt_tokens"], row["cached"]] for label, row in rows],
    )
    base, thaw = rows[0][1], rows[1][1]
    _demo.console.print(
        f"TTFT thaw / re-prefill: {thaw['ttft_s'] / base['ttft_s']:.2f}; "
        f"same greedy answer in both: {base['text'] == thaw['text']}"
    )
    _demo.print_replies("the branch's answer", [("thaw:", thaw["text"])])
    _demo.model_note(args.model)
    if args.json:
        keys = ("question", "prompt_tokens", "cached_tokens")
        same_engine = [dict(zip(keys, row, strict=True)) for row in cache_rows]
        _demo.write_json(args.json, {"same_engine": same_engine, "fresh_process": dict(rows)})


if __name__ == "__main__":
    main()
