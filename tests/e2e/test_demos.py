"""The demos run end to end at their reduced size, and the numbers in their tables make sense.

Each demo runs as a script in a subprocess (as a user runs it: its modes in fresh engine
processes), writes its results with ``--json``, and prints its tables. Thaw modes must serve
prompt tokens from the snapshot or cache; baselines must serve none. vLLM's log lines go to the
log file the demo names, not to the terminal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e
DEMOS = Path(__file__).resolve().parents[2] / "demos"


def run_demo(
    name: str, tmp_path: Path, *extra: str, small: bool = True, timeout: float = 600
) -> tuple[dict[str, Any], str]:
    out = tmp_path / f"{name}.json"
    logs = tmp_path / "logs"
    env = {**os.environ, "THAW_AGENTS_STORE": str(tmp_path / "store"), "THAW_AGENTS_LOGS": str(logs)}
    size = ["--small"] if small else []
    cmd = [sys.executable, str(DEMOS / f"{name}.py"), *size, "--json", str(out), *extra]
    # Its own process group, so a timeout also ends the demo's phase and engine processes.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        partial, _ = proc.communicate()
        pytest.fail(f"{name} did not finish in {timeout:.0f} s; its output so far:\n{partial[-3000:]}")
    assert proc.returncode == 0, stdout[-6000:]
    store = tmp_path / "store"
    leftovers = sorted(store.glob("*.thaw")) if store.exists() else []
    assert not leftovers, f"the demo left snapshots in the store: {leftovers}"
    assert_quiet(stdout, logs)
    return json.loads(out.read_text()), stdout


def assert_quiet(stdout: str, logs: Path) -> None:
    """vLLM's start-up lines are in the named log file, not among what the person reads."""
    named = re.search(r"vLLM's log: (\S+\.log)", stdout)
    assert named, stdout[:2000]
    log = Path(named.group(1))
    assert log.parent == logs and log.stat().st_mode & 0o077 == 0
    assert "Initializing a V1 LLM engine" in log.read_text()
    for noise in ("Initializing a V1 LLM engine", "non-default args", "Loading safetensors checkpoint"):
        assert noise not in stdout, f"{noise!r} reached the terminal:\n{stdout[:4000]}"
    assert "SmolLM2-135M-Instruct, is a 135M model for a CPU" in stdout and "--model" in stdout


def test_parallel_agents(tmp_path: Path) -> None:
    results, stdout = run_demo("parallel_agents", tmp_path)
    thaw, base = results["thaw"], results["baseline"]
    assert len(thaw["branches"]) == len(base["branches"]) == 3
    assert thaw["fork"]["snapshot_tokens"] > 0
    for t, b in zip(thaw["branches"], base["branches"], strict=True):
        assert t["prompt_tokens"] == b["prompt_tokens"] > thaw["fork"]["snapshot_tokens"]
        assert t["cached_tokens"] >= thaw["fork"]["snapshot_tokens"] > 0
        assert t["prefilled_tokens"] == t["prompt_tokens"] - t["cached_tokens"]
        assert b["cached_tokens"] == 0 and b["prefilled_tokens"] == b["prompt_tokens"]
        assert t["fork"] == thaw["fork"]["id"] and b["fork"] is None
        assert t["ttft_s"] > 0 and b["ttft_s"] > 0
    ranking = results["ranking"]
    assert len(ranking) == 3
    assert all(0 <= c["passed"] <= c["total"] == 6 for c in ranking)
    rates = [c["pass_rate"] for c in ranking]
    assert rates == sorted(rates, reverse=True)
    assert "ranking of the thaw run's candidates by pass rate" in stdout
    assert "thaw vs baseline" in stdout
    # ChatThaw's engines are finalised at close, not in interpreter teardown (where vLLM's
    # AsyncLLM.__del__ used to fail with a TypeError).
    assert "Exception ignored" not in stdout


