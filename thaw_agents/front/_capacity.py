"""What an engine has free for new requests: batch slots and KV blocks, read from vLLM's front
process (no RPC, no engine step), the same way for a ``vllm.LLM`` and an ``AsyncLLM``.

Both keep every unfinished request's state in their output processor (one state per sample:
a request with ``n=3`` counts three, as the scheduler counts it against ``max_num_seqs``), and
both learn the KV cache's size from the engine core at start-up (``cache_config.num_gpu_blocks``).
How many blocks the scheduler has free right now lives in the engine core process, and reaches
the front only with stats logging on (``LLM`` turns it off), so :class:`Capacity` counts instead
what the unfinished requests can come to hold: each its prompt plus ``max_tokens``, as if they
shared no blocks. That is an upper bound: it errs towards "full", never towards "room".

Example:
    >>> cap = front_for(llm).capacity()                                   # doctest: +SKIP
    >>> cap.free_slots, cap.free_blocks, cap.block_size                   # doctest: +SKIP
    (256, 32767, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._errors import ConfigError

__all__ = ["Capacity", "blocks_for", "read_capacity"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Capacity:
    """An engine's room for more requests.

    Attributes:
        max_num_seqs: the scheduler's batch limit (sequences running at once).
        num_requests: unfinished sequences (running or waiting; each sample of ``n`` counts).
        num_blocks: KV blocks requests can use (the cache less vLLM's one null block).
        num_reserved_blocks: the most blocks the unfinished sequences can come to hold (prompt
            plus ``max_tokens`` each; a block sequences share counts for each of them).
        block_size: tokens per KV block.
        max_model_len: the longest sequence the engine takes.
    """

    max_num_seqs: int
    num_requests: int
    num_blocks: int
    num_reserved_blocks: int
    block_size: int
    max_model_len: int

    @property
    def free_slots(self) -> int:
        """Sequences the scheduler can add to its batch now."""
        return max(0, self.max_num_seqs - self.num_requests)

    @property
    def free_blocks(self) -> int:
        """KV blocks no unfinished sequence can claim (cached but unused blocks count as free)."""
        return max(0, self.num_blocks - self.num_reserved_blocks)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


def read_capacity(engine: Any) -> Capacity:
    """The capacity of ``engine``: a started ``LLMEngine`` (``llm.llm_engine``) or ``AsyncLLM``.

    Raises:
        ConfigError: the engine has not reported its KV cache size (not started), or this vLLM
            keeps its requests' state where this reader does not look (checked: 0.24, 0.32).
    """
    config = engine.vllm_config
    num_gpu_blocks = config.cache_config.num_gpu_blocks
    if not num_gpu_blocks:
        raise ConfigError("the engine has not sized its KV cache yet: start it before reading its capacity")
    block_size = int(config.cache_config.block_size)
    max_len = int(config.model_config.max_model_len)
    try:
        # A copy in one step: another thread (the engine's loop) may add or finish requests meanwhile.
        states = tuple(engine.output_processor.request_states.values())
        reserved = 0
        for state in states:
            most = state.prompt_len + state.max_tokens_param if state.max_tokens_param else max_len
            reserved += blocks_for(min(max_len, most), block_size)
    except AttributeError as exc:
        raise ConfigError(f"cannot read the engine's unfinished requests from this vLLM ({exc})") from exc
    return Capacity(
        max_num_seqs=int(config.scheduler_config.max_num_seqs),
        num_requests=len(states),
        num_blocks=int(num_gpu_blocks) - 1,
        num_reserved_blocks=reserved,
        block_size=block_size,
        max_model_len=max_len,
    )
