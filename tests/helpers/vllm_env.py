"""Set vLLM environment variables for the engines a test starts in this process.

vLLM reads its variables through ``vllm.envs``, and an engine core started in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the test session's default) freezes that module's
values once it is up (``enable_envs_cache``). A later engine would then see the values of the
session's first engine, whatever ``os.environ`` says now: ``VLLM_CPU_OMP_THREADS_BIND="0|1"``
set after the session's engine had started was read as ``"auto"``, and a TP=2 engine refused
to start on a one-NUMA-node machine. :func:`vllm_environ` drops that cache on the way in and
on the way out (the engine started inside caches the values it was given; the next one must
read the restored ones).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def vllm_environ(**values: str) -> Iterator[None]:
    """``os.environ`` updated with ``values`` and seen by vLLM, restored afterwards.

    Example::

        with vllm_environ(VLLM_CPU_OMP_THREADS_BIND="0|1"):
            llm = thaw_agents.make_llm(model, tensor_parallel_size=2)
    """
    import vllm.envs as envs

    previous = {key: os.environ.get(key) for key in values}
    envs.disable_envs_cache()
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        envs.disable_envs_cache()
