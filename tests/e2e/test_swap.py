"""``swap_weights`` into a running engine, end to end with a real vLLM engine.

The engines run in child processes (tests/helpers/swap_child.py: an in-process engine owns
process-wide state, and the session may hold one already): two tiny Llamas of the same shapes
and other weights, float32, greedy, one request at a time on both sides of every comparison.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers.swap_models import run_child, swap_models


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder, _ = swap_models(tmp_path_factory)
    return json.loads(run_child("swap", folder).strip().splitlines()[-1])


def test_swap_gives_a_fresh_engines_output_and_back(run: dict[str, Any]) -> None:
    assert run["fresh_a"] != run["fresh_b"]  # the two models really differ
    assert run["start"] == run["fresh_a"]
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
