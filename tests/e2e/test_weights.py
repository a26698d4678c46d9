"""Frozen weights: bit-exact round trips, hostile files, and vLLM's ``load_format="thaw"``.

The engine tests run every engine in a subprocess (the session's in-process engine owns
this one): freeze the default model with ``thaw-agents freeze``, then compare greedy output
of a normal load and a thaw load, one request at a time on both sides, token for token, with
the in-process engine core and with the multiprocess one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thaw_agents import (
    ConfigError,
    SnapshotChecksumError,
    SnapshotFormatError,
    SnapshotMismatchError,
    SnapshotNotFoundError,
    SnapshotTruncatedError,
    SnapshotWriteError,
)
from thaw_agents.weights import (
    HostWeights,
    freeze_module,
    freeze_tensors,
    module_tensors,
    read_weights_manifest,
    restore_module,
    restore_tensors,
)

SOURCES = ["auto", "direct", "buffered", "mmap"]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(100, 16),
        torch.nn.Linear(16, 33).to(torch.bfloat16),
        torch.nn.LayerNorm(33),
        torch.nn.BatchNorm1d(33),  # persistent buffers (running stats, an int64 counter)
    )
    model[3].running_mean.uniform_()
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.fixture()
def frozen(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = _model(0)
    path = tmp_path / "m.thaw"
    freeze_module(model, path, model_name="tiny", model_fingerprint="sha256:tiny")
    return model, path


@pytest.mark.parametrize("source", SOURCES)
def test_round_trip_is_bit_exact(frozen, source: str) -> None:
    model, path = frozen
    fresh = _model(1)
    assert not _same(model, fresh)
    stats = restore_module(fresh, path, expect_fingerprint="sha256:tiny", source=source)
    assert _same(model, fresh)
    assert stats.num_tensors == len(module_tensors(model)) and stats.nbytes > 0


def test_manifest_and_file_mode(frozen) -> None:
    model, path = frozen
    manifest = read_weights_manifest(path)
    assert [e.name for e in manifest.tensors] == [n for n, _ in module_tensors(model)]
    assert manifest.tensors[1].dtype == "bfloat16"
    assert "running_mean" in {e.name.split(".")[-1] for e in manifest.tensors}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert b"pickle" not in path.read_bytes()[:4096]


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    freeze_module(model, tmp_path / "t.thaw", model_name="t", model_fingerprint="f")
    assert len(read_weights_manifest(tmp_path / "t.thaw").tensors) == 1


def test_host_weights(frozen) -> None:
    model, path = frozen
    fresh = _model(2)
    HostWeights.load(path).restore(module_tensors(fresh))
    assert _same(model, fresh)
    mapped = HostWeights.map(path)
    fresh = _model(3)
    mapped.restore(module_tensors(fresh))
    mapped.close()
    assert _same(model, fresh)


def _untouched(path: Path, error: type[Exception], source: str = "auto") -> None:
    fresh = _model(5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(error):
        restore_module(fresh, path, source=source)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("source", SOURCES)
def test_corrupt_byte_leaves_the_model_untouched(frozen, source: str) -> None:
    _, path = frozen
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # the last tensor: every earlier one verifies
    path.write_bytes(bytes(data))
    _untouched(path, SnapshotChecksumError, source)


@pytest.mark.parametrize("cut", [1, 4096, 10_000])
def test_truncated_file_leaves_the_model_untouched(frozen, cut: int) -> None:
    _, path = frozen
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - cut])
    _untouched(path, SnapshotTruncatedError)


def test_full_disk_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    import errno

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    model = _model(3)
    with pytest.raises(SnapshotWriteError, match="no space left on the device") as caught:
        freeze_module(model, tmp_path / "w.thaw", model_name="m", model_fingerprint="f")
    assert "bytes needed" in str(caught.value) and caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_hostile_headers(frozen, tmp_path: Path) -> None:
    _, path = frozen
    data = path.read_bytes()
    (tmp_path / "magic.thaw").write_bytes(b"NOTTHAW!" + data[8:])
    _untouched(tmp_path / "magic.thaw", SnapshotFormatError)
    # A manifest whose shape disagrees with its region size.
    text = data[16:4096].decode()
    bad = text.replace('"shape":[100,16]', '"shape":[100,15]')
    assert bad != text
    (tmp_path / "shape.thaw").write_bytes(data[:16] + bad.encode() + data[4096:])
    _untouched(tmp_path / "shape.thaw", SnapshotFormatError)
    _untouched(tmp_path / "missing.thaw", SnapshotNotFoundError)


def test_mismatched_targets_are_refused(frozen) -> None:
    _, path = frozen
    with pytest.raises(SnapshotMismatchError) as info:
        restore_module(_model(1), path, expect_fingerprint="sha256:other")
    assert info.value.field == "model_fingerprint"
    other = torch.nn.Sequential(torch.nn.Embedding(100, 16))
    with pytest.raises(SnapshotMismatchError, match="tensors"):
        restore_module(other, path)
    wrong = _model(1)
    wrong[1] = torch.nn.Linear(16, 33)  # float32 where the file holds bfloat16
    with pytest.raises(SnapshotMismatchError) as info:
        restore_module(wrong, path)
    assert info.value.field == "1.weight.dtype"


def test_empty_and_plain_tensors(tmp_path: Path) -> None:
    tensors = {"a": torch.empty(0), "b": torch.arange(5, dtype=torch.int32)}
    freeze_tensors(tmp_path / "e.thaw", tensors, model_name="m", model_fingerprint="f")
    out = {"a": torch.empty(0), "b": torch.zeros(5, dtype=torch.int32)}
    restore_tensors(tmp_path / "e.thaw", out)
    assert out["b"].tolist() == [0, 1, 2, 3, 4]


# -- vLLM: the thaw load format ------------------------------------------------------------------

_CHILD = r"""
import json, sys
from vllm import LLM, SamplingParams
from thaw_agents._engine import WORKER_EXTENSION
from thaw_agents.models import default_model

