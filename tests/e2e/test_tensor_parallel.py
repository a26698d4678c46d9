"""Tensor-parallel engines (TP=2, for real on the CPU machine): KV snapshots and weights per rank.

One TP=2 parent engine (in this process's engine core, a worker process per rank) forks a
prefix and freezes its weights per rank as it loads; then one fresh process starts a TP=2 engine
from those weights files, hydrates the snapshot and continues the parent's prompt, tries an
engine whose rank-1 weights file is corrupt, and a TP=1 engine that must refuse the snapshot.
Only one engine runs at a time; the model is a tiny random float32 Llama (4 attention heads,
2 KV heads: one KV head per rank), so greedy output does not depend on the batch.

vLLM's CPU build binds each rank to a core (``VLLM_CPU_OMP_THREADS_BIND="0|1"``; without it it
refuses a second rank on a one-NUMA-node machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.tiny_model import build_tiny_model
from helpers.vllm_env import vllm_environ
from vllm import SamplingParams, TokensPrompt

import thaw_agents
from thaw_agents.weights import read_weights_manifest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on CPU binds one core per rank"),
]
HELPERS = Path(__file__).resolve().parents[1] / "helpers"
BS = 32  # thaw_agents.engine_kwargs' CPU block size
TP_ENGINE: dict[str, Any] = {
    "tensor_parallel_size": 2,
    "distributed_executor_backend": "mp",
    "dtype": "float32",
    "max_model_len": 512,
    "kv_cache_memory_bytes": 32 << 20,  # per rank
    "max_num_seqs": 4,
    "seed": 0,
}
SINGLE_ENGINE = {
    k: v for k, v in TP_ENGINE.items() if k not in {"tensor_parallel_size", "distributed_executor_backend"}
}
_rng = random.Random(16)
TRUNK = [_rng.randrange(100, 40000) for _ in range(4 * BS + 10)]  # 4 full blocks and a tail
SUFFIX = [_rng.randrange(100, 40000) for _ in range(7)]
PLAIN = [_rng.randrange(100, 40000) for _ in range(40)]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def _bound_ranks():
    """One core per rank, for the engines this process and its children start (seen by vLLM
    even after an earlier test's in-process engine froze vLLM's environment)."""
    return vllm_environ(VLLM_CPU_OMP_THREADS_BIND="0|1")


def _generate(llm, prompt: list[int], params: SamplingParams = GREEDY):
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    return out.num_cached_tokens, list(out.outputs[0].token_ids), out.kv_transfer_params


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tp-model") / "tiny-llama-tp"
    return build_tiny_model(folder, num_attention_heads=4, num_key_value_heads=2, dtype="float32")


@pytest.fixture(scope="module")
def parent(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Everything the TP=2 parent does, run once; the engine is shut down before the child starts."""
    weights = str(tmp_path_factory.mktemp("tp-weights") / "tiny.rank{rank}.thaw")
    with _bound_ranks():
        llm = thaw_agents.make_llm(
            str(model), **TP_ENGINE, load_format="thaw", model_loader_extra_config={"freeze_to": weights}
        )
    try:
        handle = thaw_agents.fork(llm, TRUNK)
        # The parent's own continuation: the trunk from its prefix cache, then the suffix.
        base = _generate(llm, TRUNK + SUFFIX)
        llm.reset_prefix_cache()
        # The same request loading the trunk from the snapshot, on both ranks.
        loaded = _generate(llm, TRUNK + SUFFIX, thaw_agents.with_fork(GREEDY, handle, llm))
        llm.reset_prefix_cache()
        plain = _generate(llm, PLAIN)
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
    return {"handle": handle, "base": base, "loaded": loaded, "plain": plain, "weights": weights}


