"""The engine boundary, tried as an attacker would, against real vLLM engines.

Whatever a request carries in ``kv_transfer_params`` (vLLM's OpenAI server copies a client's
there), the engine opens snapshot files only inside its store, by id; serves only snapshots
of its own model and KV spec; counts as served only the tokens it really loaded.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import snapfiles
from helpers.pool_engines import make_side_llm, shutdown
from helpers.tiny_model import build_tiny_model
from vllm import SamplingParams, TokensPrompt

import thaw_agents
from thaw_agents import ForkHandle, SnapshotFormatError, SnapshotMismatchError, SnapshotNotFoundError
from thaw_agents._store import snapshot_path
from thaw_agents.connector.params import await_save, load_params, save_params

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
HELPERS = Path(__file__).resolve().parents[1] / "helpers"
GREEDY = SamplingParams(max_tokens=12, temperature=0)
TRUNK = "Notes for the on-call engineer about the payment service. " + " ".join(
    f"Runbook step {i}: check queue {i} and restart worker {i * 3} if it is stuck." for i in range(12)
)
SUFFIX = " The first thing to check is"


def _generate(
    llm, prompt: list[int], kv_transfer_params: dict | None = None, params: SamplingParams = GREEDY
):
    """One request alone (the same batch composition as every run it is compared with)."""
    sp = copy.deepcopy(params)
    if kv_transfer_params is not None:
        sp.extra_args = {"kv_transfer_params": kv_transfer_params}
    return llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp, use_tqdm=False)[0]


def _report(output) -> dict:
    return (output.kv_transfer_params or {}).get("thaw") or {}


@pytest.fixture(scope="module")
def trunk(llm) -> dict:
    handle = thaw_agents.fork(llm, TRUNK)
    prompt = [*handle.token_ids, *llm.get_tokenizer().encode(SUFFIX, add_special_tokens=False)]
    llm.reset_prefix_cache()
    cold = _generate(llm, prompt)
    assert cold.num_cached_tokens == 0
    return {"handle": handle, "prompt": prompt, "cold": list(cold.outputs[0].token_ids)}


def test_a_request_that_names_paths_is_refused_and_touches_nothing(llm, trunk: dict, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.thaw"
    victim.write_bytes(b"precious")
    copy = outside / "copy.thaw"
    trunk["handle"].save(copy)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    attacks = [
        {"thaw": {"op": "save", "dest": str(victim), "num_tokens": 40, "parent": None}},
        {"thaw": {"op": "save", "snapshot_id": "thaw-" + "0" * 32, "num_tokens": 40, "dest": str(victim)}},
        {"thaw": {"op": "load", "files": [str(copy)]}},
        {"thaw": {"op": "load", "snapshot_id": str(copy)}},
        {"thaw": {"op": "load", "snapshot_id": "../" * 8 + str(copy).lstrip("/")}},
        {"thaw": {"op": "save", "snapshot_id": "thaw-" + "0" * 32, "num_tokens": 40, "parent": "../x"}},
        {"thaw": "load everything"},
    ]
    for params in attacks:
        llm.reset_prefix_cache()
        out = _generate(llm, trunk["prompt"], params)
        assert out.num_cached_tokens == 0, params
        assert list(out.outputs[0].token_ids) == trunk["cold"], params  # it simply prefilled
        assert "error" in _report(out), params
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    assert "paths are not accepted" in _report(_generate(llm, trunk["prompt"], attacks[2]))["error"]


def test_a_symbolic_link_in_the_store_is_not_followed(llm, trunk: dict, store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "real.thaw"
    trunk["handle"].save(outside)
    fake_id = "thaw-" + "1" * 32
    link = snapshot_path(store, fake_id)
    link.symlink_to(outside)
    try:
        llm.reset_prefix_cache()
        out = _generate(llm, trunk["prompt"], load_params(fake_id))
        assert out.num_cached_tokens == 0
        assert "link" in _report(out)["error"]
        with pytest.raises(thaw_agents.SnapshotError):
            ForkHandle.from_id(fake_id)
    finally:
        link.unlink()


def test_a_fifo_in_the_store_is_refused_within_a_second(llm, trunk: dict, store: Path) -> None:
    fake_id = "thaw-" + "2" * 32
    fifo = snapshot_path(store, fake_id)
    os.mkfifo(fifo, 0o600)
    try:
        start = time.monotonic()
        with pytest.raises(SnapshotFormatError, match="FIFO"):
            ForkHandle.from_id(fake_id)
        assert time.monotonic() - start < 1.0
        timings = []
        for params in (None, load_params(fake_id)):
            llm.reset_prefix_cache()
            start = time.monotonic()
            out = _generate(llm, trunk["prompt"], params)
            timings.append(time.monotonic() - start)
        # As fast as the same request without a snapshot: nothing waited on the FIFO.
        assert timings[1] < 2 * timings[0] + 1.0
        assert out.num_cached_tokens == 0 and "FIFO" in _report(out)["error"]
    finally:
        fifo.unlink()


def test_an_unknown_id_prefills_and_says_why(llm, trunk: dict) -> None:
    llm.reset_prefix_cache()
    out = _generate(llm, trunk["prompt"], load_params("thaw-" + "3" * 32))
    assert out.num_cached_tokens == 0 and list(out.outputs[0].token_ids) == trunk["cold"]
    assert "no snapshot" in _report(out)["error"].lower() or "not" in _report(out)["error"]


def test_a_snapshot_of_another_dtype_is_refused_by_the_worker_and_not_counted(
    llm, trunk: dict, store: Path, tmp_path: Path
) -> None:
    """The scheduler half checks what it can know (model, block size, platform); the worker
    checks the whole spec before reading a byte. A file that passes the first and fails the
    second is recomputed, and the served-token count says so."""

    def to_fp16(header: dict) -> None:
        header["kv"]["kv_spec"]["dtype"] = snapfiles.other_dtype(header["kv"]["kv_spec"]["dtype"])
        snapfiles.reid(header)

    foreign = ForkHandle.load(snapfiles.rewrite_header(trunk["handle"].path, tmp_path / "f.thaw", to_fp16))
    with pytest.raises(SnapshotMismatchError) as info:
        foreign.hydrate(llm)  # the front refuses it outright
    assert info.value.field == "dtype"
    llm.reset_prefix_cache()
    out = _generate(llm, trunk["prompt"], foreign.kv_transfer_params())  # a request that carries it itself
    assert out.num_cached_tokens == 0
    assert list(out.outputs[0].token_ids) == trunk["cold"]
    report = _report(out)
    assert report["loaded_tokens"] == 0 and report["recomputed_tokens"] == foreign.num_snapshot_tokens


@pytest.mark.parametrize("block", [0, 2])
def test_a_corrupt_block_is_recomputed_and_the_count_is_exact(llm, trunk: dict, block: int) -> None:
    handle = trunk["handle"]
    path = handle.path
    original = path.read_bytes()
    offset, nbytes, _ = handle.manifests[-1].block_source(block)
    payload_index = offset - handle.manifests[-1].container.payload_offset + nbytes // 2
    try:
        snapfiles.flip_byte(path, path, payload_index=payload_index)
        llm.reset_prefix_cache()
        out = _generate(llm, trunk["prompt"], handle.kv_transfer_params())
    finally:
        path.write_bytes(original)
    # vLLM recomputes from the bad block on; the blocks before it were loaded and served.
    assert out.num_cached_tokens == block * handle.block_size
    assert _report(out)["loaded_tokens"] == block * handle.block_size


def test_a_save_whose_tokens_do_not_make_the_named_id_writes_nothing(llm, trunk: dict, store: Path) -> None:
    forged = "thaw-" + "4" * 32
    with pytest.raises(SnapshotNotFoundError):
        ForkHandle.from_id(forged)
    llm.reset_prefix_cache()
    out = _generate(llm, trunk["prompt"], save_params(forged, len(trunk["prompt"])))
    assert _report(out)["status"] in ("pending", "failed")
    result = await_save(_report(out), lambda: llm.collective_rpc("thaw_save_result", args=(forged,))[0])
    assert result["status"] == "failed" and result["error"]["type"] == "ValueError"
    assert "forged" in result["error"]["message"]
    assert not snapshot_path(store, forged).exists()
    assert not list(store.glob("*.error"))  # results come back in-band, never as side files


def test_a_parent_whose_tokens_the_prompt_does_not_start_with_is_refused(
    llm, trunk: dict, store: Path
) -> None:
    other = llm.get_tokenizer().encode("Something else entirely. " * 12)
    llm.reset_prefix_cache()
    out = _generate(llm, other, save_params("thaw-" + "5" * 32, len(other), trunk["handle"].id))
    assert "parent" in _report(out)["error"]
    assert not snapshot_path(store, "thaw-" + "5" * 32).exists()


_SLOW_WRITER = """
import os, sys, time
from thaw_agents._container_writer import write_container
os.fsync = lambda fd: time.sleep(120)   # stand still inside the save, after the bytes
write_container(sys.argv[1], "kv", {"note": "killed"}, [("block 0", os.urandom(1 << 20))])
"""


def test_a_killed_save_leaves_nothing_a_load_accepts_and_is_cleaned_up(store: Path) -> None:
    sid = "thaw-" + "6" * 32
    dest = snapshot_path(store, sid)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(dest)])
    try:
        deadline = time.monotonic() + 60
        partials: list[Path] = []
        while time.monotonic() < deadline and not partials:
            partials = list(store.glob(f".thaw-{proc.pid}-*.partial"))
            time.sleep(0.05)
        assert partials, "the writer never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not dest.exists()
    with pytest.raises(SnapshotNotFoundError):
        ForkHandle.from_id(sid)  # the next store operation
    assert not any(p.exists() for p in partials)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory, store: Path):
    """A side engine on a tiny model, and a real snapshot of another tiny model with the same
    shapes (other seed, other weights), taken in a fresh process."""
    folder = tmp_path_factory.mktemp("tiny-pair")
    model = build_tiny_model(folder / "tiny-a", seed=0)
    out = folder / "b.thaw"
    env = {**os.environ, "THAW_AGENTS_STORE": str(folder / "store-b")}
    proc = subprocess.run(
        [sys.executable, str(HELPERS / "tiny_model.py"), str(out), "1", TRUNK],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    llm = make_side_llm(model)
    yield llm, ForkHandle.load(out)
    shutdown(llm)


def test_another_models_snapshot_with_the_same_shapes_is_never_served(tiny_pair) -> None:
    llm, foreign = tiny_pair
    own = thaw_agents.fork(llm, TRUNK)
    assert own.id != foreign.id and own.token_ids == foreign.token_ids
    assert [lyr.block_shape for lyr in own.spec.layers] == [lyr.block_shape for lyr in foreign.spec.layers]
    prompt = [*own.token_ids, *llm.get_tokenizer().encode(SUFFIX, add_special_tokens=False)]
    llm.reset_prefix_cache()
    cold = list(_generate(llm, prompt).outputs[0].token_ids)
    for params in (
        thaw_agents.with_fork(GREEDY, foreign).extra_args["kv_transfer_params"],
        load_params(foreign.id),
    ):
        llm.reset_prefix_cache()
        out = _generate(llm, prompt, params)
        assert out.num_cached_tokens == 0
        assert list(out.outputs[0].token_ids) == cold
        assert "model_fingerprint" in _report(out)["error"]
    with pytest.raises(SnapshotMismatchError) as info:
        foreign.hydrate(llm)
    assert info.value.field == "model_fingerprint"


def test_a_snapshot_of_another_vllm_release_is_refused(llm, trunk: dict, tmp_path: Path) -> None:
    def older(header: dict) -> None:
        header["kv"]["kv_spec"]["vllm_version"] = "0.31.2"

    original = trunk["handle"].path.read_bytes()
    try:  # the same tokens, so the same id: the import replaces the trunk's own file for a while
        foreign = ForkHandle.load(snapfiles.rewrite_header(trunk["handle"].path, tmp_path / "v.thaw", older))
        with pytest.raises(SnapshotMismatchError) as info:
            foreign.hydrate(llm)
        assert info.value.field == "vllm_version" and "re-create" in str(info.value)
        llm.reset_prefix_cache()
        out = _generate(llm, trunk["prompt"], foreign.kv_transfer_params())  # the worker refuses it too
    finally:
        trunk["handle"].path.write_bytes(original)
    assert out.num_cached_tokens == 0 and list(out.outputs[0].token_ids) == trunk["cold"]
