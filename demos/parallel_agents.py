"""Parallel coding agents: eight approaches forked from one reasoning trunk, tested and ranked.

What it shows:
1. a shared trunk (a task statement, the module the function goes into, and a short reasoning
   turn) is snapshotted once with ``thaw_agents.fork``; eight ChatThaw branches, each asked for a
   different implementation approach of ``is_palindrome``, start from it (``fork=handle``)
   instead of prefilling it: they run concurrently on one engine, batched by vLLM;
2. each candidate's code is extracted and run against a small pytest suite
   (``demos/data/palindrome_tests.py``) in its own temporary directory, in a subprocess with a
   timeout, never in this process; candidates are ranked by pass rate. The default 135M model
   writes poor code: garbage, truncated or missing code scores 0, honestly;
3. side by side, the baseline: the same eight branches on an engine with prefix caching off, so
   every branch prefills its full prompt (a second engine configuration, ``ChatThaw(
   engine_kwargs={"enable_prefix_caching": False})``). The modes run one after the other in a
   child process, each on a fresh engine (ChatThaw's engine core is its own process) that is
   shut down before the next starts, so only one engine is alive at a time. The table shows
   per-branch TTFT, total time, and prompt tokens prefilled vs served from cache/snapshot.

The reasoning turn of the trunk is written in the script (not generated), so both modes see
exactly the same prompts. ``fork_fanout(llm, trunk, suffixes)`` does step 1's fork and fan-out in
one call; this demo spells them out to time each branch's first token. Candidate code runs with
a timeout in a scratch directory but is not sandboxed: run the demo where you would run the
model's code yourself.

Run (the default model on a CPU, a few minutes; ``--small`` for a smoke test)::

    .venv/bin/python demos/parallel_agents.py [--model PATH] [--small] [--json out.json] [-v]

``-v`` shows vLLM's log lines, which otherwise go to a file named at the start.

The engines are kept small (512 MiB of KV cache, 4,096-token context); with a bigger model on a
GPU, raise ``--kv-cache-mib``. ``--help`` lists the size options.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _demo  # a sibling module: this file runs as a script

DATA = Path(__file__).resolve().parent / "data"
FUNCTION = "is_palindrome"
APPROACHES = (
    "slicing: clean the text, then compare it with its reverse using [::-1]",
    "two pointers that move inwards from both ends and skip characters that are not letters or digits",
    "recursion on the cleaned string: compare the first and last characters, then recurse",
    "a for loop that builds the reversed cleaned string character by character",
    "the reversed() built-in with str.join",
    "collections.deque: pop characters from both ends and compare them",
    "a regular expression (re.sub) that removes everything but letters and digits",
    "all() over a generator that compares mirrored characters",
)
SYSTEM = "You are a senior Python engineer. You write small, correct, dependency-free functions."
REASONING = (
    "Let me think about the requirements before writing code.\n"
    "1. Only letters and digits matter: spaces and punctuation are ignored.\n"
    "2. Case is ignored, so 'RaceCar' counts as a palindrome.\n"
    "3. The empty string and a single character are palindromes.\n"
    "4. The function returns a real bool, True or False.\n"
    "So the plan is: keep the characters for which str.isalnum() is true, lowercase them, and "
    "check that the sequence reads the same forwards and backwards."
)


def trunk_messages() -> list[tuple[str, str]]:
    """The shared trunk: the task, the module it goes into, and the reasoning so far."""
    module = (DATA / "textkit.py").read_text()
    task = (
        f"Add a function `{FUNCTION}(text: str) -> bool` to the module below. It returns True when "
        "`text` reads the same forwards and backwards, ignoring case and every character that is "
        "not a letter or a digit.\n\nThe module, textkit.py:\n```python\n" + module + "```"
    )
    return [("system", SYSTEM), ("human", task), ("ai", REASONING)]


def branch_prompt(approach: str) -> str:
    return (
        f"Now implement `{FUNCTION}` with this approach: {approach}. Reply with one ```python code "
        "block that contains the complete function and the imports it needs. Keep it short: no "
        "docstring, no comments, no examples."
    )


# -- one mode, on a fresh engine --------------------------------------------------------------
async def _branches(llm: Any, trunk: list, approaches: list[str], handle: Any) -> list[dict[str, Any]]:
    from langchain_core.messages import HumanMessage

    start = time.perf_counter()

    async def one(approach: str) -> dict[str, Any]:
        ttft = None
        full = None
        async for chunk in llm.astream([*trunk, HumanMessage(branch_prompt(approach))], fork=handle):
            if ttft is None and chunk.content:
                ttft = time.perf_counter() - start
            full = chunk if full is None else full + chunk
        assert full is not None
        _demo.report(f"branch done: {_demo.clip(approach.split(':')[0], 40)}")
        usage = full.usage_metadata or {}
        cached = int(usage.get("input_token_details", {}).get("cache_read", 0))
        return {
            "approach": approach,
            "ttft_s": ttft if ttft is not None else time.perf_counter() - start,
            "branch_s": time.perf_counter() - start,
            "prompt_tokens": usage.get("input_tokens", 0),
            "cached_tokens": cached,
            "prefilled_tokens": usage.get("input_tokens", 0) - cached,
            "output_tokens": usage.get("output_tokens", 0),
            "fork": full.response_metadata.get("fork"),
            "text": str(full.content),
        }

    return list(await asyncio.gather(*(one(a) for a in approaches)))


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One mode on a fresh engine, shut down at the end."""
    from langchain_core.messages import convert_to_messages

    import thaw_agents
    from thaw_agents import ChatThaw

    thaw = mode == "thaw"
    engine_kwargs = {**_demo.ENGINE_KWARGS, "kv_cache_memory_bytes": args.kv_cache_mib << 20}
    if not thaw:
        engine_kwargs["enable_prefix_caching"] = False  # every branch prefills its full prompt
    llm = ChatThaw(
        model=args.model, temperature=0, max_tokens=args.max_tokens, timeout=600, engine_kwargs=engine_kwargs
    )
    try:
        started = time.perf_counter()
        llm.invoke(_demo.WARM_UP_TEXT, max_tokens=2)  # starts the engine; nothing below is cold
        result: dict[str, Any] = {"mode": mode, "engine_start_s": time.perf_counter() - started}
        what = "forking the trunk, then" if thaw else "prefix caching off,"
        _demo.report(
            f"{mode}: engine started in {result['engine_start_s']:.1f} s; {what} {args.branches} branches"
        )
        trunk = convert_to_messages(trunk_messages())
        approaches = list(APPROACHES[: args.branches])
        started = time.perf_counter()
        handle = None
        if thaw:
            handle = thaw_agents.fork(llm, trunk)  # the trunk's KV, computed once, snapshotted
            result["fork"] = {"id": handle.id, "tokens": handle.num_tokens}
            result["fork"]["snapshot_tokens"] = handle.num_snapshot_tokens
        result["fork_s"] = time.perf_counter() - started
        try:
            result["branches"] = asyncio.run(_branches(llm, trunk, approaches, handle))
        finally:
            if handle is not None:
                handle.delete()
        result["total_s"] = time.perf_counter() - started
    finally:
        llm.close()
    return result


