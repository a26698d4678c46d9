"""The tensor-parallel KV file: every rank writes its share, the last one renames the file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from thaw_agents import SnapshotMismatchError
from thaw_agents._kv_ranks import combine_rank_results
from thaw_agents._kvspec import KVSpec, LayerSpec, kv_head_slices
from thaw_agents._manifest import check_compatible, derive_snapshot, read_kv_manifest, write_kv_snapshot
from thaw_agents._store import snapshot_path

BS = 4


def _spec(tp: int = 2) -> KVSpec:
    return KVSpec(
        model_name="m",
        model_fingerprint="sha256:" + "0" * 64,
        vllm_version="0.32.0",
        platform="cpu",
        kv_layout="cpu-attn/vec",
        dtype="float32",
        block_size=BS,
        layers=(LayerSpec(name="l0", block_shape=(1, BS, 2), block_nbytes=32),),
        tensor_parallel_size=tp,
        kv_head_slices=kv_head_slices(2, tp) if tp > 1 else (),
    )


def _share(rank: int, block: int) -> bytes:
    return bytes([16 * rank + block]) * 32


def test_every_rank_writes_its_share_and_the_last_one_publishes(tmp_path: Path) -> None:
    spec = _spec()
    content = derive_snapshot(spec, list(range(3 * BS + 1)))
    blocks = {r: [_share(r, i) for i in range(3)] for r in (0, 1)}
    assert write_kv_snapshot(tmp_path, spec, content, blocks[1], rank=1, job="req-1") is None
    dest = snapshot_path(tmp_path, content.snapshot_id)
    assert not dest.exists()  # rank 0 has not written its share yet
    container = write_kv_snapshot(tmp_path, spec, content, blocks[0], rank=0, job="req-1")
    assert container is not None and dest.exists() and os.listdir(tmp_path) == [dest.name]
    assert (dest.stat().st_mode & 0o777) == 0o600
    manifest = read_kv_manifest(dest, expect_id=content.snapshot_id)
    assert manifest.spec == spec and manifest.num_blocks == 3
    data = dest.read_bytes()
    for rank in (0, 1):
        for i in range(3):
            offset, nbytes, _ = manifest.block_source(i, rank)
            assert data[offset : offset + nbytes] == _share(rank, i)


def test_ranks_writing_at_once_publish_exactly_one_file(tmp_path: Path) -> None:
    spec = _spec(4)
    content = derive_snapshot(spec, list(range(2 * BS)))
    results = {}

    def write(rank: int) -> None:
        shares = [_share(rank, i) for i in range(2)]
        results[rank] = write_kv_snapshot(tmp_path, spec, content, shares, rank=rank, job="j")

    threads = [threading.Thread(target=write, args=(r,)) for r in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is not None for r in results.values()) == 1
    assert os.listdir(tmp_path) == [content.snapshot_id + ".thaw"]
    manifest = read_kv_manifest(snapshot_path(tmp_path, content.snapshot_id))
    assert manifest.spec.kv_head_slices == ((0, 1), (0, 1), (1, 2), (1, 2))  # 2 heads, 4 ranks


def test_another_tensor_parallel_size_is_refused_by_name() -> None:
    with pytest.raises(SnapshotMismatchError) as info:
        check_compatible(_spec(2), _spec(1))
    assert info.value.field == "tensor_parallel_size"
    assert KVSpec.from_json(_spec(2).to_json()) == _spec(2)
    assert "tensor_parallel_size" not in _spec(1).to_json()  # single-rank files are unchanged
    assert derive_snapshot(_spec(2), [1] * BS).snapshot_id != derive_snapshot(_spec(1), [1] * BS).snapshot_id


def test_a_save_is_done_when_every_rank_is() -> None:
    written = {"snapshot_id": "s", "status": "written", "nbytes": 8, "ms": 1.0}
    failed = {"snapshot_id": "s", "status": "failed", "error": {"type": "X"}, "rank": 1}
    assert combine_rank_results([{**written, "rank": 0}, None]) is None
    assert combine_rank_results([{**written, "rank": 0}, failed])["status"] == "failed"
    both = combine_rank_results([{**written, "rank": 1, "ms": 3.0}, {**written, "rank": 0}])
    assert both == {"snapshot_id": "s", "status": "written", "nbytes": 16, "ms": 3.0}
