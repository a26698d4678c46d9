"""The converter's old name, for ``langgraph``'s pool path (``_on_pool`` imports it from here).

Messages are converted and rendered in one place for the whole project,
:mod:`thaw_agents.chat`; this alias goes once that caller imports it from there.
"""

from __future__ import annotations

from thaw_agents.chat import to_openai_messages as to_chat_dicts

__all__ = ["to_chat_dicts"]
