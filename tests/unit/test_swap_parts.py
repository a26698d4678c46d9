"""The parts of ``swap_weights`` that need no engine: the content fingerprint, errors crossing
from a worker, and the worker's own HostWeights copies (tests/e2e/test_swap.py runs the swap)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from thaw_agents import SnapshotChecksumError, SnapshotMismatchError
from thaw_agents._errors import error_json
from thaw_agents.connector import worker_extension
from thaw_agents.weights import freeze_tensors, read_weights_manifest, weights_fingerprint
from thaw_agents.weights._swap import _raise_error


def _file(folder: Path, name: str, value: float) -> Path:
    path = folder / f"{name}.thaw"
    freeze_tensors(path, {"w": torch.full((8,), value)}, model_name=name, model_fingerprint="f")
    return path


def test_fingerprint_is_the_content(tmp_path: Path) -> None:
    a, same, other = _file(tmp_path, "a", 1.0), _file(tmp_path, "same", 1.0), _file(tmp_path, "o", 2.0)
    fa, fs, fo = (weights_fingerprint(read_weights_manifest(p)) for p in (a, same, other))
    assert fa == fs != fo and fa.startswith("sha256:")


def test_worker_errors_arrive_typed() -> None:
    with pytest.raises(SnapshotMismatchError) as caught:
        _raise_error(error_json(SnapshotMismatchError("x.shape", (1,), (2,), path="/f")))
    assert caught.value.field == "x.shape"
    with pytest.raises(SnapshotChecksumError, match="region 3") as checksum:
        _raise_error(error_json(SnapshotChecksumError("region 3 differs", path="/f")))
    assert str(checksum.value) == "/f: region 3 differs"  # the path once, as the worker had it


def test_worker_keeps_two_host_copies(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(worker_extension, "_HOST_COPIES", {})
    files = [str(_file(tmp_path, f"f{i}", float(i))) for i in range(3)]
    other_pid = os.getpid() + 1  # as a worker in another process sees the caller
    first = worker_extension._host_weights(files[0], "load", other_pid, 0)
    assert worker_extension._host_weights(files[0], "load", other_pid, 0) is first  # reused
    worker_extension._host_weights(files[1], "load", other_pid, 0)
    worker_extension._host_weights(files[2], "load", other_pid, 0)
    assert [k[0] for k in worker_extension._HOST_COPIES] == files[1:]  # the oldest went
    _file(tmp_path, "f2", 9.0)  # rewritten: a private copy is reloaded
    again = worker_extension._host_weights(files[2], "load", other_pid, 0)
    target = torch.zeros(8)
    again.restore({"w": target})
    assert target.tolist() == [9.0] * 8