key, path = sys.argv[1], sys.argv[2]  # freeze_to: a normal load that also writes the file
llm = LLM(str(default_model()), enforce_eager=True, kv_cache_memory_bytes=1 << 30, max_model_len=1024,
          seed=0, load_format="thaw", model_loader_extra_config={key: path},
          worker_extension_cls=WORKER_EXTENSION)
params = SamplingParams(temperature=0, max_tokens=16)
prompts = ["The capital of France is", "def fibonacci(n):"]
tokens = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
print("TOKENS " + json.dumps(tokens))
print("LOADED " + json.dumps(llm.collective_rpc("thaw_weights_loaded")[0]))
"""


def _start(key: str, path: Path, multiprocessing: bool) -> subprocess.Popen[str]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocessing else "0")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, key, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _tokens(proc: subprocess.Popen[str]) -> tuple[list[list[int]], dict]:
    """The child's greedy tokens, and what its worker reports its thaw load moved."""
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    lines = [line for line in out.splitlines() if line.startswith(("TOKENS ", "LOADED "))]
    assert proc.returncode == 0 and len(lines) == 2, err[-3000:]
    return json.loads(lines[0].removeprefix("TOKENS ")), json.loads(lines[1].removeprefix("LOADED "))


@pytest.mark.e2e
def test_vllm_thaw_load_format_matches_a_normal_load(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Normal load (vLLM's default loader; the thaw loader writes the file as a side effect)
    against restores from that file, with the in-process and the multiprocess engine core."""
    path = tmp_path_factory.mktemp("weights") / "smollm2.thaw"
    normal, frozen = _tokens(_start("freeze_to", path, multiprocessing=False))
    manifest = read_weights_manifest(path)
    assert manifest.nbytes > 200e6 and len(manifest.tensors) > 100
    assert frozen["op"] == "freeze" and frozen["nbytes"] == manifest.nbytes
    restored = [_tokens(_start("snapshot", path, multiprocessing=mp)) for mp in (False, True)]
    assert [tokens for tokens, _ in restored] == [normal, normal]
    for _, loaded in restored:
        assert loaded["op"] == "restore" and loaded["path"] == str(path)
        assert loaded["nbytes"] == manifest.nbytes and loaded["num_tensors"] == len(manifest.tensors)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"freeze_to": "/tmp/x.thaw", "load_format": "thaw"}, "not 'thaw'"),
        ({"snapshot": "/tmp/x.thaw", "load_format": "dummy"}, "before freeze_to"),
        ({"snapshot": "/tmp/x.thaw", "freeze": 1}, "unknown model_loader_extra_config keys"),
    ],
)
def test_thaw_load_format_refuses_contradictory_config(extra: dict, message: str) -> None:
    from vllm.config.load import LoadConfig

    from thaw_agents.weights._vllm import _loader_class

    with pytest.raises(ConfigError, match=message):
        _loader_class()(LoadConfig(load_format="thaw", model_loader_extra_config=extra))


def test_freeze_cli_arguments(monkeypatch, tmp_path: Path, capsys) -> None:
    from thaw_agents import cli, weights

    calls = []

    def fake_freeze(model, output, **kwargs):
        calls.append((model, output, kwargs))
        freeze_tensors(output, {"w": torch.ones(2)}, model_name="m", model_fingerprint="f")
        return str(output)

    monkeypatch.setattr(weights, "freeze_model", fake_freeze)
    out = tmp_path / "w.thaw"
    assert cli.main(["freeze", "default", "--output", str(out), "--dtype", "bfloat16"]) == 0
    assert calls == [(None, str(out), {"dtype": "bfloat16"})]
    assert "froze 1 tensors" in capsys.readouterr().out
