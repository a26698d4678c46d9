"""Run many branches of one trunk: in the parent engine, or in a pool of warm worker engines.

Example:
    >>> from vllm import SamplingParams
    >>> from thaw_agents import ForkPool, fork_completions, make_llm
    >>> llm = make_llm()                                                    # doctest: +SKIP
    >>> with ForkPool(workers=2) as pool:                                   # doctest: +SKIP
    ...     results = fork_completions(llm, prefix=context, suffixes=["Risks:", "Tests:"],
    ...                                sampling_params=SamplingParams(max_tokens=64), pool=pool)
    >>> [(r.worker, r.num_cached_tokens, r.text) for r in results]         # doctest: +SKIP
"""

from __future__ import annotations

from ._pool import ForkPool
from ._results import BranchResult, BranchTimings, Completion, WorkerInfo
from ._round import afork_completions, fork_completions

__all__ = [
    "BranchResult",
    "BranchTimings",
    "Completion",
    "ForkPool",
    "WorkerInfo",
    "afork_completions",
    "fork_completions",
]
