"""fork / save / load / hydrate against real vLLM engines with the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import snapfiles
from vllm import SamplingParams, TokensPrompt

import thaw_agents
from thaw_agents import (
    ForkHandle,
    SnapshotChecksumError,
    SnapshotFormatError,
    SnapshotMismatchError,
    SnapshotNotFoundError,
    SnapshotTruncatedError,
    SnapshotVersionError,
    SnapshotWriteError,
)
from thaw_agents._container_reader import read_container
from thaw_agents._engine import cpu_dtype, is_cpu_platform

pytestmark = pytest.mark.e2e
HELPERS = Path(__file__).resolve().parents[1] / "helpers"
MAX_TOKENS = 64
SUFFIX = " Review the change above and list its two most important risks:"


def _run(llm, token_ids: list[int], params: SamplingParams):
    return llm.generate([TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False)[0]


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
SAMPLED = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=1234)


@pytest.fixture(scope="module")
def trunk(llm, trunk_text: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fork the trunk, save it, and record the parent's own outputs for prefix + suffix."""
    handle = thaw_agents.fork(llm, trunk_text)
    folder = tmp_path_factory.mktemp("snaps")
    handle.save(folder / "trunk.thaw")
    suffix = llm.get_tokenizer().encode(SUFFIX, add_special_tokens=False)
    prompt = list(handle.token_ids) + suffix
    greedy, sampled = _run(llm, prompt, GREEDY), _run(llm, prompt, SAMPLED)
    return {
        "handle": handle,
        "folder": folder,
        "suffix": suffix,
        "prompt": prompt,
        "greedy": list(greedy.outputs[0].token_ids),
        "sampled": list(sampled.outputs[0].token_ids),
    }