def test_rl_rollout_simulator(tmp_path: Path) -> None:
    results, stdout = run_demo("rl_rollout_simulator", tmp_path)
    thaw, base = results["thaw"], results["baseline"]
    trunk_fork, pivot_fork = thaw["fork_trunk"], thaw["fork_pivot"]
    assert trunk_fork["snapshot_tokens"] > 0 and trunk_fork["files"] == 1
    # The pivot is a fork of the trunk's fork: a two-file chain whose root is the trunk snapshot.
    assert pivot_fork["files"] == 2
    assert pivot_fork["parent"] == trunk_fork["id"]
    assert pivot_fork["chain"][0].startswith(trunk_fork["id"])
    assert pivot_fork["snapshot_tokens"] >= trunk_fork["snapshot_tokens"]
    assert len(thaw["rollouts"]) == len(base["rollouts"]) == results["args"]["rollouts"] > 1
    assert len(thaw["pivot_rollouts"]) == len(base["pivot_rollouts"]) == results["args"]["pivot_rollouts"] > 1
    for row in thaw["rollouts"]:
        assert row["cached_tokens"] == trunk_fork["snapshot_tokens"]
    for row in thaw["pivot_rollouts"]:
        assert row["cached_tokens"] >= trunk_fork["snapshot_tokens"]
        assert row["prompt_tokens"] == thaw["trunk_tokens"] + thaw["pivot"]["tokens"]
    for row in base["rollouts"] + base["pivot_rollouts"]:
        assert row["cached_tokens"] == 0 and row["prefilled_tokens"] == row["prompt_tokens"]
    for run in (thaw, base):
        best = max(r["reward"] for r in run["rollouts"])
        assert run["pivot"]["reward"] == best
        assert 0 < run["pivot"]["tokens"] <= len(run["rollouts"][run["pivot"]["rollout"]]["token_ids"])
    assert "fork pivot (fork of a fork)" in stdout


def test_agent_fork(tmp_path: Path) -> None:
    results, stdout = run_demo("agent_fork", tmp_path)
    session, restore, base = results["session"], results["restore"], results["reprefill"]
    assert session["snapshot_tokens"] > 0 and len(session["turns"]) == 2
    assert restore["snapshot_tokens"] == session["snapshot_tokens"]
    first, first_base = restore["turns"][0], base["turns"][0]
    assert first["prompt_tokens"] == first_base["prompt_tokens"] > session["conversation_tokens"]
    assert first["cached_tokens"] == session["snapshot_tokens"]
    assert first_base["cached_tokens"] == 0 and first_base["prefilled_tokens"] == first_base["prompt_tokens"]
    assert first["prefilled_tokens"] < first_base["prefilled_tokens"]
    # Restored and run alone, the session continues token for token as the original did.
    assert first["text"] == session["reference_turns"][0]["text"]
    assert "restore vs re-prefill" in stdout


def test_pr_review_langgraph(tmp_path: Path) -> None:
    """`make demo`: the four-branch LangGraph review, thaw vs baseline."""
    results, stdout = run_demo("pr_review_langgraph", tmp_path, "--max-tokens=8", small=False)
    runs = {run["mode"]: run for run in results["runs"]}
    assert set(runs) == {"baseline", "thaw"}
    for thaw, base in zip(runs["thaw"]["branches"], runs["baseline"]["branches"], strict=True):
        assert thaw["aspect"] == base["aspect"] and thaw["prompt_tokens"] == base["prompt_tokens"]
        assert base["cached_tokens"] == 0 and base["fork"] is None
        assert 1000 <= thaw["cached_tokens"] < thaw["prompt_tokens"]
    assert len({b["fork"] for b in runs["thaw"]["branches"]}) == 1  # one snapshot, four branches
    assert "PR review, four branches" in stdout and "thaw / baseline:" in stdout
    assert "the reviews (thaw run, clipped)" in stdout


def test_quickstart(tmp_path: Path) -> None:
    """`make quickstart`: the prefix cache in one engine, then a branch in a fresh process."""
    results, stdout = run_demo("quickstart", tmp_path, small=False)
    first, second = results["same_engine"]
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > 0.9 * second["prompt_tokens"]
    base, thaw = results["fresh_process"]["re-prefill"], results["fresh_process"]["thaw"]
    assert base["cached"] == 0 and 0 < thaw["cached"] <= thaw["prompt_tokens"] == base["prompt_tokens"]
    assert "fresh engine process, one branch: thaw vs re-prefill" in stdout


def test_rl_policy_loop(tmp_path: Path) -> None:
    results, stdout = run_demo("rl_policy_loop", tmp_path)
    swap, restart = results["swap"]["steps"], results["restart"]["steps"]
    assert len(swap) == len(restart) == results["args"]["steps"] > 1
    fingerprints = [row["fingerprint"] for row in swap]
    assert len(set(fingerprints)) == len(fingerprints)  # every step's weights are new weights
    for row in swap[1:]:
        assert row["stale_refused_on"] == "model_fingerprint"  # last step's trunk snapshot
    for row in swap + restart:
        assert row["snapshot_tokens"] > 0 and min(row["cached_tokens"]) == row["snapshot_tokens"]
    # The swapped engine and an engine started on the same file: the same seeded rollouts.
    for swapped, restarted in zip(swap, restart, strict=True):
        assert swapped["first_text"] == restarted["first_text"], swapped["step"]
    assert "Per step: new weights into the rollout engine" in stdout
