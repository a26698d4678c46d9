"""Checks a completion request's snapshot before it reaches the engine (pure ASGI middleware).

For ``/v1/completions`` and ``/v1/chat/completions`` with ``kv_transfer_params.thaw``: a malformed
id or anything path-like is a 400, an id this server does not hold a 404 naming it, a snapshot of
another model or KV spec a 409 naming the field, a file that is not what its name says a 422; each
as OpenAI-style JSON, and the server keeps serving. A request that passes marks its snapshot chain
in use until its response has been sent, so the store's eviction never removes it under the request.
(The engine checks everything again itself: this layer exists to give HTTP clients a clear status.)
"""

from __future__ import annotations

import json
from typing import Any

from .._errors import SnapshotError, SnapshotMismatchError, SnapshotNotFoundError
from ..connector.params import HydrateParams, LoadParams, ParamsError, SaveParams, parse_params

__all__ = ["SnapshotGuard", "error_body", "read_body", "replayed", "respond", "status_of"]

_GUARDED = ("/v1/completions", "/v1/chat/completions")
_MAX_BODY = 64 << 20


def error_body(status: int, message: str, kind: str, param: str | None = "kv_transfer_params") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


def status_of(exc: Exception) -> tuple[int, str]:
    """The HTTP status and OpenAI-style error type for a thaw error."""
    if isinstance(exc, ParamsError):
        return 400, "BadRequestError"
    if isinstance(exc, SnapshotNotFoundError):
        return 404, "NotFoundError"
    if isinstance(exc, SnapshotMismatchError):
        return 409, "ConflictError"
    if isinstance(exc, SnapshotError):
        return 422, "UnprocessableEntityError"
    return 500, "InternalServerError"


class SnapshotGuard:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        service = getattr(scope.get("app").state, "thaw", None) if scope.get("app") is not None else None
        if path not in _GUARDED or service is None:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        replay = replayed(body, receive)
        ids: list[str] = []
        try:
            ids = self._check(service, body)
        except Exception as exc:
            status, kind = status_of(exc)
            await respond(send, status, error_body(status, str(exc), kind))
            return
        if not ids:
            await self.app(scope, replay, send)
            return
        service.acquire(ids)
        try:
            await self.app(scope, replay, send)
        finally:
            service.release(ids)

    @staticmethod
    def _check(service: Any, body: bytes) -> list[str]:
        try:
            request = json.loads(body)
        except ValueError:
            return []  # vLLM answers malformed JSON itself
        if not isinstance(request, dict) or "kv_transfer_params" not in request:
            return []
        params = parse_params(request["kv_transfer_params"])
        if isinstance(params, HydrateParams):
            raise ParamsError(
                "op 'hydrate' is for a local engine (ForkHandle.hydrate); a request starts from a "
                "snapshot with {'op': 'load', 'snapshot_id': ...}"
            )
        if isinstance(params, LoadParams):
            return [manifest.snapshot_id for manifest in service.chain(params.snapshot_id)]
        if isinstance(params, SaveParams) and params.parent is not None:
            return [manifest.snapshot_id for manifest in service.chain(params.parent)]
        return []


async def respond(send: Any, status: int, body: bytes) -> None:
    """Send a whole JSON response (status and body) from an ASGI middleware."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Any) -> bytes:
    """A request's body, read whole (up to 64 MiB: past that vLLM refuses it anyway), so a
    middleware can look at it and then hand it on with :func:`replayed`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body") or size > _MAX_BODY:
            break
    return b"".join(chunks)


def replayed(body: bytes, receive: Any) -> Any:
    """An ASGI ``receive`` that gives ``body`` once, then whatever ``receive`` gives."""
    done = False

    async def replay() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
