"""``thaw-agents serve``: vLLM's own OpenAI-compatible server with the thaw connector and a
router for snapshots (``/v1/thaw/...``), attached as a vLLM endpoint plugin.

Modules: :mod:`.launch` (the command: vLLM's server with thaw's arguments), :mod:`.plugin`
(the endpoint plugin vLLM loads), :mod:`.service` (snapshots of the served engine: fork,
list, import, a bounded store), :mod:`.routes` (the HTTP routes), :mod:`.guard` (checks a
completion request's snapshot id before it reaches the engine: 400, 404, 409).
"""

from __future__ import annotations

__all__: list[str] = []
