"""The default model in a real vLLM engine built by thaw_agents.make_llm()."""

from __future__ import annotations

import pytest
from vllm import SamplingParams, TokensPrompt

pytestmark = pytest.mark.e2e


def test_answers_a_chat_prompt(llm) -> None:
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    out = llm.chat(messages, SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.finish_reason in {"stop", "length"}
    text = completion.text.strip()
    assert len(text.split()) >= 3
    assert "Paris" in text


def test_repeated_trunk_is_served_from_the_prefix_cache(llm, trunk_text: str) -> None:
    tokenizer = llm.get_tokenizer()
    trunk = tokenizer.encode(trunk_text)
    assert len(trunk) >= 1000
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    params = SamplingParams(max_tokens=4, temperature=0)
    llm.generate(
        [TokensPrompt(prompt_token_ids=trunk + tokenizer.encode(" Question one?"))],
        params,
        use_tqdm=False,
    )[0]
    second = llm.generate(
        [TokensPrompt(prompt_token_ids=trunk + tokenizer.encode(" Another question?"))],
        params,
        use_tqdm=False,
    )[0]
    assert second.num_cached_tokens >= len(trunk) // block_size * block_size
