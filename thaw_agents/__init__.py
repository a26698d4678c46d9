"""thaw-agents: fork a live LLM session.

A trunk (shared context) is computed once; branches start from its KV cache instead of
paying prefill again: in the same vLLM engine, in another engine process, or later from a
durable snapshot file.

The LangChain chat model and the LangGraph helpers are importable from here too
(``from thaw_agents import ChatThaw, fork_sends``); they load on first use and need the
``langgraph`` extra.

Example:
    >>> import thaw_agents
    >>> llm = thaw_agents.make_llm()                              # doctest: +SKIP
    >>> handle = thaw_agents.fork(llm, "a long shared context")   # doctest: +SKIP
    >>> handle.save("/tmp/trunk.thaw")                            # doctest: +SKIP
    >>> from thaw_agents import ChatThaw                          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ._engine import engine_kwargs, make_llm
from ._errors import (
    ConfigError,
    DependencyError,
    EngineError,
    ModelPreparationError,
    PoolError,
    PoolTimeoutError,
    RequestTimeoutError,
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
from .weights._swap import SwapResult, aswap_weights, swap_weights

if TYPE_CHECKING:
    from .integrations.langgraph import ChatThaw, fork_fanout, fork_fanout_sync, fork_sends, trunk_of

# Names served by ``integrations.langgraph``: importing it pulls in langchain-core and
# langgraph, so ``import thaw_agents`` stays free of them until one of these is asked for.
_LANGGRAPH_NAMES = frozenset({"ChatThaw", "fork_fanout", "fork_fanout_sync", "fork_sends", "trunk_of"})

try:
    __version__ = version("thaw-agents")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = [
    "BranchResult",
    "ChatThaw",
    "ConfigError",
    "DependencyError",
    "EngineError",
    "ForkHandle",
    "ForkPool",
    "ModelPreparationError",
    "PoolError",
    "PoolTimeoutError",
    "RequestTimeoutError",
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
    "SwapResult",
    "ThawError",
    "WorkerDiedError",
    "__version__",
    "afork_completions",
    "aswap_weights",
    "default_model",
    "engine_kwargs",
    "fork",
    "fork_completions",
    "fork_fanout",
    "fork_fanout_sync",
    "fork_sends",
    "make_llm",
    "swap_weights",
    "trunk_of",
    "with_fork",
]


def __getattr__(name: str) -> Any:
    """Load the LangChain/LangGraph names on first access (PEP 562)."""
    if name not in _LANGGRAPH_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(".integrations.langgraph", __name__)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith(("langchain", "langgraph")):
            raise
        raise DependencyError(
            exc.name or "langgraph", "pip install 'thaw-agents[langgraph]'", f"thaw_agents.{name}"
        ) from exc
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LANGGRAPH_NAMES)
