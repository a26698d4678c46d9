"""thaw-agents: fork a live LLM session.

A trunk (shared context) is computed once; branches start from its KV cache instead of
paying prefill again: in the same vLLM engine, in another engine process, or later from a
durable snapshot file.

Example:
    >>> import thaw_agents
    >>> llm = thaw_agents.make_llm()                              # doctest: +SKIP
    >>> handle = thaw_agents.fork(llm, "a long shared context")   # doctest: +SKIP
    >>> handle.save("/tmp/trunk.thaw")                            # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._engine import engine_kwargs, make_llm
from ._errors import (
    ConfigError,
    DependencyError,
    EngineError,
    ModelPreparationError,
    PoolError,
    PoolTimeoutError,
    SnapshotChangedError,
    SnapshotChecksumError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotMismatchError,
    SnapshotNotFoundError,
    SnapshotReadError,
    SnapshotTruncatedError,
    SnapshotVersionError,
    SnapshotWriteError,
    ThawError,
    WorkerDiedError,
)
from ._fork import ForkHandle, fork, with_fork
from .models import default_model
from .pool import BranchResult, ForkPool, afork_completions, fork_completions

try:
    __version__ = version("thaw-agents")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = [
    "BranchResult",
    "ConfigError",
    "DependencyError",
    "EngineError",
    "ForkHandle",
    "ForkPool",
    "ModelPreparationError",
    "PoolError",
    "PoolTimeoutError",
    "SnapshotChangedError",
    "SnapshotChecksumError",
    "SnapshotError",
    "SnapshotFormatError",
    "SnapshotMismatchError",
    "SnapshotNotFoundError",
    "SnapshotReadError",
    "SnapshotTruncatedError",
    "SnapshotVersionError",
    "SnapshotWriteError",
    "ThawError",
    "WorkerDiedError",
    "__version__",
    "afork_completions",
    "default_model",
    "engine_kwargs",
    "fork",
    "fork_completions",
    "make_llm",
    "with_fork",
]
