"""Two tiny Llamas of the same shapes and other weights, their weights files (float32) and the
greedy output of a fresh engine on each: made once per test session, in a child process
(tests/helpers/swap_child.py), for test_swap and test_serve_weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHILD = Path(__file__).resolve().parent / "swap_child.py"
# What the child's engines use (the server is started with the same).
SETTINGS_ARGV = ["--dtype", "float32", "--max-model-len", "512", "--block-size", "32"]


def run_child(stage: str, folder: Path) -> str:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    proc = subprocess.run(
        [sys.executable, str(CHILD), stage, str(folder)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def swap_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The folder and ``models.json``: ``{"a"|"b": {"model", "file", "greedy"}}``."""
    folder = tmp_path_factory.getbasetemp() / "swap-models"
    done = folder / "models.json"
    if not done.exists():
        folder.mkdir(exist_ok=True)
        run_child("models", folder)
    return folder, json.loads(done.read_text())
