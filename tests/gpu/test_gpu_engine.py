"""The real vLLM engine on a GPU, end to end (``benchmarks/gpu_engine.py`` at test sizes).

* a parent engine forks a 2,000-token trunk; a fresh engine process hydrates it from shared
  memory and from a cold file: tokens served = the snapshot's tokens, greedy output equal to the
  parent's own cache-hit run (one request each: the same batch composition); the KV layout is
  the backend vLLM resolved (never "auto") and the blocks went through the CUDA loader;
* branches from it in the parent engine (``fork_completions`` and ``fork`` + ``with_fork``);
* ChatThaw on ``AsyncLLM``: 8 concurrent calls, each answered;
* weights: random safetensors -> ``freeze`` -> ``load_format="thaw"``: greedy output equal.

Eager mode keeps the engine starts short; the benchmark runs the same paths with CUDA graphs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_engine.py"


def _run(tmp_path: Path, *phase_args: str, timeout: float = 600) -> Path:
    model = os.environ.get("THAW_GPU_MODEL")
    cmd = [sys.executable, str(SCRIPT), "--eager", "--out-dir", str(tmp_path / "out")]
    cmd += ["--file-dir", str(tmp_path / "files")]
    if model:
        cmd += ["--model", model]
    fmt = os.environ.get("THAW_GPU_LOAD_FORMAT")
    if fmt:
        cmd += ["--load-format", fmt]
    cmd += list(phase_args)
    subprocess.run(cmd, check=True, timeout=timeout)
    return tmp_path / "out"


def test_fork_hydrate_and_branches(tmp_path):
    out = _run(
        tmp_path,
        *("--phases", "hydrate", "rounds", "--lengths", "2000", "--repeats", "1"),
        *("--rounds", "1", "--trunk-tokens", "2000", "--max-tokens", "16", "--max-model-len", "4096"),
    )
    data = json.loads((out / "gpu_hydrate.json").read_text())
    assert data["spec"]["kv_layout"].startswith("cuda/flash-attn/"), data["spec"]["kv_layout"]
    assert "auto" not in data["spec"]["kv_layout"]
    rows = {r["mode"]: r for r in data["rows"] if r["prefix_tokens"] == 2000}
    for mode in ("shm", "file", "hydrate"):
        fidelity = rows[mode]["fidelity"]
        assert fidelity["tokens_equal"], (mode, fidelity)
        assert fidelity["cached_tokens"] == fidelity["expected_cached"] == 2000, (mode, fidelity)
        assert fidelity["report"]["loaded_tokens"] == 2000 and not fidelity["report"]["recomputed_tokens"]
        assert rows[mode]["engine_restore_all"][0]["route"] == "cuda"
    assert rows["re-prefill"]["cached_tokens"] == 0
    assert rows["hydrate"]["cached_tokens"] == 2000  # loaded by the request after hydrate()
    rounds = data["rounds_eager"]
    for mode in ("fork_completions", "fork+snapshot"):
        assert rounds[mode]["tokens_per_branch"] == 16
        assert rounds[mode]["cached_min"] >= 2000 - 16


def test_chat_thaw_concurrent(tmp_path):
    out = _run(tmp_path, "--phases", "chat", "--rounds", "1", "--max-tokens", "16", "--max-model-len", "2048")
    data = json.loads((out / "gpu_chat.json").read_text())
    assert data["all_answered"]
    assert data["concurrent_runs"][0][1] > 0 and data["batched_runs"][0][1] > 0


@pytest.mark.skipif(os.environ.get("THAW_GPU_WEIGHTS_TEST", "1") == "0", reason="THAW_GPU_WEIGHTS_TEST=0")
def test_weights_freeze_and_thaw_restore(tmp_path):
    weights = os.environ.get("THAW_GPU_WEIGHTS_DIR", str(tmp_path / "weights"))
    out = _run(tmp_path, "--phases", "weights", "--weights-dir", weights, "--keep-weights", timeout=900)
    data = json.loads((out / "gpu_weights.json").read_text())
    assert data["greedy_equal"], data
    assert data["from_thaw_shm"]["start_to_first_token_s"] > 0
