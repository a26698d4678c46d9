"""Shared by the demo scripts: a quiet terminal, progress for the waits, phases, timed generation, tables.

Not a library: the demos import it as a sibling module (``import _demo``). Output goes to the
person at the terminal: a few lines on what runs, a spinner with the elapsed time for each wait,
then ``rich`` tables. vLLM's own log lines go to a file (named once) unless ``-v``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# Small engines: several may run on one machine (each default-model engine holds ~4.5 GiB).
ENGINE_KWARGS: dict[str, Any] = {"kv_cache_memory_bytes": 512 << 20, "max_model_len": 4096}
# An unrelated prompt run once before anything is timed: the first forward passes of a fresh
# engine pay one-off costs (allocations, kernel selection) that are neither prefill nor thaw.
WARM_UP_TEXT = "Warm-up request. " + " ".join(f"item {i} is number {i * 7 % 13}." for i in range(60))
# Piped output (a log, a test) gets wide lines: a table is never wrapped to 80 columns there.
console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
# A phase process reports progress to the demo on its stdout with this prefix (see ``report``).
_PROGRESS = "@thaw-demo-progress@ "
_LOG: Path | None = None  # vLLM's log file, when the demo is quiet
MODEL_NOTE = (
    "The default model, SmolLM2-135M-Instruct, is a 135M model for a CPU: weak replies, real counts "
    "and times. A bigger one: --model Qwen/Qwen2.5-1.5B-Instruct (any Hugging Face id or folder)."
)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``-v``: vLLM's log lines on the terminal instead of in a file."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show vLLM's log lines here (default: a log file)"
    )


def quiet_engine_logs(name: str, verbose: bool) -> Path | None:
    """Unless ``verbose``, send vLLM's logs (here and in child processes) to a file; say where once."""
    if verbose:
        return None
    from thaw_agents._logfile import send_vllm_logs_to_file

    global _LOG
    _LOG = send_vllm_logs_to_file(name)
    console.print(f"[dim]vLLM's log: {_LOG} (-v shows it here)[/dim]")
    return _LOG


@contextlib.contextmanager
def _stderr_to_log() -> Iterator[None]:
    """While quiet, what the engine writes straight to stderr (C++ warnings, loading bars) goes to
    the log; an exception raised inside is printed after stderr is back."""
    if _LOG is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(_LOG, "a") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def intro(lines: Sequence[str]) -> None:
    """What the demo does, in a few lines."""
    for line in lines:
        console.print(line)
    console.print()


def model_note(model: str | None) -> None:
    """After the replies: with the default model, one line on what it is and how to run a bigger one."""
    if model is None:
        console.print(f"\n[dim]{MODEL_NOTE}[/dim]")


@contextlib.contextmanager
def step(text: str, total: int | None = None) -> Iterator[Any]:
    """A spinner and the elapsed time while the block runs, then one line with how long it took.

    Yields a callable ``advance(note="")`` for work with ``total`` parts (branches, rollouts).
    """
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    done = [0]
    task = progress.add_task(escape(text), total=total, count="")

    def advance(note: str = "") -> None:
        done[0] += 1
        count = f"{done[0]}/{total}" if total else ""
        progress.update(task, count=f"{count} {note}".strip())

    started = time.perf_counter()
    # Piped output gets no live display (it would leave blank lines); the line after says enough.
    with progress if console.is_terminal else contextlib.nullcontext(), _stderr_to_log():
        yield advance
    console.print(f"[green]✓[/green] {escape(text)} [dim]({time.perf_counter() - started:.1f} s)[/dim]")


def report(text: str) -> None:
    """From a phase process: one line on what it is doing now, shown under the demo's spinner."""
    print(_PROGRESS + text, flush=True)


