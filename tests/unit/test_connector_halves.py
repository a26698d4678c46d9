"""The connector's scheduler half driven by vLLM's own dataclasses (``Request``,
``SchedulerOutput``, ``NewRequestData``, ``CachedRequestData``, ``KVConnectorOutput``), as
vLLM's scheduler calls it; and the worker half's background writer. No engine, no mocks.

Snapshots here are real files (4 tokens a block, one 8-byte layer). The scheduler's engine
fingerprint is set to the snapshots' (a real one needs a model config).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.config import CacheConfig, VllmConfig
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from thaw_agents._kvspec import KVSpec, LayerSpec
from thaw_agents._manifest import derive_snapshot, write_kv_snapshot
from thaw_agents._store import snapshot_path
from thaw_agents.connector.config import ThawConnectorConfig
from thaw_agents.connector.metadata import ThawConnectorMetadata, ThawWorkerMetadata
from thaw_agents.connector.params import PARAMS_KEY, hydrate_params, load_params, parse_params, save_params
from thaw_agents.connector.results import SaveResults
from thaw_agents.connector.scheduler import ThawScheduler
from thaw_agents.connector.writer import SaveWriter, error_result

BS = 4
SPEC = KVSpec(model_name="unit", model_fingerprint="sha256:unit", vllm_version="0", platform="cpu",
              kv_layout="test", dtype="float16", block_size=BS,
              layers=(LayerSpec(name="l0", block_shape=(2, 2), block_nbytes=8),))  # fmt: skip
PROMPT = list(range(100, 100 + 4 * BS + 2))  # four full blocks and two more tokens


@pytest.fixture
def scheduler(tmp_path: Path) -> ThawScheduler:
    half = ThawScheduler(
        VllmConfig(cache_config=CacheConfig(block_size=BS)), ThawConnectorConfig(store=tmp_path)
    )
    half._fingerprint = SPEC.model_fingerprint
    return half


def _snapshot(store: Path, tokens: list[int]) -> str:
    content = derive_snapshot(SPEC, tokens)
    write_kv_snapshot(store, SPEC, content, [bytes([i]) * 8 for i in range(content.num_blocks)])
    return content.snapshot_id


def _request(req_id: str, prompt: list[int], params: dict) -> Request:
    sp = SamplingParams(max_tokens=8, extra_args={"kv_transfer_params": params})
    return Request(req_id, prompt, sp, None)


def _new(req: Request, block_ids: list[int], num_computed: int) -> NewRequestData:
    return NewRequestData(
        req_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        mm_features=[],
        sampling_params=req.sampling_params,
        pooling_params=None,
        block_ids=(block_ids,),
        num_computed_tokens=num_computed,
        lora_request=None,
    )


def _step(
    new: list[NewRequestData] = (),
    cached: CachedRequestData | None = None,
    scheduled: dict[str, int] | None = None,
    preempted: set[str] | None = None,
) -> SchedulerOutput:
    scheduled = scheduled or {}
    return SchedulerOutput(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=cached or CachedRequestData.make_empty(),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
        preempted_req_ids=preempted,
    )


def _resumed(req_id: str, block_ids: list[int], num_computed: int) -> CachedRequestData:
    return CachedRequestData(
        req_ids=[req_id],
        resumed_req_ids={req_id},
        new_token_ids=[],
        all_token_ids={},
        new_block_ids=[(block_ids,)],
        num_computed_tokens=[num_computed],
        num_output_tokens=[0],
    )


def _schedule(half: ThawScheduler, req: Request, local: int, blocks: list[int]) -> ThawConnectorMetadata:
    """What vLLM's scheduler does for a request from the waiting queue (new or resumed)."""
    external, is_async = half.get_num_new_matched_tokens(req, local)
    assert not is_async
    half.update_state_after_alloc(req, None, external)  # type: ignore[arg-type]
    if req.num_preemptions:
        cached = _resumed(req.request_id, blocks, local + external)
        return half.build_connector_meta(_step(cached=cached, scheduled={req.request_id: 2}))
    return half.build_connector_meta(
        _step([_new(req, blocks, local + external)], scheduled={req.request_id: 2})
    )


