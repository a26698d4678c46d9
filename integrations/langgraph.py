"""LangGraph helpers over ChatThaw (``fork_fanout`` and ``Send``-aware fan-out come here).

Example:
    >>> from thaw_agents.integrations.langgraph import ChatThaw
"""

from __future__ import annotations

from .langchain import ChatThaw

__all__ = ["ChatThaw"]