def clip(text: str, width: int = 240) -> str:
    """One line of at most ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def print_replies(title: str, replies: Sequence[tuple[str, str]]) -> None:
    """Labelled replies, one clipped line each."""
    console.print(f"\n[bold]{title}[/bold]")
    for label, text in replies:
        console.print(f"  [cyan]{escape(label)}[/cyan] {escape(clip(text)) or '(empty)'}")


class PhaseError(RuntimeError):
    """A phase process failed; carries the tail of its output."""


def run_phase(
    script: str, args: Sequence[str], *, label: str, timeout: float = 900, log: Path | None = None
) -> dict[str, Any]:
    """Run ``script --phase-out FILE *args`` in a fresh Python process; return the JSON it wrote.

    A spinner labelled ``label`` shows the phase's ``report`` lines as they come. Its other output
    (vLLM's lines that bypass logging, warnings) is appended to ``log`` when given, else shown
    only on failure.
    """
    with tempfile.TemporaryDirectory(prefix="thaw-demo-") as tmp:
        out = Path(tmp) / "phase.json"
        cmd = [sys.executable, script, "--phase-out", str(out), *args]
        env = {**os.environ}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        output: list[str] = []
        with step(label) as _, contextlib.ExitStack() as stack:
            sink = stack.enter_context(open(log, "a")) if log is not None else None
            # Its own process group: on a timeout the phase and any engine process it started go.
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
            )

            def pump() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.startswith(_PROGRESS):
                        console.print(f"  [dim]· {escape(line[len(_PROGRESS) :].strip())}[/dim]")
                        continue
                    output.append(line)
                    if sink is not None:
                        sink.write(line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except BaseException as exc:  # a timeout, or Ctrl-C in the demo
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise PhaseError(f"{label}: no result after {timeout:.0f} s") from exc
                raise
            finally:
                reader.join(timeout=10)
        if proc.returncode != 0 or not out.exists():
            where = f" (its output is in {log})" if log is not None else ""
            raise PhaseError(f"{label} failed (exit {proc.returncode}){where}:\n{''.join(output)[-4000:]}")
        result = json.loads(out.read_text())
        result.setdefault("load_avg", [load_before, os.getloadavg()[0]])
        result["process_s"] = time.perf_counter() - started
        return result


def load_note(runs: dict[str, dict[str, Any]]) -> str:
    """A line on how busy the machine was: other processes skew times; token counts are exact."""
    parts = ", ".join(f"{mode} {r['load_avg'][0]:.1f} -> {r['load_avg'][1]:.1f}" for mode, r in runs.items())
    return (
        f"1-minute load average ({os.cpu_count()} CPUs) before -> after each mode: {parts}. "
        "Times are wall-clock and shift with other work on the machine; token counts are exact."
    )


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str))


def warm_up(llm: Any) -> None:
    """One short unrelated request, so timings measure prefill and thaw, not a cold engine."""
    from vllm import SamplingParams

    llm.generate([WARM_UP_TEXT], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)


def timed_generate(
    llm: Any, prompts: Sequence[Sequence[int]], params: Sequence[Any]
) -> tuple[list[dict[str, Any]], float]:
    """Run token-id prompts as one batch on a ``vllm.LLM``; per request: TTFT, cache and output.

    The batch goes through thaw-agents' engine front, which steps the engine itself (what
    ``LLM.generate`` does inside), so each request's first-token time is seen as it happens.
    Returns the rows (in input order) and the batch's wall time.
    """
    from thaw_agents.front import Request, front_for

    requests = [Request(token_ids=p, params=sp) for p, sp in zip(prompts, params, strict=True)]
    start = time.perf_counter()
    results = front_for(llm).generate(requests)
    wall = time.perf_counter() - start
    rows = []
    for result in results:
        completion = result.completions[0]
        rows.append(
            {
                "ttft_s": result.ttft_s if result.ttft_s is not None else result.total_s,
                "total_s": result.total_s,
                "prompt_tokens": result.num_prompt_tokens,
                "cached_tokens": result.num_cached_tokens,
                "prefilled_tokens": result.num_prompt_tokens - result.num_cached_tokens,
                "output_tokens": len(completion.token_ids),
                "token_ids": list(completion.token_ids),
                "text": completion.text,
                "finish_reason": completion.finish_reason,
            }
        )
    return rows, wall


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any] | None]) -> None:
    """A ``rich`` table under a bold title: first column left, the others right; a None row starts
    a new section."""
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for index, header in enumerate(headers):
        table.add_column(str(header), justify="left" if index == 0 else "right", no_wrap=True)
    for row in rows:
        if row is None:
            table.add_section()
        else:
            table.add_row(*(escape(str(v)) for v in row))
    console.print(f"\n[bold]{escape(title)}[/bold]")
    console.print(table)
