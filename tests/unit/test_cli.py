"""``thaw-agents`` on the command line: a user error is one clear line on stderr, never a traceback."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from thaw_agents import cli
from thaw_agents._container import MAGIC


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 1 and out == ""
    assert err.startswith("thaw-agents: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert all(c.isprintable() for c in err.rstrip("\n")), err
    for word in words:
        assert word in err, err


def test_info_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(*_run(capsys, "info", str(tmp_path / "nope.thaw")), "no snapshot file here")


def test_info_on_a_folder_and_a_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(*_run(capsys, "info", str(tmp_path)), "directory")
    fifo = tmp_path / "pipe.thaw"
    os.mkfifo(fifo)
    _one_line_error(*_run(capsys, "info", str(fifo), "--verify"), "FIFO")


def test_info_on_garbage_and_a_hostile_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x\x1b[2J\nchecksums  verified.thaw"
    bad.write_bytes(b"not a snapshot at all")
    code, out, err = _run(capsys, "info", str(bad))
    _one_line_error(code, out, err, "\\x1b", "\\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-0 file anyway")
def test_info_on_an_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "locked.thaw"
    path.write_bytes(b"THAWSNAP")
    path.chmod(0)
    _one_line_error(*_run(capsys, "info", str(path)), "permission denied")


def _kv_header_with(model_name: str) -> bytes:
    """A KV header whose model name holds terminal escapes (the file is refused later, by its
    id; what matters here is how its strings are printed in the error)."""
    header = {"format": "thaw", "format_version": 2, "kind": "kv", "checksum_algorithm": "blake3",
              "created_by": model_name, "payload_nbytes": 0, "regions": [],
              "kv": {"kv_spec": {"model_name": model_name}}}  # fmt: skip
    raw = json.dumps(header, ensure_ascii=True).encode()
    return raw + b" " * (-(16 + len(raw)) % 4096)


def test_header_strings_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.thaw"
    raw = _kv_header_with("\x1b]0;pwned\x07\nchecksums  verified\ud800")
    path.write_bytes(struct.pack("<8sQ", MAGIC, len(raw)) + raw)
    code, out, err = _run(capsys, "info", str(path), "--verify")
    _one_line_error(code, out, err)
    assert "\x1b" not in err and "\ud800" not in err


def test_freeze_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(
        *_run(capsys, "freeze", str(tmp_path / "missing"), "-o", str(tmp_path / "w.thaw")), "no model folder"
    )
    _one_line_error(
        *_run(capsys, "freeze", "default", "-o", str(tmp_path / "no" / "such" / "w.thaw")), "output folder"
    )
    plain = tmp_path / "file"
    plain.write_text("x")
    _one_line_error(*_run(capsys, "freeze", str(plain), "-o", str(tmp_path / "w.thaw")), "not a folder")


def _valid_kv_file(store: Path, model_name: str) -> Path:
    """A small, self-consistent KV snapshot in the folder ``store``, written as the engine writes one."""
    from thaw_agents._kvspec import KVSpec, LayerSpec
    from thaw_agents._manifest import derive_snapshot, write_kv_snapshot

    spec = KVSpec(model_name=model_name, model_fingerprint="sha256:test", vllm_version="0", platform="cpu",
                  kv_layout="test", dtype="float16", block_size=2,
                  layers=(LayerSpec(name="l0", block_shape=(2, 2), block_nbytes=8),))  # fmt: skip
    content = derive_snapshot(spec, [5, 6, 7, 8, 9])
    return Path(write_kv_snapshot(store, spec, content, [b"\1" * 8, b"\2" * 8]).path)


def test_info_shows_header_strings_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _valid_kv_file(tmp_path, "evil\x1b[2J\nchecksums  verified\u2028")
    code, out, err = _run(capsys, "info", str(path), "--verify")
    assert code == 0 and err == ""
    assert out.count("\n") == 12 and "\x1b" not in out and "\u2028" not in out
    assert "evil\\x1b[2J\\nchecksums  verified\\u2028" in out
    assert out.splitlines()[-1].split() == ["checksums", "verified"]
    code, out, err = _run(capsys, "info", str(path), "--json")
    assert (
        code == 0 and out.isascii() and json.loads(out)["kv"]["kv_spec"]["model_name"].startswith("evil\x1b")
    )


def test_verbose_flag_before_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(*_run(capsys, "-v", "info", str(tmp_path / "nope.thaw")), "no snapshot file here")
    # A usage error of an engine command stays one line: the log file is set up after the checks.
    _one_line_error(*_run(capsys, "bench", "no_such_benchmark"), "no benchmark")


def test_engine_logs_go_to_a_named_owner_only_file(tmp_path: Path) -> None:
    """What `serve`, `freeze` and `bench` do before starting an engine, in a fresh process: vLLM's
    lines (this process's and a child's that configures vLLM's logging) land in the file."""
    import subprocess
    import sys

    code = (
        "import logging, subprocess, sys\n"
        "from thaw_agents import cli\n"
        "cli._quiet_engine_logs('serve', False)\n"
        "logging.getLogger('vllm.engine').info('parent line')\n"
        "child = 'from vllm.logger import _configure_vllm_root_logger as c, init_logger as i; "
        'c(); i("vllm.worker").info("child line")\'\n'
        "subprocess.run([sys.executable, '-c', child], check=True)\n"
    )
    env = {**os.environ, "THAW_AGENTS_LOGS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    (log,) = tmp_path.glob("serve-*.log")
    assert f"thaw-agents: vLLM's log: {log} (thaw-agents -v serve shows it here)" in out.stderr
    text = log.read_text()
    assert "parent line" in text and "child line" in text
    assert "line" not in out.stdout + out.stderr.replace(str(log), "")
    assert log.stat().st_mode & 0o077 == 0
