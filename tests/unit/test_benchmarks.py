"""Every benchmark script takes where its JSON goes, so a run need not touch the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py") if p.name[0] != "_"
)
# gpu_engine writes one JSON per phase, so it takes a folder.
FOLDER_FLAG = {"gpu_engine.py"}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_takes_an_output_path(script: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    flag = "--out-dir" if script.name in FOLDER_FLAG else "--out "
    assert flag in done.stdout + " ", done.stdout
