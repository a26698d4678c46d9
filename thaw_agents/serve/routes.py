"""The snapshot routes (``/v1/thaw/snapshots``); every one sits behind vLLM's API key (``/v1``).

POST   /v1/thaw/snapshots               {"messages"|"prompt"|"prompt_token_ids", "parent"?} -> snapshot
GET    /v1/thaw/snapshots               list: id, tokens, bytes, created, last used, in use
GET    /v1/thaw/snapshots/{id}          the manifest (JSON header)
DELETE /v1/thaw/snapshots/{id}
GET    /v1/thaw/snapshots/{id}/content  the .thaw bytes, streamed
POST   /v1/thaw/snapshots/import        a .thaw file as the body -> snapshot
POST   /v1/thaw/weights                 {"name", "path"}: register a weights file (see .weights)
GET    /v1/thaw/weights                 the registered weights, the loaded one marked
GET    /v1/models                       vLLM's list plus the registered weights
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from .._errors import ConfigError, EngineError, ThawError
from ..connector.params import ParamsError, is_snapshot_id
from .guard import error_body, status_of

__all__ = ["models_router", "router"]

router = APIRouter(prefix="/v1/thaw", tags=["thaw"])


class SnapshotRequest(BaseModel):
    """What to snapshot: exactly one of ``messages``, ``prompt``, ``prompt_token_ids``."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] | None = None
    """Chat messages, rendered with the served model's chat template, without the generation prompt."""
    prompt: str | None = None
    prompt_token_ids: list[int] | None = Field(default=None, max_length=1 << 22)
    parent: str | None = None
    """A snapshot id this one extends (its tokens must start the prefix)."""


def _error(exc: Exception, param: str | None = None) -> Response:
    status, kind = status_of(exc)
    if isinstance(exc, ConfigError):
        status, kind = 400, "BadRequestError"
    elif isinstance(exc, EngineError):
        status, kind = 500, "InternalServerError"
    return Response(
        error_body(status, str(exc), kind, param), status_code=status, media_type="application/json"
    )


def _service(request: Request) -> Any:
    return request.app.state.thaw


def _checked_id(snapshot_id: str) -> str:
    if not is_snapshot_id(snapshot_id):
        raise ParamsError(f"{snapshot_id[:80]!r} is not a snapshot id ('thaw-' and 32 hex digits)")
    return snapshot_id


@router.post("/snapshots")
async def create_snapshot(body: SnapshotRequest, request: Request) -> Response:
    given = [x for x in (body.messages, body.prompt, body.prompt_token_ids) if x is not None]
    if len(given) != 1:
        return _error(
            ConfigError("send exactly one of 'messages', 'prompt' or 'prompt_token_ids'"), "messages"
        )
    try:
        parent = _checked_id(body.parent) if body.parent is not None else None
        return JSONResponse(await _service(request).make(given[0], parent))
    except ThawError as exc:
        return _error(exc, "parent" if body.parent else None)
    except ParamsError as exc:
        return _error(exc, "parent")


@router.get("/snapshots")
async def list_snapshots(request: Request) -> Response:
    service = _service(request)
    return JSONResponse(
        {
            "object": "list",
            "data": [info.to_json() for info in service.list()],
            "store_nbytes_max": service.max_nbytes,
            "evicted": service.evicted,
        }
    )


@router.get("/snapshots/{snapshot_id}")
async def get_snapshot(snapshot_id: str, request: Request) -> Response:
    service = _service(request)
    try:
        chain = service.chain(_checked_id(snapshot_id))
        return JSONResponse({**service.info(snapshot_id).to_json(), "manifest": chain[-1].container.header})
    except (ThawError, ParamsError) as exc:
        return _error(exc, "snapshot_id")


@router.delete("/snapshots/{snapshot_id}")
async def delete_snapshot(snapshot_id: str, request: Request) -> Response:
    service = _service(request)
    try:
        if service.in_use(_checked_id(snapshot_id)):
            return Response(
                error_body(409, f"snapshot {snapshot_id} is in use by a running request", "ConflictError"),
                status_code=409,
                media_type="application/json",
            )
        service.delete(snapshot_id)
        return JSONResponse({"id": snapshot_id, "object": "thaw.snapshot", "deleted": True})
    except (ThawError, ParamsError) as exc:
        return _error(exc, "snapshot_id")


@router.get("/snapshots/{snapshot_id}/content")
async def get_snapshot_content(snapshot_id: str, request: Request) -> Response:
    try:
        path = _service(request).content_path(_checked_id(snapshot_id))
    except (ThawError, ParamsError) as exc:
        return _error(exc, "snapshot_id")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{snapshot_id}.thaw")


class WeightsRequest(BaseModel):
    """A weights file to serve under ``name`` (a path inside the server's weights folders)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=128)
    path: str = Field(max_length=4096)


def _no_weights() -> Response:
    return _error(ConfigError("this server serves no named weights: start it with --weights NAME=FILE"))


@router.post("/weights")
async def register_weights(body: WeightsRequest, request: Request) -> Response:
    weights = getattr(request.app.state, "thaw_weights", None)
    if weights is None:
        return _no_weights()
    try:
        return JSONResponse(await asyncio.to_thread(weights.register, body.name, body.path))
    except ThawError as exc:
        return _error(exc, "path")


@router.get("/weights")
async def list_weights(request: Request) -> Response:
    weights = getattr(request.app.state, "thaw_weights", None)
    if weights is None:
        return _no_weights()
    return JSONResponse({"object": "list", "data": weights.list(), "loaded": weights.loaded})


models_router = APIRouter(tags=["thaw"])


@models_router.get("/v1/models")
async def list_models(request: Request) -> Response:
    """vLLM's model list, plus the registered weights (``loaded`` marks the one in the engine)."""
    listed = (await request.app.state.openai_serving_models.show_available_models()).model_dump()
    weights = getattr(request.app.state, "thaw_weights", None)
    if weights is not None:
        listed["data"] = [*listed["data"], *weights.list()]
    return JSONResponse(listed)


@router.post("/snapshots/import")
async def import_snapshot(request: Request) -> Response:
    try:
        return JSONResponse(await _service(request).import_stream(request.stream()))
    except ThawError as exc:
        return _error(exc, None)
