"""Engines for the pool tests: a context-sensitive tiny model, and a parent engine that can
live beside the session's in-process engine.

The stock tiny model (``tiny_model.py``, init scale 0.02) answers greedily by repeating the
prompt's last token, whatever came before: useless for checking that a branch really sees its
trunk. With init scale 0.2 a change to one early trunk token changes the continuation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

# Small engines: several run at once on a 2-core, 24 GiB machine.
ENGINE_KW: dict[str, Any] = {"kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048, "seed": 0}


def build_context_model(folder: Path) -> Path:
    """A seeded random tiny Llama (~16 MB) whose greedy output depends on the whole prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from thaw_agents.models import default_model

    if (folder / "config.json").exists():
        return folder
    src = default_model(progress=False)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def make_side_llm(model: str | Path, **overrides: Any):
    """A ``vllm.LLM`` whose engine core runs in a child process.

    vLLM keeps one worker-side KV connector per process, so a second *in-process* thaw
    engine cannot join the session's. vLLM caches its environment once an engine core has
    started here, so the cache is dropped around the switch and the variable restored after.
    """
    import vllm.envs as envs

    import thaw_agents

    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    with contextlib.suppress(AttributeError):
        envs.disable_envs_cache()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    try:
        return thaw_agents.make_llm(str(model), **{**ENGINE_KW, **overrides})
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


def shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