def test_handle_describes_the_prefix(trunk: dict, llm) -> None:
    handle: ForkHandle = trunk["handle"]
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    assert handle.id.startswith("thaw-") and isinstance(handle.id, str)
    assert handle.num_tokens >= 1000
    assert handle.num_snapshot_tokens == handle.num_tokens // block_size * block_size
    assert handle.manifest["kv"]["snapshot"]["token_ids"] == list(
        handle.token_ids[: handle.num_snapshot_tokens]
    )
    engine_dtype = str(llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
    assert handle.manifest["kv"]["kv_spec"]["dtype"] == engine_dtype
    if is_cpu_platform():  # bfloat16 only where the CPU has native bf16 arithmetic
        assert engine_dtype == cpu_dtype()
    assert (handle.path.stat().st_mode & 0o777) == 0o600
    assert ForkHandle.from_id(handle.id).token_ids == handle.token_ids


@pytest.fixture(scope="module")
def nested(llm, trunk: dict) -> ForkHandle:
    child = trunk["handle"].fork(llm, " The reviewer focuses on error handling and on tests." * 4)
    child.save(trunk["folder"] / "nested" / "child.thaw")
    return child


def test_nested_fork_stores_only_new_blocks(trunk: dict, nested: ForkHandle) -> None:
    parent: ForkHandle = trunk["handle"]
    assert len(nested.paths) == 2 and nested.paths[0] == parent.path
    leaf = nested.manifests[-1]
    assert leaf.parent is not None and leaf.parent.snapshot_id == parent.id
    assert leaf.first_block == parent.num_blocks
    assert nested.token_ids[: parent.num_tokens] == parent.token_ids
    # The parent is written beside the child so the chain travels together.
    assert (trunk["folder"] / "nested" / f"{parent.id}.thaw").exists()
    assert leaf.container.payload_nbytes == (nested.num_blocks - parent.num_blocks) * parent.spec.block_nbytes


@pytest.fixture(scope="module")
def fresh_process(trunk: dict, nested: ForkHandle, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fresh process with vLLM's multiprocess engine core loads and hydrates the snapshots."""
    folder = tmp_path_factory.mktemp("child")
    shm = Path("/dev/shm") / f"thaw-test-{os.getpid()}.thaw"
    trunk["handle"].save(shm)
    jobs = {
        "max_model_len": 4096,
        "jobs": [
            {
                "name": "file",
                "uri": str(trunk["folder"] / "trunk.thaw"),
                "suffix": trunk["suffix"],
                "max_tokens": MAX_TOKENS,
            },
            {
                "name": "shm",
                "uri": str(shm),
                "suffix": trunk["suffix"],
                "max_tokens": 8,
                "direct": True,
            },
            {
                "name": "nested",
                "uri": str(trunk["folder"] / "nested" / "child.thaw"),
                "suffix": [],
                "max_tokens": 8,
            },
        ],
    }
    (folder / "jobs.json").write_text(json.dumps(jobs))
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "THAW_AGENTS_STORE": str(folder / "store"),
    }
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(HELPERS / "child_hydrate.py"),
                str(folder / "jobs.json"),
                str(folder / "out.json"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shm.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((folder / "out.json").read_text())


def test_fresh_process_serves_the_prefix_from_the_snapshot(trunk: dict, fresh_process: dict) -> None:
    handle: ForkHandle = trunk["handle"]
    result = fresh_process["file"]
    # hydrate() asks for one token past the snapshot's blocks: every block is served.
    assert result["hydrated"] == handle.num_snapshot_tokens
    assert result["greedy_cached"] >= handle.num_snapshot_tokens


def test_fresh_process_greedy_output_matches_the_parent(trunk: dict, fresh_process: dict) -> None:
    assert len(trunk["greedy"]) == MAX_TOKENS
    assert fresh_process["file"]["greedy_tokens"] == trunk["greedy"]


def test_fresh_process_seeded_sampling_matches_the_parent(trunk: dict, fresh_process: dict) -> None:
    assert fresh_process["file"]["sampled_tokens"] == trunk["sampled"]


def test_one_request_can_load_from_shared_memory(trunk: dict, fresh_process: dict) -> None:
    result = fresh_process["shm"]
    assert result["direct_cached"] >= trunk["handle"].num_snapshot_tokens
    assert result["direct_tokens"] == trunk["greedy"][:8]


def test_nested_chain_hydrates_whole(nested: ForkHandle, fresh_process: dict) -> None:
    result = fresh_process["nested"]
    assert result["files"] == 2
    assert result["hydrated"] == nested.num_snapshot_tokens
    assert result["greedy_cached"] >= nested.num_snapshot_tokens


def test_hydrate_runs_nothing_and_the_next_request_loads_the_prefix(llm, trunk: dict) -> None:
    handle: ForkHandle = trunk["handle"]
    llm.reset_prefix_cache()
    assert handle.hydrate(llm) == handle.num_snapshot_tokens
    assert not llm.llm_engine.has_unfinished_requests()  # the hydrate request was never run
    first = _run(llm, trunk["prompt"], GREEDY)
    # Loaded inside this request's own step (the hydrate loaded nothing), into the prefix cache.
    assert first.num_cached_tokens == handle.num_snapshot_tokens
    assert first.kv_transfer_params["thaw"]["loaded_tokens"] == handle.num_snapshot_tokens
    assert list(first.outputs[0].token_ids) == trunk["greedy"]
    second = _run(llm, trunk["prompt"], GREEDY)
    assert second.num_cached_tokens == handle.num_snapshot_tokens
    assert not (second.kv_transfer_params or {}).get("thaw")  # vLLM's own prefix cache this time
    assert list(second.outputs[0].token_ids) == trunk["greedy"]


def test_snapshot_holds_one_session_only(llm, trunk: dict) -> None:
    """Two sessions cached in one engine: A's snapshot holds no block of B, by tokens and by bytes."""
    tok = llm.get_tokenizer()
    a_text = "Session A is about astronomy: stars, planets and the orbits of moons. " * 12
    b_text = "Session B is about cooking: bread, butter and the timing of ovens. " * 12
    _run(llm, tok.encode(b_text), SamplingParams(max_tokens=1))  # B sits in the prefix cache
    a = thaw_agents.fork(llm, a_text)
    b = thaw_agents.fork(llm, b_text)
    a_tokens = a.manifest["kv"]["snapshot"]["token_ids"]
    assert a_tokens == tok.encode(a_text)[: a.num_snapshot_tokens]
    b_blocks = {
        tuple(b.token_ids[i : i + b.block_size]) for i in range(0, b.num_snapshot_tokens, b.block_size)
    }
    assert not any(
        tuple(a_tokens[i : i + a.block_size]) in b_blocks for i in range(0, len(a_tokens), a.block_size)
    )
    a_checksums = {r.checksum for r in read_container(a.path).regions}
    b_checksums = {r.checksum for r in read_container(b.path).regions}
    assert a_checksums.isdisjoint(b_checksums)
    assert read_container(a.path).payload_nbytes == a.num_blocks * a.spec.block_nbytes


def _full_disk(fd: int) -> None:
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_in_the_engine_and_on_save(llm, trunk: dict, tmp_path: Path, monkeypatch) -> None:
    """A full disk is a typed error that names the fix, leaves no partial file, and the engine
    keeps serving; the next fork of the same prefix succeeds once there is room."""
    text = "A full disk must not cost the session anything. " * 12
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _full_disk)
        with pytest.raises(SnapshotWriteError, match="no space left on the device") as caught:
            thaw_agents.fork(llm, text)
        store = Path(caught.value.path).parent
        assert not [p.name for p in store.iterdir() if p.name.endswith((".partial", ".error"))]
        with pytest.raises(SnapshotWriteError, match="no space left") as saving:
            trunk["handle"].save(tmp_path / "copy.thaw")
        assert saving.value.errno == __import__("errno").ENOSPC
        assert list(tmp_path.iterdir()) == []
    handle = thaw_agents.fork(llm, text)
    assert handle.path.exists() and handle.num_blocks > 0


def test_a_file_others_can_read_is_copied_into_the_store(trunk: dict, tmp_path: Path, monkeypatch) -> None:
    """A file other users may read is copied into the store, not linked (its other names could
    change it), byte for byte and owner-only; a disk that fills up during the copy is a typed
    error that leaves the store as it was."""
    import errno
    import shutil
    import stat

    kept = trunk["handle"].path.read_bytes()
    shared = tmp_path / "shared.thaw"
    shutil.copyfile(trunk["handle"].path, shared)
    shared.chmod(0o644)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "sendfile", full)
        with pytest.raises(SnapshotWriteError, match="no space left on the device"):
            ForkHandle.load(shared)
    store = trunk["handle"].path.parent
    assert not [p.name for p in store.iterdir() if p.name.endswith(".partial")]
    assert trunk["handle"].path.read_bytes() == kept

    loaded = ForkHandle.load(shared)
    assert loaded.id == trunk["handle"].id and loaded.path.read_bytes() == kept
    st = loaded.path.stat()
    assert st.st_ino != shared.stat().st_ino and stat.S_IMODE(st.st_mode) == 0o600


