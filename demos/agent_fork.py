"""Agent session fork: save a running agent session, exit, restore it in a new process, continue.

What it shows, in three fresh processes, one after the other:
1. session: an incident-response agent runs a multi-turn conversation with tool-like turns
   (scripted tool calls and tool results, live model turns in between). The whole conversation
   is then forked (``thaw_agents.fork``) and saved (``handle.save(path)``) beside the agent's own
   state (its messages, as JSON); the process exits and its engine with it;
2. restore: a new process and a fresh engine open the snapshot (``ForkHandle.load(path)``: every
   header and checksum verified) and continue the conversation for two more turns; the first
   request loads the conversation's KV from the snapshot (``thaw_agents.with_fork``) instead of
   prefilling it;
3. re-prefill (the baseline): another new process and fresh engine continue the same
   conversation from the saved messages alone, prefilling all of it.

The table compares the restored tokens and the time to first token of each continued turn
against re-prefill. Each side runs its requests one at a time after one unrelated warm-up
request, and for reference the session process also continues the conversation itself after
saving it, so the greedy replies of all three can be compared (CPU bf16 is not bit-exact
between a prefill in one pass and the same KV computed turn by turn, so re-prefill may drift).

Run (the default model on a CPU, about two minutes; ``--small`` for a smoke test)::

    .venv/bin/python demos/agent_fork.py [--model PATH] [--small] [--json out.json] [-v]

``-v`` shows vLLM's log lines, which otherwise go to a file named at the start.

The engines are kept small (512 MiB of KV cache, 4,096-token context); with a bigger model on a
GPU, raise ``--kv-cache-mib``. ``--help`` lists the size options.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import _demo  # a sibling module: this file runs as a script

SYSTEM = (
    "You are an incident-response agent for an online shop. You investigate production problems "
    "with tools and explain what you find to the on-call engineer.\n"
    'Tools (call one per turn as <tool_call>{"name": ..., "arguments": {...}}</tool_call>):\n'
    "- read_logs(service, since): recent log lines of a service\n"
    "- read_file(path): a file from the deployment repository\n"
    "- run(command): a read-only shell command on the bastion host\n"
    "Be brief and concrete. Quote log lines and config keys when they matter."
)
LOGS = "\n".join(
    [
        "09:02:11 INFO  checkout  request POST /cart/checkout 200 182ms",
        "09:04:37 INFO  checkout  request POST /cart/checkout 200 201ms",
        "09:07:55 INFO  deploy    rollout checkout v2.14.0 started (3 replicas)",
        "09:08:40 INFO  checkout  v2.14.0 boot: connecting to payments at payments.internal:8443",
        "09:08:41 WARN  checkout  payments client: TLS handshake took 2900ms",
        "09:09:12 INFO  deploy    rollout checkout v2.14.0 complete",
    ]
    + [
        f"09:{10 + i // 3:02d}:{(i * 17) % 60:02d} ERROR checkout  upstream payments timed out after "
        f"{1000 + (i % 3) * 5}ms; returning 502 to POST /cart/checkout (attempt {i % 3 + 1}/3)"
        for i in range(12)
    ]
    + [
        "09:14:02 WARN  checkout  connection pool payments: 0 idle, 10 busy, 37 waiting",
        "09:14:30 INFO  payments  p50 latency 1450ms p99 2600ms (normal: p50 300ms)",
        "09:15:05 ERROR checkout  circuit breaker payments OPEN after 50 failures in 60s",
    ]
)
CONFIG = """\
# deploy/checkout.yaml (v2.14.0)
service: checkout
replicas: 3
image: registry.internal/checkout:2.14.0
env:
  PAYMENTS_URL: https://payments.internal:8443
  PAYMENTS_TIMEOUT_MS: "1000"        # was 5000 in v2.13.2
  PAYMENTS_POOL_SIZE: "10"
  PAYMENTS_RETRIES: "3"
  CIRCUIT_BREAKER_THRESHOLD: "50"
resources:
  requests: {cpu: 500m, memory: 512Mi}
  limits: {cpu: "1", memory: 1Gi}
readinessProbe:
  httpGet: {path: /healthz, port: 8080}
  periodSeconds: 5
"""


def call(name: str, **arguments: str) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


# The session script: scripted user, tool-call and tool-result turns; None marks a live model turn.
SESSION: list[dict[str, str] | None] = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Checkout has been returning HTTP 502 since about 09:10. Find out why."},
    {"role": "assistant", "content": call("read_logs", service="checkout", since="09:00")},
    {"role": "tool", "tool_call_id": "call-1", "content": LOGS},
    None,
    {"role": "user", "content": "Check the deployment config of checkout too."},
    {"role": "assistant", "content": call("read_file", path="deploy/checkout.yaml")},
    {"role": "tool", "tool_call_id": "call-2", "content": CONFIG},
    None,
]
FOLLOW_UPS = (
    "What is the most likely cause, and what should we change first?",
    "Write a one-line summary for the incident channel.",
)


def render(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt of a turn, rendered as ``thaw_agents.fork`` renders the conversation it saves."""
    from thaw_agents.chat import render as render_chat

    return render_chat(llm.renderer, messages, add_generation_prompt=True)


