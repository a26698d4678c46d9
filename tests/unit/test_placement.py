"""The arithmetic behind ``placement="auto"``: KV blocks a round can come to hold in one engine,
and what an engine's :class:`Capacity` leaves free. (The decisions themselves run against real
engines in tests/e2e/test_pool.py.)"""

from __future__ import annotations

from vllm import SamplingParams

from thaw_agents.front import Capacity
from thaw_agents.pool._placement import blocks_needed


def _cap(**fields: int) -> Capacity:
    base = {
        "max_num_seqs": 8,
        "num_requests": 0,
        "num_blocks": 100,
        "num_reserved_blocks": 0,
        "block_size": 32,
        "max_model_len": 2048,
    }
    return Capacity(**{**base, **fields})


def test_the_trunk_counts_once_and_each_sequence_its_own_blocks() -> None:
    trunk = list(range(100))  # 3 full blocks, shared through the prefix cache
    prompts = [trunk + [1] * 10, trunk + [2] * 30]  # 110 and 130 tokens
    params = [SamplingParams(max_tokens=50), SamplingParams(max_tokens=50, n=2)]
    # 160 tokens -> 5 blocks (2 beyond the trunk); 180 -> 6 (3 beyond), for each of 2 samples
    assert blocks_needed(trunk, prompts, params, _cap()) == 3 + 2 + 2 * 3
    # Without prefix caching every sequence holds its whole prompt.
    assert blocks_needed(trunk, prompts, params, _cap(), caching=False) == 5 + 2 * 6


def test_no_max_tokens_or_too_many_counts_up_to_the_context_limit() -> None:
    trunk = list(range(64))
    prompts = [[*trunk, 7]]
    assert blocks_needed(trunk, prompts, [SamplingParams(max_tokens=None)], _cap()) == 64
    assert blocks_needed(trunk, prompts, [SamplingParams(max_tokens=10**6)], _cap()) == 64


def test_free_slots_and_blocks_never_go_below_zero() -> None:
    cap = _cap(num_requests=10, num_reserved_blocks=150)
    assert (cap.free_slots, cap.free_blocks) == (0, 0)
    cap = _cap(num_requests=3, num_reserved_blocks=40)
    assert (cap.free_slots, cap.free_blocks) == (5, 60)


def test_an_engine_whose_requests_cannot_be_read_is_a_config_error() -> None:
    """Another vLLM layout: a typed error (auto placement then prefers the pool), not AttributeError."""
    from types import SimpleNamespace

    import pytest

    from thaw_agents import ConfigError
    from thaw_agents.front._capacity import read_capacity

    config = SimpleNamespace(
        cache_config=SimpleNamespace(num_gpu_blocks=64, block_size=32),
        model_config=SimpleNamespace(max_model_len=2048),
        scheduler_config=SimpleNamespace(max_num_seqs=8),
    )
    with pytest.raises(ConfigError, match="unfinished requests"):
        read_capacity(SimpleNamespace(vllm_config=config))