def test_memory_uri_round_trip(trunk: dict) -> None:
    handle: ForkHandle = trunk["handle"]
    handle.save("memory://thaw-tests/trunk.thaw")
    loaded = ForkHandle.load("memory://thaw-tests/trunk.thaw")
    assert loaded.id == handle.id and loaded.token_ids == handle.token_ids
    assert loaded.path.read_bytes() == handle.path.read_bytes()


def test_cli_info(trunk: dict) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "thaw_agents.cli",
            "info",
            "--verify",
            str(trunk["folder"] / "trunk.thaw"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert trunk["handle"].id in out.stdout and "verified" in out.stdout


# -- bad input: every case has its own error, and the engine keeps serving ------------------


def _still_serves(llm, trunk: dict) -> None:
    out = _run(llm, trunk["prompt"], GREEDY)
    assert list(out.outputs[0].token_ids) == trunk["greedy"]


def test_flipped_payload_byte(llm, trunk: dict, tmp_path: Path) -> None:
    bad = snapfiles.flip_byte(trunk["handle"].path, tmp_path / "flipped.thaw")
    with pytest.raises(SnapshotChecksumError, match="region 0"):
        ForkHandle.load(bad)
    _still_serves(llm, trunk)


def test_truncated_file(llm, trunk: dict, tmp_path: Path) -> None:
    bad = snapfiles.truncate(trunk["handle"].path, tmp_path / "short.thaw")
    with pytest.raises(SnapshotTruncatedError, match="cut short"):
        ForkHandle.load(bad)


def test_edited_dtype_is_refused_by_the_engine(llm, trunk: dict, tmp_path: Path) -> None:
    def to_fp16(header: dict) -> None:
        header["kv"]["kv_spec"]["dtype"] = snapfiles.other_dtype(header["kv"]["kv_spec"]["dtype"])

    bad = snapfiles.rewrite_header(trunk["handle"].path, tmp_path / "fp16.thaw", to_fp16)
    handle = ForkHandle.load(bad)  # the file itself is consistent
    with pytest.raises(SnapshotMismatchError) as info:
        handle.hydrate(llm)
    assert info.value.field == "dtype"
    expected = trunk["handle"].spec.dtype
    assert info.value.actual == snapfiles.other_dtype(expected) and info.value.expected == expected
    _still_serves(llm, trunk)


def test_edited_block_size(trunk: dict, tmp_path: Path) -> None:
    def halve(header: dict) -> None:
        header["kv"]["kv_spec"]["block_size"] = 16

    bad = snapfiles.rewrite_header(trunk["handle"].path, tmp_path / "bs.thaw", halve)
    with pytest.raises(SnapshotFormatError, match="blocks of 16"):
        ForkHandle.load(bad)


def test_edited_tokens_are_caught(trunk: dict, tmp_path: Path) -> None:
    def swap(header: dict) -> None:
        header["kv"]["snapshot"]["token_ids"][5] += 1

    bad = snapfiles.rewrite_header(trunk["handle"].path, tmp_path / "tok.thaw", swap)
    with pytest.raises(SnapshotFormatError, match="keys do not match"):
        ForkHandle.load(bad)


def test_unknown_format_version(trunk: dict, tmp_path: Path) -> None:
    def bump(header: dict) -> None:
        header["format_version"] = 7

    bad = snapfiles.rewrite_header(trunk["handle"].path, tmp_path / "v7.thaw", bump)
    with pytest.raises(SnapshotVersionError, match="version 7"):
        ForkHandle.load(bad)


def test_missing_file_and_unknown_id(tmp_path: Path) -> None:
    with pytest.raises(SnapshotNotFoundError):
        ForkHandle.load(tmp_path / "nothing.thaw")
    with pytest.raises(SnapshotNotFoundError):
        ForkHandle.from_id("thaw-" + "0" * 32)


def test_corruption_after_validation_is_recomputed_not_served(
    llm, trunk: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that change after load() are caught by the engine's own per-block checksums."""
    import logging
    import shutil

    path = tmp_path / "late.thaw"
    shutil.copyfile(trunk["handle"].path, path)
    handle = ForkHandle.load(path)
    copy = handle.path.with_name("late-copy.thaw")  # keep the session's own snapshot intact
    shutil.copyfile(handle.path, copy)
    try:
        snapfiles.flip_byte(handle.path, handle.path, payload_index=5)  # the store's file, block 0
        llm.reset_prefix_cache()
        with caplog.at_level(logging.ERROR, logger="thaw_agents.connector.worker"):
            assert handle.hydrate(llm) == handle.num_snapshot_tokens  # the engine has read nothing yet
            out = _run(llm, trunk["prompt"], GREEDY)  # the request that loads it
    finally:
        os.replace(copy, handle.path)
    assert "failed their checksum" in caplog.text
    # The count is honest: vLLM recomputed from the bad block on, and nothing is reported served.
    assert out.num_cached_tokens == 0
    assert out.kv_transfer_params["thaw"]["recomputed_tokens"] == handle.num_snapshot_tokens
    # vLLM recomputed from the bad block on: the output is the parent's, not garbage.
    _still_serves(llm, trunk)


def test_snapshot_of_another_model(llm, trunk: dict, tmp_path: Path) -> None:
    out = tmp_path / "tiny.thaw"
    env = {**os.environ, "THAW_AGENTS_STORE": str(tmp_path / "store")}
    proc = subprocess.run(
        [sys.executable, str(HELPERS / "tiny_model.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    handle = ForkHandle.load(out)
    with pytest.raises(SnapshotMismatchError) as info:
        handle.hydrate(llm)
    assert info.value.field in {"model_fingerprint", "layers"}
    assert "tiny-llama" in str(info.value)
    _still_serves(llm, trunk)