@pytest.fixture(scope="module")
def child(parent: dict[str, Any], model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fresh process: restored TP=2 engine, corrupt-rank TP=2 start, TP=1 engine."""
    folder = tmp_path_factory.mktemp("tp-child")
    corrupt = folder / "tiny.rank{rank}.thaw"
    for rank in (0, 1):
        data = bytearray(Path(parent["weights"].format(rank=rank)).read_bytes())
        if rank == 1:
            data[-1] ^= 0xFF  # the last payload byte of rank 1's file
        Path(str(corrupt).format(rank=rank)).write_bytes(bytes(data))
    job = {
        "model": str(model),
        "engine": TP_ENGINE,
        "single_engine": SINGLE_ENGINE,
        "weights": parent["weights"],
        "corrupt_weights": str(corrupt),
        "snapshot_id": parent["handle"].id,
        "suffix": SUFFIX,
        "plain": PLAIN,
        "max_tokens": GREEDY.max_tokens,
    }
    (folder / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        [sys.executable, str(HELPERS / "tp_child.py"), str(folder / "job.json"), str(folder / "out.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = json.loads((folder / "out.json").read_text()) if (folder / "out.json").exists() else {}
    assert proc.returncode == 0 and "single" in out, proc.stderr[-4000:]
    out["log"] = proc.stdout + proc.stderr  # vLLM logs to stdout
    return out


def test_fork_writes_every_rank_share_in_one_file(parent: dict[str, Any]) -> None:
    handle = parent["handle"]
    spec = handle.spec
    assert spec.tensor_parallel_size == 2 and spec.kv_head_slices == ((0, 1), (1, 2))
    assert all(layer.block_shape[0] == 1 for layer in spec.layers)  # one KV head per rank
    assert handle.num_blocks == 4 and handle.token_ids == tuple(TRUNK)
    regions = handle.manifests[-1].container.regions
    assert [r.name for r in regions[:5]] == [f"rank 0 block {i}" for i in range(4)] + ["rank 1 block 0"]
    assert handle.nbytes == 2 * 4 * spec.block_nbytes
    thaw_agents.ForkHandle.from_id(handle.id, verify=True)  # every rank's regions check out


def test_with_fork_on_the_parent_loads_both_ranks(parent: dict[str, Any]) -> None:
    cached, tokens, report = parent["loaded"]
    assert cached == 4 * BS and report["thaw"]["loaded_tokens"] == 4 * BS
    assert tokens == parent["base"][1] and parent["base"][0] == 4 * BS


def test_a_fresh_tp_engine_hydrates_and_continues_like_the_parent(child: dict[str, Any], parent) -> None:
    restored = child["restored"]
    assert restored["hydrated"] == 4 * BS and restored["cached"] == 4 * BS
    assert restored["tokens"] == parent["base"][1]


def test_weights_frozen_per_rank_restore_like_a_normal_load(child: dict[str, Any], parent) -> None:
    shards = [read_weights_manifest(parent["weights"].format(rank=r)) for r in (0, 1)]
    qkv = [{t.name: t.shape for t in m.tensors}["model.layers.0.self_attn.qkv_proj.weight"] for m in shards]
    assert qkv[0] == qkv[1] and qkv[0][0] == (4 + 2 * 2) * 32 // 2  # each rank its half of q, k, v
    assert child["restored"]["plain_tokens"] == parent["plain"][1]


def test_a_corrupt_rank_file_fails_the_whole_load(child: dict[str, Any]) -> None:
    assert child["corrupt"]["started"] is False
    log = child["log"]
    assert "SnapshotChecksumError: " in log and "tiny.rank1.thaw" in log  # rank 1, on its own file
    assert "the weights file of tensor-parallel rank 1 failed its checks" in log  # rank 0


def test_a_single_rank_engine_refuses_the_snapshot_naming_the_field(child: dict[str, Any]) -> None:
    single = child["single"]
    assert single["error"] == "SnapshotMismatchError" and single["field"] == "tensor_parallel_size"
    assert single["cached"] == 0 and "tensor_parallel_size" in single["report"]["error"]
