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
        from .model_select import ModelSelector
        from .routes import models_router, router

        # Ours lists the registered weights too; the first route of a path wins, so vLLM's goes.
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/v1/models"]
        app.include_router(router)
        app.include_router(models_router)
        app.add_middleware(SnapshotGuard)
        app.add_middleware(ModelSelector)  # outside the guard: a snapshot is checked after the swap

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        import json
        import os

        from .service import SnapshotService
        from .weights import WEIGHTS_ENV, WeightsService

        if engine_client is None:
            return
        state.thaw = await SnapshotService.create(engine_client)
        state.thaw_weights = None
        config = os.environ.get(WEIGHTS_ENV)
        if config:
            data = json.loads(config)
            served = list(getattr(args, "served_model_name", None) or [args.model])
            weights = WeightsService(
                engine_client,
                data["names"],
                data["folders"],
                served_name=str(served[0]),
                on_swap=state.thaw.weights_changed,
            )
            await weights.start()
            state.thaw_weights = weights