def greedy(max_tokens: int) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0)


# -- the phases, each in a fresh process -------------------------------------------------------
def phase_session(args: argparse.Namespace) -> dict[str, Any]:
    """Run the agent session live, then fork and save it; the process then exits."""
    import thaw_agents

    started = time.perf_counter()
    llm = make_engine(args)
    result: dict[str, Any] = {"engine_start_s": time.perf_counter() - started, "turns": []}
    _demo.report(f"engine started in {result['engine_start_s']:.1f} s; the agent runs its session")
    _demo.warm_up(llm)
    messages: list[dict[str, str]] = []
    for message in SESSION:
        if message is not None:
            messages.append(message)
            continue
        (row,), _ = _demo.timed_generate(llm, [render(llm, messages)], [greedy(args.session_tokens)])
        reply = row["text"].strip() or "(no reply)"
        messages.append({"role": "assistant", "content": reply})
        result["turns"].append({k: row[k] for k in ("ttft_s", "prompt_tokens", "cached_tokens", "text")})
    _demo.report(f"{len(result['turns'])} live turns done; forking and saving the conversation")
    fork_start = time.perf_counter()
    handle = thaw_agents.fork(llm, messages)
    fork_s = time.perf_counter() - fork_start
    save_start = time.perf_counter()
    handle.save(args.snapshot)
    save_s = time.perf_counter() - save_start
    # The agent's own state goes beside the snapshot: plain JSON, as a checkpointer would keep it.
    Path(args.snapshot).with_suffix(".messages.json").write_text(json.dumps(messages, indent=1))
    result.update(
        messages=len(messages),
        conversation_tokens=handle.num_tokens,
        snapshot_tokens=handle.num_snapshot_tokens,
        snapshot_bytes=handle.nbytes,
        snapshot_id=handle.id,
        fork_s=fork_s,
        save_s=save_s,
    )
    handle.delete()  # the store's copy; the saved file at args.snapshot stays
    # For reference only: the original session continues itself, so the restored session's
    # replies can be compared with what the original would have said.
    result["reference_turns"] = continue_session(llm, messages, args)
    return result


def phase_continue(args: argparse.Namespace) -> dict[str, Any]:
    """Continue the saved conversation in a fresh engine: from the snapshot, or by re-prefill."""
    import thaw_agents

    restore = args.phase == "restore"
    messages = json.loads(Path(args.snapshot).with_suffix(".messages.json").read_text())
    result: dict[str, Any] = {"mode": args.phase, "turns": []}
    handle = None
    if restore:
        load_start = time.perf_counter()
        handle = thaw_agents.ForkHandle.load(args.snapshot)  # headers and checksums verified here
        result["load_s"] = time.perf_counter() - load_start
        result["snapshot_tokens"] = handle.num_snapshot_tokens
    started = time.perf_counter()
    llm = make_engine(args)
    result["engine_start_s"] = time.perf_counter() - started
    _demo.report(f"engine started in {result['engine_start_s']:.1f} s; continuing the conversation")
    _demo.warm_up(llm)
    result["turns"] = continue_session(llm, messages, args, handle)
    if handle is not None:
        handle.delete()  # load() brought the file into the store; the saved file at args.snapshot stays
    return result


def continue_session(
    llm: Any, messages: list[dict[str, str]], args: argparse.Namespace, handle: Any = None
) -> list[dict[str, Any]]:
    """The follow-up turns, one request at a time; with ``handle`` the first loads the snapshot."""
    import thaw_agents

    turns = []
    messages = list(messages)
    for index, question in enumerate(FOLLOW_UPS[: args.turns]):
        messages.append({"role": "user", "content": question})
        prompt = render(llm, messages)
        params = greedy(args.max_tokens)
        if index == 0 and handle is not None:
            if tuple(prompt[: handle.num_tokens]) != handle.token_ids:
                raise SystemExit("the saved messages do not render to the snapshot's tokens")
            params = thaw_agents.with_fork(params, handle)  # this request loads the KV from the file
        (row,), _ = _demo.timed_generate(llm, [prompt], [params])
        messages.append({"role": "assistant", "content": row["text"].strip()})
        row.pop("token_ids")
        turns.append({"question": question, **row})
    return turns


def make_engine(args: argparse.Namespace) -> Any:
    import thaw_agents

    kwargs = {**_demo.ENGINE_KWARGS, "kv_cache_memory_bytes": args.kv_cache_mib << 20}
    return thaw_agents.make_llm(args.model, **kwargs)


