"""Preemption: requests that load a snapshot, preempted for KV space and resumed later.

vLLM frees a preempted request's blocks and schedules it again from the waiting queue with
a new allocation; blocks evicted meanwhile must be filled again. Before the connector re-issued
loads for resumed requests, a request first served by the prefix cache and resumed after its
blocks were evicted was counted as holding snapshot tokens that no load filled (its greedy
output differed from its solo run). One small engine (64 blocks of 32 tokens) for the module.

Greedy outputs are compared on a float32 tiny model: on the CPU backend, float32 decoding
gives the same tokens whichever requests share the batch (bfloat16 does not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.pool_engines import make_side_llm, shutdown
from helpers.tiny_model import build_tiny_model
from vllm import SamplingParams, TokensPrompt

import thaw_agents

pytestmark = pytest.mark.e2e

NUM_BLOCKS = 64
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def small_llm(tmp_path_factory: pytest.TempPathFactory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-preempt") / "tiny-llama")
    llm = make_side_llm(folder, dtype="float32", max_model_len=1024, num_gpu_blocks_override=NUM_BLOCKS)
    yield llm
    shutdown(llm)


def _trunk(llm, case: int) -> thaw_agents.ForkHandle:
    text = f"Case {case}. " + " ".join(f"word{case}_{j}" for j in range(90))
    return thaw_agents.fork(llm, text)


def _requests(llm, handles: list[thaw_agents.ForkHandle]) -> tuple[list[TokensPrompt], list[SamplingParams]]:
    tok = llm.get_tokenizer()
    prompts = [
        TokensPrompt(prompt_token_ids=[*h.token_ids, *tok.encode(f" Question {i}: go on")])
        for i, h in enumerate(handles)
    ]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return prompts, [thaw_agents.with_fork(greedy, h) for h in handles]


def _solo(llm, prompts: list[TokensPrompt], params: list[SamplingParams]) -> list[list[int]]:
    """Each request alone (no preemption: one request fits the cache)."""
    out = []
    for prompt, param in zip(prompts, params, strict=True):
        llm.reset_prefix_cache()
        result = llm.generate([prompt], param, use_tqdm=False)[0]
        assert result.kv_transfer_params["thaw"]["preemptions"] == 0
        out.append(list(result.outputs[0].token_ids))
    return out


def test_resumed_requests_load_their_snapshot_again(small_llm) -> None:
    """Four requests loading their snapshots, more than the cache holds as they grow: the
    preempted ones come back with new blocks, load what was evicted meanwhile, and answer as
    they do alone."""
    handles = [_trunk(small_llm, case) for case in range(4)]
    prompts, params = _requests(small_llm, handles)
    small_llm.reset_prefix_cache()
    batch = small_llm.generate(prompts, params, use_tqdm=False)
    reports = [out.kv_transfer_params["thaw"] for out in batch]
    preempted = [r for r in reports if r["preemptions"]]
    assert preempted, "the cache was large enough for every request: nothing was preempted"
    for out, report, handle in zip(batch, reports, handles, strict=True):
        assert out.num_cached_tokens == handle.num_snapshot_tokens
        assert report["loaded_tokens"] == handle.num_snapshot_tokens and report["recomputed_tokens"] == 0
    assert [list(out.outputs[0].token_ids) for out in batch] == _solo(small_llm, prompts, params)


def test_a_request_served_by_the_prefix_cache_loads_once_its_blocks_are_evicted(small_llm) -> None:
    """The case that went wrong: served from the prefix cache at first (no load), preempted,
    its blocks evicted, resumed: the snapshot tokens it now lacks are loaded, not assumed."""
    handles = [_trunk(small_llm, case) for case in range(10, 14)]  # all still in the prefix cache
    prompts, params = _requests(small_llm, handles)
    batch = small_llm.generate(prompts, params, use_tqdm=False)
    reports = [out.kv_transfer_params["thaw"] for out in batch]
    late = [r for r in reports if r["preemptions"] and r["loaded_tokens"] > 0]
    assert late, f"no request was preempted and loaded after it: {reports}"
    assert all(out.num_cached_tokens == h.num_snapshot_tokens for out, h in zip(batch, handles, strict=True))
    assert [list(out.outputs[0].token_ids) for out in batch] == _solo(small_llm, prompts, params)


def test_the_engine_serves_normally_after_preemptions(small_llm, tmp_path: Path) -> None:
    """No block is left held or counted twice: a fork and a load still serve every snapshot
    token once the preempted batches are done."""
    handle = _trunk(small_llm, 20)
    small_llm.reset_prefix_cache()
    assert handle.hydrate(small_llm) == handle.num_snapshot_tokens
    prompt = TokensPrompt(prompt_token_ids=[*handle.token_ids, 7])
    out = small_llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0]
    assert out.num_cached_tokens == handle.num_snapshot_tokens
    assert out.kv_transfer_params["thaw"]["loaded_tokens"] == handle.num_snapshot_tokens
