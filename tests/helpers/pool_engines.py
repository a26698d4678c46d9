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
from helpers.vllm_env import vllm_environ

# Small engines: several run at once on a 2-core, 24 GiB machine.
ENGINE_KW: dict[str, Any] = {"kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048, "seed": 0}


def build_context_model(folder: Path) -> Path:
    """A seeded random tiny Llama (~16 MB) whose greedy output depends on the whole prompt."""
    return build_tiny_model(folder, initializer_range=0.2)


def worker_cores(workers: int) -> str:
    """As many cores as each of ``workers`` pool workers gets (``ForkPool`` splits this
    process's cores evenly), as ``VLLM_CPU_OMP_THREADS_BIND`` wants them."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    per = max(1, len(cores) // workers)
    return ",".join(map(str, cores[:per]))


def make_side_llm(model: str | Path, *, omp_cores: str | None = None, **overrides: Any):
    """A ``vllm.LLM`` whose engine core runs in a child process.

    vLLM keeps one worker-side KV connector per process, so a second *in-process* thaw
    engine cannot join the session's (the switch goes through :func:`vllm_environ`, which
    vLLM's environment cache would otherwise hide).

    ``omp_cores`` (``VLLM_CPU_OMP_THREADS_BIND``) sets the engine's thread count. A greedy
    run compared token for token with another engine's must use as many threads as that
    engine: a matmul split over another thread count sums in another order, and the tiny
    random model's near-tied logits then pick another token (seen on AMX CPUs at token 11).
    """
    import thaw_agents

    wanted = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    if omp_cores is not None:
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = omp_cores
    with vllm_environ(**wanted):
        return thaw_agents.make_llm(str(model), **{**ENGINE_KW, **overrides})


def shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