def test_a_new_request_loads_its_snapshot_into_the_blocks_after_its_local_hit(scheduler, tmp_path) -> None:
    sid = _snapshot(tmp_path, PROMPT)
    req = _request("r1", PROMPT, load_params(sid))
    assert scheduler.get_num_new_matched_tokens(req, BS) == (3 * BS, False)
    meta = _schedule(scheduler, req, BS, [7, 8, 9, 10, 11])
    [job] = meta.loads
    assert job.block_ids == (8, 9, 10) and job.snapshot_id == sid
    assert [src.checksum for src in job.sources[0]] == [s.checksum for s in _sources(scheduler, "r1")[1:4]]
    assert scheduler.build_connector_meta(_step()).loads == []  # emitted once


def _sources(half: ThawScheduler, req_id: str):
    return half._loads[req_id].sources[0]  # rank 0's (the only rank here)


def test_repeat_calls_touch_no_file(scheduler, tmp_path) -> None:
    """vLLM may ask again (a failed allocation, a resumption): the plan is reused."""
    sid = _snapshot(tmp_path, PROMPT)
    req = _request("r1", PROMPT, load_params(sid))
    first = scheduler.get_num_new_matched_tokens(req, 0)
    snapshot_path(tmp_path, sid).unlink()  # a second read would fail and refuse the load
    assert scheduler.get_num_new_matched_tokens(req, 0) == first == (4 * BS, False)


def test_a_preempted_request_loads_again_into_its_new_blocks(scheduler, tmp_path) -> None:
    sid = _snapshot(tmp_path, PROMPT)
    req = _request("r1", PROMPT, load_params(sid))
    assert _schedule(scheduler, req, 0, [1, 2, 3, 4, 5]).loads[0].block_ids == (1, 2, 3, 4)
    # Preempted: vLLM frees the blocks; the first two survive in the prefix cache.
    req.num_preemptions = 1
    meta = _schedule(scheduler, req, 2 * BS, [1, 2, 20, 21, 22])
    [job] = meta.loads
    assert job.block_ids == (20, 21)
    _, report = scheduler.request_finished(req, [1, 2, 20, 21, 22])
    assert report["thaw"]["loaded_tokens"] == 4 * BS and report["thaw"]["reloaded_tokens"] == 2 * BS
    assert report["thaw"]["preemptions"] == 1


def test_a_request_first_served_by_the_prefix_cache_is_loaded_when_resumed(scheduler, tmp_path) -> None:
    """Before: no load was sent for a resumed request, yet its external tokens were counted."""
    sid = _snapshot(tmp_path, PROMPT)
    req = _request("r1", PROMPT, load_params(sid))
    assert _schedule(scheduler, req, 4 * BS, [1, 2, 3, 4, 5]).loads == []  # all local
    req.num_preemptions = 1
    [job] = _schedule(scheduler, req, 0, [30, 31, 32, 33, 34]).loads  # all evicted meanwhile
    assert job.block_ids == (30, 31, 32, 33)


def test_a_save_in_flight_fences_its_blocks_until_its_result_arrives(scheduler, tmp_path) -> None:
    req = _request("s1", PROMPT, save_params("thaw-" + "a" * 32, len(PROMPT)))
    scheduler.on_new_request(req)
    meta = scheduler.build_connector_meta(
        _step([_new(req, [5, 6, 7, 8, 9], 0)], scheduled={"s1": len(PROMPT)})
    )
    [job] = meta.saves
    assert job.block_ids == (5, 6, 7, 8)
    # The request finishes before the write: vLLM frees its blocks now, the report says pending.
    assert scheduler.request_finished(req, [5, 6, 7, 8, 9]) == (
        False,
        {"thaw": {"op": "save", "snapshot_id": "thaw-" + "a" * 32, "status": "pending"}},
    )
    # A new request gets block 7: the worker must finish that save before the forward.
    other = _request("o1", [1, 2, 3], {})
    meta = scheduler.build_connector_meta(_step([_new(other, [7], 0)], scheduled={"o1": 3}))
    assert meta.flush == ["s1"]
    result = error_result("thaw-" + "a" * 32, OSError(28, "No space left on device"))
    scheduler.update_connector_output(
        KVConnectorOutput(kv_connector_worker_meta=ThawWorkerMetadata(results=[("s1", result)]))
    )
    meta = scheduler.build_connector_meta(_step([_new(_request("o2", [1], {}), [7], 0)], scheduled={"o2": 1}))
    assert meta.flush == []


