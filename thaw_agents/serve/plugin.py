"""The vLLM endpoint plugin (entry point group ``vllm.endpoint_plugins``, name
``thaw_agents_snapshots``): vLLM loads it when ``VLLM_PLUGINS`` names it, which
``thaw-agents serve`` does.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

__all__ = ["PLUGIN_NAME", "ThawEndpoints"]

PLUGIN_NAME = "thaw_agents_snapshots"


class ThawEndpoints:
    """Adds the snapshot routes and the request guard to vLLM's OpenAI-compatible app."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from .guard import SnapshotGuard
        from .routes import router

        app.include_router(router)
        app.add_middleware(SnapshotGuard)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        from .service import SnapshotService

        if engine_client is None:
            return
        state.thaw = await SnapshotService.create(engine_client)
