"""The engine fronts on real tiny engines: results, first-token times, cached tokens, typed
errors, aborts, and thaw's RPCs, for ``vllm.LLM`` (step loop) and ``AsyncLLM`` (streams)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from helpers.pool_engines import ENGINE_KW, build_context_model, make_side_llm, shutdown
from vllm import SamplingParams, TokensPrompt

import thaw_agents
from thaw_agents._manifest import derive_snapshot
from thaw_agents._store import snapshot_path
from thaw_agents.connector.params import await_save, load_params, save_params
from thaw_agents.front import AsyncLLMFront, Capacity, LLMFront, Request, RequestTimeoutError, front_for

pytestmark = pytest.mark.timeout(600)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
# 80 tokens: two full 32-token blocks are cached after a first run.
PROMPT = [1000 + (i * 37) % 5000 for i in range(80)]
ENDLESS = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_context_model(tmp_path_factory.mktemp("front") / "tiny")


@pytest.fixture(scope="module")
def llm(model: Path, store: Path):
    engine = make_side_llm(model)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="module")
def afront(model: Path, store: Path):
    """An AsyncLLM on its own loop thread, and a front whose sync methods run there."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(300)

    async def start():
        return AsyncLLM.from_engine_args(
            AsyncEngineArgs(**thaw_agents.engine_kwargs(str(model), **ENGINE_KW))
        )

    engine = run(start())
    yield AsyncLLMFront(engine, run=run), run
    engine.shutdown()
    loop.call_soon_threadsafe(loop.stop)


def test_front_for_gives_one_front_per_llm_and_refuses_other_objects(llm) -> None:
    assert front_for(llm) is front_for(llm)
    assert isinstance(front_for(llm), LLMFront)
    with pytest.raises(thaw_agents.ConfigError, match="not an engine"):
        front_for(object())


def test_llm_batch_matches_generate_with_first_token_times_and_cached_tokens(llm) -> None:
    front = front_for(llm)
    expected = list(
        llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    )
    two = SamplingParams(max_tokens=8, temperature=0.8, n=2, seed=1)
    streamed, sampled = front.generate(
        [Request(token_ids=PROMPT, params=GREEDY), Request(token_ids=PROMPT[:40], params=two)]
    )
    assert list(streamed.completions[0].token_ids) == expected
    assert streamed.num_prompt_tokens == len(PROMPT)
    assert streamed.num_cached_tokens == 64  # the two full blocks the generate call left
    assert 0 < streamed.ttft_s <= streamed.total_s
    assert streamed.text == llm.get_tokenizer().decode(expected)
    assert [c.index for c in sampled.completions] == [0, 1]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in sampled.completions)
    (final,) = front.generate([Request(token_ids=PROMPT, params=GREEDY)], stream=False)
    assert list(final.completions[0].token_ids) == expected
    assert final.ttft_s is None and final.total_s > 0
    mine = SamplingParams(max_tokens=2, temperature=0.0)
    front.generate([Request(token_ids=PROMPT, params=mine, kv_transfer_params={"x": 1})], stream=False)
    assert mine.output_kind.name == "CUMULATIVE" and not mine.extra_args  # never modified


def test_llm_timeout_aborts_the_batch_and_the_engine_goes_on(llm) -> None:
    front = front_for(llm)
    started = time.perf_counter()
    with pytest.raises(RequestTimeoutError, match="unfinished after"):
        front.generate([Request(token_ids=PROMPT, params=ENDLESS)] * 2, timeout_s=0.5)
    assert time.perf_counter() - started < 30
    assert not llm.llm_engine.has_unfinished_requests()
    (result,) = front.generate([Request(token_ids=PROMPT, params=GREEDY)])
    assert len(result.completions[0].token_ids) == 8


def test_llm_refused_request_is_a_config_error(llm) -> None:
    front = front_for(llm)
    too_long = [5] * (ENGINE_KW["max_model_len"] + 10)
    with pytest.raises(thaw_agents.ConfigError, match="vLLM refused"):
        front.generate([Request(token_ids=PROMPT, params=GREEDY), Request(token_ids=too_long, params=GREEDY)])
    assert not llm.llm_engine.has_unfinished_requests()


