"""Engines for the pool tests: a context-sensitive tiny model, and a parent engine that can
live beside the session's in-process engine.

A tiny model at transformers' default init scale (0.02) answers greedily by repeating the
prompt's last token, whatever came before: useless for checking that a branch really sees its
trunk. With init scale 0.2 a change to one early trunk token changes the continuation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from helpers.tiny_model import build_tiny_model

# Small engines: several run at once on a 2-core, 24 GiB machine.
ENGINE_KW: dict[str, Any] = {"kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048, "seed": 0}


def build_context_model(folder: Path) -> Path:
    """A seeded random tiny Llama (~16 MB) whose greedy output depends on the whole prompt."""
    return build_tiny_model(folder, initializer_range=0.2)


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
