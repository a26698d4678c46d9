"""Tensor parallel on two GPUs (``benchmarks/gpu_tp.py`` end to end; skipped with fewer GPUs).

A TP=2 parent forks a trunk and freezes its weights per rank; a fresh TP=2 engine restores the
weights (greedy output equal: the same weights), hydrates the snapshot (every token served) and
continues the parent's prompt exactly as the parent's own prefix-cache hit did (one request on
each side: the same batch composition); rank 1's corrupt weights file stops a TP=2 start with a
typed error; a TP=1 engine refuses the TP=2 snapshot naming ``tensor_parallel_size``.

``THAW_GPU_MODEL`` names the model (the 8B-shaped config; dummy weights are frozen, so no
checkpoint is needed); ``THAW_GPU_RESULTS``, when set, keeps the JSON there as the benchmark's.
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


def _gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA GPUs")
def test_tp2_fork_hydrate_and_weights_per_rank(tmp_path: Path) -> None:
    out_dir = Path(os.environ.get("THAW_GPU_RESULTS") or tmp_path / "out")
    model = os.environ.get("THAW_GPU_MODEL")
    if not model:
        pytest.skip("THAW_GPU_MODEL names the model folder")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_tp.py"), "--model", model, "--eager"]
    out = out_dir / "gpu_tp-nvidia-h200-x2.json"
    cmd += ["--out", str(out), "--trunk-tokens", "4000"]
    cmd += ["--weights-dir", str(Path("/dev/shm") / f"thaw-tp-test-{os.getpid()}")]
    subprocess.run(cmd, check=True, timeout=1800)
    data = json.loads(out.read_text())

    parent = data["parent"]
    assert parent["tensor_parallel_size"] == 2 and len(parent["kv_head_slices"]) == 2
    assert parent["snapshot_tokens"] == 4000 and parent["hit_cached"] >= 4000
    child = data["child"]
    assert child["plain_equal"], "the restored weights answer differently from the frozen ones"
    assert child["hydrated_tokens"] == parent["snapshot_tokens"]
    assert child["cached_after_hydrate"] >= parent["snapshot_tokens"] and child["greedy_equal"]
    assert [r["op"] for r in child["ranks"]] == ["restore", "restore"]
    assert child["ranks"][0]["nbytes"] == child["ranks"][1]["nbytes"] > 0
    assert data["corrupt"]["started"] is False
    single = data["single"]
    assert single["error"] == "SnapshotMismatchError" and single["field"] == "tensor_parallel_size"
    assert single["cached_with_fork"] < parent["snapshot_tokens"]
    one = data["single-restore"]["ranks"][0]
    assert one["op"] == "restore" and one["nbytes"] >= 1.9 * child["ranks"][0]["nbytes"]