def test_llm_describe_and_a_save_through_run_prefix(llm, store: Path) -> None:
    front = front_for(llm)
    spec = front.kv_spec()
    assert spec.block_size == 32 and front.store() == store
    assert front.prefix_caching() == (True, 32)
    handle_id = derive_snapshot(spec, PROMPT).snapshot_id  # as fork names it
    llm.reset_prefix_cache()
    run = front.run_prefix(PROMPT, save_params(handle_id, len(PROMPT)))
    result = await_save(run.report, lambda: front.save_result(handle_id))
    assert result is not None and result.get("status") == "written", result
    assert snapshot_path(store, handle_id).exists()
    llm.reset_prefix_cache()
    loaded = front.run_prefix(PROMPT, load_params(handle_id))
    assert loaded.num_cached_tokens == 64
    assert front.save_result("thaw-" + "0" * 64) is None  # never saved here


def test_async_stream_deltas_match_the_final_only_result(afront) -> None:
    front, run = afront
    request = Request(token_ids=PROMPT, params=GREEDY)

    async def stream():
        return [d async for d in front.astream(request)]

    deltas = run(stream())
    (final,) = front.generate([request], stream=False)
    (timed,) = front.generate([request])
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == list(final.completions[0].token_ids) == list(timed.completions[0].token_ids)
    assert len(tokens) == 8 and deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == final.text
    assert final.ttft_s is None and 0 < timed.ttft_s <= timed.total_s
    assert timed.num_cached_tokens == 64


def test_async_timeout_and_early_stop_abort_the_request(afront) -> None:
    front, run = afront
    request = Request(token_ids=PROMPT, params=ENDLESS)

    async def timed_out():
        async for _ in front.astream(request, timeout_s=0.5):
            pass

    async def stop_early():
        async for delta in front.astream(request):
            if delta.token_ids:
                break

    async def unfinished() -> int:
        for _ in range(100):  # the abort reaches the engine core asynchronously
            if (await front.engine()).get_num_unfinished_requests() == 0:
                return 0
            await asyncio.sleep(0.05)
        return (await front.engine()).get_num_unfinished_requests()

    with pytest.raises(RequestTimeoutError, match="timed out"):
        run(timed_out())
    assert run(unfinished()) == 0
    run(stop_early())
    assert run(unfinished()) == 0


def test_async_rpcs_and_refusals(afront, store: Path) -> None:
    front, run = afront
    assert front.kv_spec().block_size == 32 and front.store() == store
    too_long = [5] * (ENGINE_KW["max_model_len"] + 10)
    with pytest.raises(thaw_agents.ConfigError, match="vLLM refused"):
        front.generate([Request(token_ids=too_long, params=GREEDY)])
    assert front.save_result("thaw-" + "0" * 64) is None
    with pytest.raises(thaw_agents.ConfigError, match="no loop runner"):
        AsyncLLMFront(run(front.engine())).describe()


def test_capacity_of_an_idle_llm_is_its_whole_batch_and_cache(llm) -> None:
    front = front_for(llm)
    front.generate([Request(token_ids=PROMPT, params=GREEDY)])  # finished requests hold nothing
    cap = front.capacity()
    config = llm.llm_engine.vllm_config
    assert cap.max_num_seqs == config.scheduler_config.max_num_seqs > 0
    assert cap.num_blocks == config.cache_config.num_gpu_blocks - 1 > 0
    assert (cap.num_requests, cap.num_reserved_blocks) == (0, 0)
    assert (cap.free_slots, cap.free_blocks) == (cap.max_num_seqs, cap.num_blocks)
    assert (cap.block_size, cap.max_model_len) == (32, ENGINE_KW["max_model_len"])


def test_capacity_counts_what_requests_in_flight_can_hold(afront) -> None:
    """An AsyncLLM serving a request: one slot and its prompt + max_tokens in blocks are taken."""
    front, run = afront
    idle = front.capacity()

    async def during() -> Capacity:
        async for delta in front.astream(Request(token_ids=PROMPT, params=ENDLESS)):
            if delta.token_ids:
                return front.capacity()  # leaving the stream aborts the request
        raise AssertionError("no token")

    busy = run(during())
    assert busy.num_requests == idle.num_requests + 1
    assert busy.free_slots == idle.free_slots - 1
    assert busy.num_reserved_blocks - idle.num_reserved_blocks == -(-(len(PROMPT) + 1500) // 32)
    assert busy.free_blocks == idle.free_blocks - 50
