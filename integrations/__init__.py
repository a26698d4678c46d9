"""thaw_agents.integrations: LangChain (``ChatThaw``) and LangGraph (``fork_fanout``) adapters.

Uses only the public API of :mod:`thaw_agents`.
"""