def test_a_request_aborted_before_its_load_and_save_report_it(scheduler, tmp_path) -> None:
    sid = _snapshot(tmp_path, PROMPT)
    req = _request("r1", PROMPT, load_params(sid))
    assert scheduler.get_num_new_matched_tokens(req, 0)[0] == 4 * BS
    _, report = scheduler.request_finished(req, [])  # aborted while waiting for blocks
    assert report["thaw"]["loaded_tokens"] == 0 and not scheduler._loads
    saving = _request("s1", PROMPT, save_params("thaw-" + "b" * 32, len(PROMPT)))
    scheduler.on_new_request(saving)
    delay, report = scheduler.request_finished(saving, [])
    assert delay is False and report["thaw"]["status"] == "failed"


def test_the_writer_runs_jobs_in_order_and_waits_for_a_request() -> None:
    gate = threading.Event()
    writer = SaveWriter(capacity=2)
    writer.submit("a", lambda: (gate.wait(10), {"snapshot_id": "x", "status": "written"})[1])
    writer.submit("b", lambda: {"snapshot_id": "y", "status": "written"})
    assert writer.busy("a") and writer.busy("b")
    assert writer.wait({"b"}, timeout=0.05) is False  # behind "a"
    gate.set()
    assert writer.wait({"a", "b"}, timeout=10)
    assert [r for r, _ in writer.take_done()] == ["a", "b"]
    writer.shutdown()
    with pytest.raises(RuntimeError):
        writer.submit("c", dict)


def test_a_save_result_reaches_the_scheduler_and_the_rpc_as_one_record(scheduler) -> None:
    """The scheduler half (worker metadata) and ``thaw_save_result`` (a front's poll) read the
    same record, even for a result the writer could not name (its last-resort error)."""
    sid = "thaw-" + "c" * 32
    results = SaveResults(keep=1)
    results.queued("s1", sid)
    results.queued("s2", sid)  # saved again: the first result is stale until the second is in
    results.finished("s1", {"snapshot_id": sid, "status": "written", "nbytes": 8}, rank=0)
    assert results.latest(sid) is None
    results.finished("s2", error_result("", RuntimeError("writer died")), rank=0)
    polled = results.latest(sid)
    sent = dict(results.take_new())
    assert polled == sent["s2"] and polled["snapshot_id"] == sid and polled["status"] == "failed"
    assert results.take_new() == [] and results.latest("thaw-" + "0" * 32) is None
    # The scheduler half puts that record in the request's report.
    req = _request("s2", PROMPT, save_params(sid, len(PROMPT)))
    scheduler.on_new_request(req)
    scheduler.build_connector_meta(_step([_new(req, [5, 6, 7, 8, 9], 0)], scheduled={"s2": len(PROMPT)}))
    scheduler.update_connector_output(
        KVConnectorOutput(kv_connector_worker_meta=ThawWorkerMetadata(results=[("s2", sent["s2"])]))
    )
    _, report = scheduler.request_finished(req, [5, 6, 7, 8, 9])
    assert report["thaw"]["status"] == "failed" and report["thaw"]["error"] == polled["error"]
    # Only the last ``keep`` snapshots stay answerable by id.
    results.queued("s3", "thaw-" + "d" * 32)
    results.finished("s3", {"status": "written"}, rank=0)
    assert results.latest(sid) is None and results.latest("thaw-" + "d" * 32)["status"] == "written"


def test_a_failed_save_result_keeps_the_error_type_and_path() -> None:
    from thaw_agents._errors import SnapshotWriteError, write_failed
    from thaw_agents.connector.params import save_failure

    exc = write_failed("/s/thaw-x.thaw", OSError(28, "No space left on device"), 10)
    error = save_failure(error_result("thaw-x", exc), "thaw-x", "/s/thaw-x.thaw")
    assert isinstance(error, SnapshotWriteError) and error.errno == 28
    assert str(error) == str(exc)


# -- hydrate: the snapshot waits for the next request that starts with its tokens --------------
def _hydrate(half: ThawScheduler, req_id: str, sid: str) -> Request:
    """What ``ForkHandle.hydrate``'s front sends: a one-token request carrying the params."""
    req = _request(req_id, [0], hydrate_params(sid))
    half.on_new_request(req)
    return req