# -- scoring: candidate code runs in a subprocess, never here ----------------------------------
def extract_code(text: str) -> str:
    """The candidate's code: the fenced block that defines the function, else the bare def."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", text, re.S)
    for block in blocks:
        if f"def {FUNCTION}" in block:
            return block
    index = text.find(f"def {FUNCTION}")
    if index < 0:
        return blocks[0] if blocks else text
    lines = text[index:].splitlines()
    kept = [lines[0]]
    for line in lines[1:]:  # the def and its body: stop at the first unindented prose line
        if line and not line[0].isspace() and not line.startswith(("def ", "import ", "from ", "@")):
            break
        kept.append(line)
    imports = [line for line in text[:index].splitlines() if line.startswith(("import ", "from "))]
    return "\n".join([*imports, *kept]) + "\n"


def static_note(code: str) -> str:
    """What is visibly wrong with the code, read with ``ast`` (parsing never runs it)."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return f"syntax error (line {exc.lineno})"
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    return "" if FUNCTION in names else f"no {FUNCTION}()"


# Runs pytest in the candidate's process after capping its memory, file sizes and CPU time: one
# candidate of the default model multiplied every character by 10**9.
LAUNCHER = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def score(code: str, timeout: float) -> dict[str, Any]:
    """Run the test suite against ``code`` in a scratch directory, in a subprocess."""
    total = (DATA / "palindrome_tests.py").read_text().count("\ndef test_")
    note = static_note(code)
    if note.startswith("syntax") or note.startswith("no "):
        return {"passed": 0, "total": total, "note": note}
    with tempfile.TemporaryDirectory(prefix="thaw-candidate-") as tmp:
        work = Path(tmp)
        (work / "solution.py").write_text(code)
        shutil.copy(DATA / "palindrome_tests.py", work / "test_solution.py")
        (work / "pytest.ini").write_text("[pytest]\n")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        }
        cmd = [sys.executable, "-c", LAUNCHER, "-q", "-p", "no:cacheprovider", "--junitxml=report.xml"]
        try:
            subprocess.run(
                [*cmd, "test_solution.py"],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"passed": 0, "total": total, "note": f"timeout ({timeout:.0f} s)"}
        try:
            suite = ET.parse(work / "report.xml").getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        except (OSError, ET.ParseError, AttributeError, ValueError):
            return {"passed": 0, "total": total, "note": "no test report"}
    passed = max(0, counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
    if counts["errors"] and not passed:
        note = "import/collection error"
    return {"passed": min(passed, total), "total": total, "note": note}


def score_all(runs: dict[str, dict[str, Any]], timeout: float) -> None:
    jobs = [(branch, extract_code(branch["text"])) for run in runs.values() for branch in run["branches"]]
    unique = sorted({code for _, code in jobs})  # both modes often write the same code: test it once
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = dict(zip(unique, pool.map(lambda code: score(code, timeout), unique), strict=True))
    for branch, code in jobs:
        result = scores[code]
        branch["code"] = code
        branch.update(result)
        branch["pass_rate"] = result["passed"] / result["total"] if result["total"] else 0.0


# -- the orchestrating process -----------------------------------------------------------------
def print_report(thaw: dict[str, Any], base: dict[str, Any], ranking: list[dict[str, Any]]) -> None:
    ms = _demo.ms
    out = _demo.console
    rows = []
    for t, b in zip(thaw["branches"], base["branches"], strict=True):
        rows.append(
            [
                t["approach"][:44],
                ms(t["ttft_s"]),
                ms(b["ttft_s"]),
                t["prompt_tokens"],
                t["prefilled_tokens"],
                t["cached_tokens"],
                b["prefilled_tokens"],
                b["cached_tokens"],
                f"{t['passed']}/{t['total']}",
                f"{b['passed']}/{b['total']}",
            ]
        )

    def total(run: dict[str, Any], key: str) -> int:
        return sum(branch[key] for branch in run["branches"])

    rows += [
        None,
        [
            "fork: trunk prefilled once, snapshotted (time)",
            ms(thaw["fork_s"]),
            "-",
            thaw["fork"]["tokens"],
            thaw["fork"]["tokens"],
            f"{thaw['fork']['snapshot_tokens']} saved",
            "-",
            "-",
            "",
            "",
        ],
        [
            "total (wall, incl. fork)",
            ms(thaw["total_s"]),
            ms(base["total_s"]),
            total(thaw, "prompt_tokens"),
            total(thaw, "prefilled_tokens") + thaw["fork"]["tokens"],
            total(thaw, "cached_tokens"),
            total(base, "prefilled_tokens"),
            total(base, "cached_tokens"),
            "",
            "",
        ],
    ]
    _demo.print_table(
        "thaw vs baseline (TTFT from the fan-out; prompt tokens prefilled / from cache or snapshot)",
        [
            "approach",
            "TTFT thaw",
            "TTFT base",
            "prompt",
            "thaw prefill",
            "thaw cached",
            "base prefill",
            "base cached",
            "tests thaw",
            "tests base",
        ],
        rows,
    )
    _demo.print_table(
        "ranking of the thaw run's candidates by pass rate",
        ["rank", "approach", "passed", "pass rate", "note"],
        [
            [i + 1, c["approach"][:60], f"{c['passed']}/{c['total']}", f"{c['pass_rate']:.0%}", c["note"]]
            for i, c in enumerate(ranking)
        ],
    )
    best = ranking[0]
    code = (best["code"].strip() or "(no code)").splitlines()
    clipped = code[:12] + ([f"... ({len(code) - 12} more lines)"] if len(code) > 12 else [])
    out.print(f"\nbest candidate ({best['approach']}, {best['passed']}/{best['total']} tests):", markup=False)
    out.print("    " + "\n    ".join(clipped), markup=False, highlight=False)
    out.print(
        f"\nengine start (not in the times above): thaw {thaw['engine_start_s']:.1f} s, "
        f"baseline {base['engine_start_s']:.1f} s"
    )
    out.print(f"[dim]{_demo.load_note({'thaw': thaw, 'baseline': base})}[/dim]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder or id (default: SmolLM2-135M)")
    parser.add_argument("--small", action="store_true", help="a reduced size for smoke tests")
    parser.add_argument("--branches", type=int, help=f"approaches (default {len(APPROACHES)}; --small 3)")
    parser.add_argument("--max-tokens", type=int, help="tokens per candidate (default 256; --small 64)")
    parser.add_argument("--test-timeout", type=float, default=30.0, help="seconds per candidate's tests")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine (default 512)")
    parser.add_argument("--json", help="write the results (both modes, scores, ranking) to this JSON file")
    _demo.add_output_args(parser)
    parser.add_argument("--phase", choices=("run",), help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.branches = min(args.branches or (3 if args.small else len(APPROACHES)), len(APPROACHES))
    args.max_tokens = args.max_tokens or (64 if args.small else 256)
    if args.phase:
        runs = {}
        for mode in ("thaw", "baseline"):
            load_before = os.getloadavg()[0]
            runs[mode] = run_mode(args, mode)
            runs[mode]["load_avg"] = [load_before, os.getloadavg()[0]]
        _demo.write_json(args.phase_out, runs)
        return

    common = [f"--branches={args.branches}", f"--max-tokens={args.max_tokens}"]
    common += [f"--kv-cache-mib={args.kv_cache_mib}"] + ([f"--model={args.model}"] if args.model else [])
    log = _demo.quiet_engine_logs("parallel-agents", args.verbose)
    _demo.intro(
        [
            f"[bold]Parallel coding agents[/bold]: {args.branches} approaches to one function, forked from "
            "one reasoning trunk, then tested and ranked.",
            "thaw: the trunk is computed once and every branch starts from its snapshot; "
            "baseline: every branch prefills it.",
        ]
    )
    child = _demo.run_phase(
        __file__,
        ["--phase=run", *common],
        label="thaw, then baseline, each on a fresh engine (one child process)",
        log=log,
    )
    runs = {mode: child[mode] for mode in ("thaw", "baseline")}
    with _demo.step("running each candidate's tests in a subprocess"):
        score_all(runs, args.test_timeout)
    ranking = sorted(runs["thaw"]["branches"], key=lambda c: -c["pass_rate"])
    print_report(runs["thaw"], runs["baseline"], ranking)
    _demo.model_note(args.model)
    if args.json:
        summary = [{k: c[k] for k in ("approach", "passed", "total", "pass_rate", "note")} for c in ranking]
        _demo.write_json(args.json, {"args": vars(args), **runs, "ranking": summary})


if __name__ == "__main__":
    main()