# -- the orchestrating process -----------------------------------------------------------------
def print_report(session: dict[str, Any], restore: dict[str, Any], base: dict[str, Any]) -> None:
    ms = _demo.ms
    out = _demo.console
    out.print(
        f"\nsession: {session['messages']} messages ({len(session['turns'])} live model turns), "
        f"{session['conversation_tokens']} tokens; forked in {ms(session['fork_s'])}, saved "
        f"{session['snapshot_tokens']} tokens ({session['snapshot_bytes'] / 1e6:.1f} MB) "
        f"in {ms(session['save_s'])}"
    )
    for i, turn in enumerate(session["turns"]):
        out.print(
            f"  live turn {i + 1}: prompt {turn['prompt_tokens']}, from the session's prefix cache "
            f"{turn['cached_tokens']}, TTFT {ms(turn['ttft_s'])}: {_demo.clip(turn['text'], 100)!r}",
            markup=False,
        )
    rows: list[Any] = [
        ["load + verify snapshot", ms(restore["load_s"]), "-"],
        ["engine start (fresh process)", ms(restore["engine_start_s"]), ms(base["engine_start_s"])],
    ]
    for i, (r, b) in enumerate(zip(restore["turns"], base["turns"], strict=True)):
        source = "from snapshot" if i == 0 else "from engine cache"
        rows += [
            None,
            [f"turn {i + 1}: prompt tokens", r["prompt_tokens"], b["prompt_tokens"]],
            [f"turn {i + 1}: {source} / cached", r["cached_tokens"], b["cached_tokens"]],
            [f"turn {i + 1}: prefilled", r["prefilled_tokens"], b["prefilled_tokens"]],
            [f"turn {i + 1}: TTFT", ms(r["ttft_s"]), ms(b["ttft_s"])],
            [f"turn {i + 1}: whole reply", ms(r["total_s"]), ms(b["total_s"])],
            [f"turn {i + 1}: reply tokens", r["output_tokens"], b["output_tokens"]],
        ]
    _demo.print_table(
        "continuing the saved session in a new process: restore vs re-prefill",
        ["", "restore (thaw)", "re-prefill"],
        rows,
    )
    first_r, first_b = restore["turns"][0], base["turns"][0]
    out.print(
        "\nTTFT of the first continued turn, restore / re-prefill: "
        f"{first_r['ttft_s'] / first_b['ttft_s']:.2f}"
    )
    original = [t["text"] for t in session["reference_turns"]]
    out.print(
        "restored replies equal the original session's own continuation: "
        f"{[r['text'] == o for r, o in zip(restore['turns'], original, strict=True)]}; "
        f"re-prefill's: {[b['text'] == o for b, o in zip(base['turns'], original, strict=True)]}",
        markup=False,
    )
    replies = []
    for turn in restore["turns"]:
        replies += [("user:", turn["question"]), ("agent (restored):", turn["text"])]
    _demo.print_replies("the continued conversation (clipped)", replies)
    out.print(f"[dim]{_demo.load_note({'restore': restore, 're-prefill': base})}[/dim]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder or id (default: SmolLM2-135M)")
    parser.add_argument("--small", action="store_true", help="a reduced size for smoke tests")
    parser.add_argument("--turns", type=int, help="turns continued after the restore (default 2; --small 1)")
    parser.add_argument("--max-tokens", type=int, help="tokens per continued turn (default 96; --small 16)")
    parser.add_argument(
        "--session-tokens", type=int, help="tokens per live session turn (default 64; --small 12)"
    )
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine (default 512)")
    parser.add_argument(
        "--workdir", help="keep the snapshot and messages here (default: a temporary directory)"
    )
    parser.add_argument("--json", help="write the results (all three processes) to this JSON file")
    _demo.add_output_args(parser)
    parser.add_argument("--phase", choices=("session", "restore", "reprefill"), help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.turns = min(args.turns or (1 if args.small else 2), len(FOLLOW_UPS))
    args.max_tokens = args.max_tokens or (16 if args.small else 96)
    args.session_tokens = args.session_tokens or (12 if args.small else 64)
    if args.phase:
        run = phase_session if args.phase == "session" else phase_continue
        _demo.write_json(args.phase_out, run(args))
        return

    log = _demo.quiet_engine_logs("agent-fork", args.verbose)
    _demo.intro(
        [
            "[bold]Agent session fork[/bold]: an incident-response agent runs a session, which is forked "
            "and saved to a file;",
            "a new process restores it and continues; another new process re-prefills it instead.",
        ]
    )
    common = [f"--turns={args.turns}", f"--max-tokens={args.max_tokens}"]
    common += [f"--session-tokens={args.session_tokens}", f"--kv-cache-mib={args.kv_cache_mib}"]
    common += [f"--model={args.model}"] if args.model else []
    with tempfile.TemporaryDirectory(prefix="thaw-agent-fork-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        common.append(f"--snapshot={workdir / 'session.thaw'}")
        results = {}
        for phase, what in (
            ("session", "run the agent session, fork and save it, exit"),
            ("restore", "a new process restores the snapshot and continues"),
            ("reprefill", "a new process re-prefills the conversation and continues"),
        ):
            results[phase] = _demo.run_phase(
                __file__, [f"--phase={phase}", *common], label=f"{phase}: {what}", log=log
            )
    print_report(results["session"], results["restore"], results["reprefill"])
    _demo.model_note(args.model)
    if args.json:
        _demo.write_json(args.json, {"args": vars(args), **results})


if __name__ == "__main__":
    main()
