"""``swap_weights`` into a running engine, end to end with a real vLLM engine.

The engines run in one child process (tests/helpers/swap_child.py: an in-process engine owns
process-wide state, and the session may hold one already): two tiny Llamas of the same shapes
and other weights, float32, greedy, one request at a time on both sides of every comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHILD = Path(__file__).resolve().parent.parent / "helpers" / "swap_child.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("swap")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(folder)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_swap_gives_a_fresh_engines_output_and_back(run: dict[str, Any]) -> None:
    assert run["fresh_a"] != run["fresh_b"]  # the two models really differ
    assert run["swapped_b"] == run["fresh_b"]
    assert run["swapped_back"] == run["fresh_a"]


def test_swap_from_host_weights(run: dict[str, Any]) -> None:
    assert run["host_b"] == run["fresh_b"]
    assert run["host_route"] == "host"  # the caller's verified copy, no file read


def test_bad_files_are_typed_errors_and_leave_the_old_weights(run: dict[str, Any]) -> None:
    bad = run["bad"]
    assert bad["corrupt"]["type"] == "SnapshotChecksumError"
    assert bad["truncated"]["type"] == "SnapshotTruncatedError"
    assert bad["foreign"]["type"] == "SnapshotMismatchError"
    assert bad["foreign"]["field"] == "model.layers.0.mlp.down_proj.weight.shape"
    assert bad["missing"]["type"] == "SnapshotNotFoundError"
    assert run["after_bad"] == run["fresh_a"]
    assert run["fingerprint_after_bad"] == run["fingerprint_start"]


def test_swap_changes_the_fingerprint(run: dict[str, Any]) -> None:
    assert run["fingerprint_b"] == run["swap_b"]["fingerprint"] != run["fingerprint_start"]
    assert run["fingerprint_back"] not in {run["fingerprint_b"], run["fingerprint_start"]}


def test_a_snapshot_of_the_old_weights_is_refused(run: dict[str, Any]) -> None:
    for how in ("stale_with_fork", "stale_hydrate"):
        assert run[how]["type"] == "SnapshotMismatchError", run[how]
        assert run[how]["field"] == "model_fingerprint"
    raw = run["stale_raw"]
    assert raw["num_cached_tokens"] == 0
    assert "model_fingerprint" in raw["report"]["error"]


def test_a_snapshot_of_the_new_weights_is_served(run: dict[str, Any]) -> None:
    assert run["fresh_snapshot_served"] == 96  # 3 full blocks of 32 (the last token is computed)