def test_a_hydrate_request_is_never_scheduled_and_arms_the_next_matching_request(scheduler, tmp_path) -> None:
    sid = _snapshot(tmp_path, PROMPT)
    hydrate = _hydrate(scheduler, "h1", sid)
    assert scheduler.get_num_new_matched_tokens(hydrate, 0) == (None, False)  # waits for its abort
    assert scheduler.request_finished(hydrate, []) == (False, None)  # the front's abort

    other = _request("r0", [1, *PROMPT[1:]], {})  # another first block: nothing to serve
    assert scheduler.get_num_new_matched_tokens(other, 0) == (0, False)
    req = _request("r1", PROMPT, {})  # names no snapshot: served from the hydrated one
    assert scheduler.get_num_new_matched_tokens(req, BS) == (3 * BS, False)
    [job] = _schedule(scheduler, req, BS, [7, 8, 9, 10, 11]).loads
    assert job.snapshot_id == sid and job.block_ids == (8, 9, 10)
    _, report = scheduler.request_finished(req, [])
    assert report is not None and report[PARAMS_KEY]["loaded_tokens"] == 3 * BS
    # Every block is in vLLM's prefix cache now: the snapshot is not loaded again.
    assert scheduler.get_num_new_matched_tokens(_request("r2", PROMPT, {}), 0) == (0, False)


def test_a_partial_match_leaves_a_hydrated_snapshot_for_a_longer_request(scheduler, tmp_path) -> None:
    sid = _snapshot(tmp_path, PROMPT)
    _hydrate(scheduler, "h1", sid)
    short = _request("r1", [*PROMPT[: 2 * BS], 7, 7], {})
    assert scheduler.get_num_new_matched_tokens(short, 0) == (2 * BS, False)
    _schedule(scheduler, short, 0, [1, 2, 3])
    longer = _request("r2", PROMPT, {})
    assert scheduler.get_num_new_matched_tokens(longer, 2 * BS) == (2 * BS, False)  # the rest


def test_a_hydrated_snapshot_already_in_the_prefix_cache_is_let_go(scheduler, tmp_path) -> None:
    _hydrate(scheduler, "h1", _snapshot(tmp_path, PROMPT))
    assert scheduler.get_num_new_matched_tokens(_request("r1", PROMPT, {}), 4 * BS) == (0, False)
    assert len(scheduler._standing) == 0


def test_a_forgotten_hydrate_request_runs_as_a_plain_one(scheduler, tmp_path, monkeypatch) -> None:
    from thaw_agents.connector import scheduler as module

    hydrate = _hydrate(scheduler, "h1", _snapshot(tmp_path, PROMPT))
    monkeypatch.setattr(module, "_PARK_S", 0.0)
    assert scheduler.get_num_new_matched_tokens(hydrate, 0) == (0, False)


def test_hydrated_snapshots_that_leave_the_store_or_the_weights_are_dropped(scheduler, tmp_path) -> None:
    sid = _snapshot(tmp_path, PROMPT)
    _hydrate(scheduler, "h1", sid)
    snapshot_path(tmp_path, sid).unlink()
    assert scheduler.get_num_new_matched_tokens(_request("r1", PROMPT, {}), 0) == (0, False)
    assert len(scheduler._standing) == 0

    sid = _snapshot(tmp_path, PROMPT)
    _hydrate(scheduler, "h2", sid)
    assert scheduler.reset_cache()  # a weights swap
    assert scheduler.get_num_new_matched_tokens(_request("r2", PROMPT, {}), 0) == (0, False)


def test_a_hydrate_of_a_missing_snapshot_is_refused_and_arms_nothing(scheduler, tmp_path, caplog) -> None:
    hydrate = _hydrate(scheduler, "h1", "thaw-" + "0" * 32)
    assert "refused" in caplog.text
    assert scheduler.get_num_new_matched_tokens(hydrate, 0) == (None, False)
    assert len(scheduler._standing) == 0


def test_hydrate_params_parse() -> None:
    sid = "thaw-" + "1" * 32
    assert parse_params(hydrate_params(sid)).snapshot_id == sid
    with pytest.raises(ValueError, match="never by path"):
        parse_params({PARAMS_KEY: {"op": "hydrate", "snapshot_id": "/etc/passwd"}})
