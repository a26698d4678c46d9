"""Runs a completion request on the weights its ``model`` names (pure ASGI middleware).

For ``/v1/completions`` and ``/v1/chat/completions`` whose ``model`` is a registered weights
name (:mod:`.weights`): the request waits for its turn (a swap when other weights are loaded),
its ``model`` is rewritten to the engine's served name (vLLM's server knows no other), and the
lease is held until the response has been sent. Other requests pass untouched and run on
whatever weights are loaded. It sits inside vLLM's API-key check, so an unauthenticated client
never causes a swap, and outside the snapshot guard, which then checks a request's snapshot
against the weights it will run on.
"""

from __future__ import annotations

import json
from typing import Any

from .._errors import ThawError
from .guard import error_body, read_body, replayed, respond, status_of

__all__ = ["ModelSelector"]

_SELECTED = ("/v1/completions", "/v1/chat/completions")


class ModelSelector:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        app = scope.get("app")
        weights = getattr(app.state, "thaw_weights", None) if app is not None else None
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if (
            weights is None
            or scope["type"] != "http"
            or scope.get("method") != "POST"
            or path not in _SELECTED
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        name = _model_of(body)
        if name is None or name not in weights:
            await self.app(scope, replayed(body, receive), send)
            return
        request = json.loads(body)
        request["model"] = weights.served_name
        body = json.dumps(request).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        started = False
        try:
            async with weights.use(name):
                started = True
                await self.app({**scope, "headers": headers}, replayed(body, receive), send)
        except ThawError as exc:
            if started:
                raise
            # The swap to these weights failed: the request never reached the engine.
            status, kind = status_of(exc)
            await respond(send, status, error_body(status, str(exc), kind, "model"))


def _model_of(body: bytes) -> str | None:
    try:
        request = json.loads(body)
    except ValueError:
        return None  # vLLM answers malformed JSON itself
    model = request.get("model") if isinstance(request, dict) else None
    return model if isinstance(model, str) else None
