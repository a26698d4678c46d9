"""Shared by the demo scripts: fresh-process phases, timed generation on ``vllm.LLM``, tables.

Not a library: the demos import it as a sibling module (``import _demo``) and it prints nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Small engines: several may run on one machine (each default-model engine holds ~4.5 GiB).
ENGINE_KWARGS: dict[str, Any] = {"kv_cache_memory_bytes": 512 << 20, "max_model_len": 4096}
# An unrelated prompt run once before anything is timed: the first forward passes of a fresh
# engine pay one-off costs (allocations, kernel selection) that are neither prefill nor thaw.
WARM_UP_TEXT = "Warm-up request. " + " ".join(f"item {i} is number {i * 7 % 13}." for i in range(60))


class PhaseError(RuntimeError):
    """A phase process failed; carries the tail of its output."""


def run_phase(script: str, args: Sequence[str], *, timeout: float = 900) -> dict[str, Any]:
    """Run ``script --phase-out FILE *args`` in a fresh Python process; return the JSON it wrote.

    vLLM's own log lines go to the child's captured output and are shown only on failure.
    """
    with tempfile.TemporaryDirectory(prefix="thaw-demo-") as tmp:
        out = Path(tmp) / "phase.json"
        cmd = [sys.executable, script, "--phase-out", str(out), *args]
        env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        # Its own process group: on a timeout the phase and any engine process it started go.
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except BaseException as exc:  # a timeout, or Ctrl-C in the demo
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise PhaseError(f"{' '.join(args)}: no result after {timeout:.0f} s") from exc
            raise
        if proc.returncode != 0 or not out.exists():
            raise PhaseError(f"phase {' '.join(args)} failed (exit {proc.returncode}):\n{output[-4000:]}")
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

    The requests are added to the engine together and the engine is stepped here (what
    ``LLM.generate`` does inside), so each request's first-token time is seen as it happens.
    Returns the rows (in input order) and the batch's wall time.
    """
    from vllm import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    inputs = llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=list(p)) for p in prompts])
    tag = uuid.uuid4().hex[:8]
    ids = [f"demo-{tag}-{i}" for i in range(len(prompts))]
    first: dict[str, float] = {}
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    final: dict[str, Any] = {}
    done: dict[str, float] = {}
    start = time.perf_counter()
    for rid, engine_input, sampling in zip(ids, inputs, params, strict=True):
        sampling = copy.deepcopy(sampling)
        sampling.output_kind = RequestOutputKind.DELTA  # one output per step: first tokens are seen
        engine.add_request(rid, engine_input, sampling)
    while engine.has_unfinished_requests():
        for output in engine.step():
            rid = output.request_id
            new = output.outputs[0].token_ids if output.outputs else []
            if new and rid not in first:
                first[rid] = time.perf_counter() - start
            tokens[rid].extend(new)
            if output.finished:
                final[rid] = output
                done[rid] = time.perf_counter() - start
    wall = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()
    rows = []
    for rid, prompt in zip(ids, prompts, strict=True):
        output = final[rid]
        completion = output.outputs[0]
        cached = int(output.num_cached_tokens or 0)
        token_ids = tokens[rid]
        rows.append(
            {
                "ttft_s": first.get(rid, wall),
                "total_s": done[rid],
                "prompt_tokens": len(prompt),
                "cached_tokens": cached,
                "prefilled_tokens": len(prompt) - cached,
                "output_tokens": len(token_ids),
                "token_ids": token_ids,
                "text": tokenizer.decode(token_ids, skip_special_tokens=True),
                "finish_reason": completion.finish_reason,
            }
        )
    return rows, wall


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table: first column left-aligned, the others right-aligned; None rows are rules."""
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows if row is not None]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    rule = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(cells[0], widths, strict=True))
        )
    )
    print(rule)
    for row in rows:
        if row is None:
            print(rule)
            continue
        text = [str(v) for v in row]
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(text, widths, strict=True))
            )
        )
