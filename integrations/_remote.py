"""``ChatThaw(base_url=...)``: the same chat model against a ``thaw-agents serve``, over HTTP.

Chat requests go through ``langchain-openai``'s ``ChatOpenAI`` (its OpenAI client, streaming,
retries, usage parsing). What ChatThaw adds travels in the request: the messages as
:mod:`thaw_agents.chat` converts them, written in the Hermes convention (tools described in the
system message, calls and results as text: the client cannot see whether the served template
takes tools, and a snapshot made here of the same messages and tools gets the same dicts),
vLLM's sampling extras (``top_k``, ``repetition_penalty``), guided decoding
(``structured_outputs``) and the fork (``kv_transfer_params``), the last three in
``extra_body``. Snapshots use the server's ``/v1/thaw/snapshots`` routes through the same
OpenAI client; a ``.thaw`` file's bytes stream over ``httpx`` with the same key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from langchain_core.messages import AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGenerationChunk
from langchain_openai import ChatOpenAI

import thaw_agents
from thaw_agents.chat import hermes_messages, to_openai_messages, to_openai_tools
from thaw_agents.connector.params import is_snapshot_id

from ._output import last_chunk, usage
from ._request import SAMPLING_FIELDS, chat_request
from ._tools import keep_first_call, parse_hermes_calls

__all__ = ["RemoteChat", "RemoteSnapshot", "normalise_base_url"]

logger = logging.getLogger(__name__)

# Sampling fields the OpenAI API has; the others go to vLLM in extra_body.
_OPENAI_FIELDS = ("temperature", "max_tokens", "top_p", "seed", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True, slots=True)
class RemoteSnapshot:
    """A snapshot a server holds, known by its id (all a branch needs to start from it).

    Example:
        >>> RemoteSnapshot("thaw-" + "0" * 32, 1000, 992, 46_000_000).id[:5]
        'thaw-'
    """

    id: str
    num_tokens: int
    num_snapshot_tokens: int
    nbytes: int


def normalise_base_url(url: str) -> str:
    """The server's ``/v1`` URL from ``http://host:port`` or ``http://host:port/v1``.

    Example:
        >>> normalise_base_url("http://127.0.0.1:8000/")
        'http://127.0.0.1:8000/v1'
    """
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise thaw_agents.ConfigError(f"base_url must be an http(s) URL (http://host:8000), not {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class _OpenAIChat(ChatOpenAI):
    """``ChatOpenAI`` that sends ChatThaw's chat dicts (``thaw_chat``) instead of converting messages."""

    def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any) -> dict:
        chat = kwargs.pop("thaw_chat")
        payload = super()._get_request_payload([], stop=stop, **kwargs)
        payload["messages"] = chat
        return payload


def _warn_prefill(fork: Any, why: str) -> None:
    message = f"snapshot {fork} is not available ({why}); prefilling instead"
    warnings.warn(message, RuntimeWarning, stacklevel=6)
    logger.warning("fork %s unavailable, prefilling: %s", fork, why)


def _error_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(getattr(exc, "message", exc))


def typed_error(status: int | None, message: str, url: str) -> thaw_agents.ThawError:
    """A thaw_agents error for a server's HTTP answer (``status`` None: it could not be reached)."""
    if status is None:
        return thaw_agents.EngineError(
            f"cannot reach the thaw server at {url} ({message}); is `thaw-agents serve` running there?"
        )
    if status in (401, 403):
        return thaw_agents.ConfigError(
            f"the server at {url} refused the API key ({status}); pass the key of `thaw-agents serve "
            "--api-key KEY` as ChatThaw(api_key=...) or THAW_AGENTS_API_KEY"
        )
    if status == 404:
        return thaw_agents.SnapshotNotFoundError(f"{message} (server {url})")
    if status == 409:
        return thaw_agents.SnapshotMismatchError(f"{message} (server {url})")
    if status in (400, 413, 422):
        return thaw_agents.ConfigError(f"the server at {url} refused the request ({status}): {message}")
    return thaw_agents.EngineError(f"the server at {url} failed the request ({status}): {message}")


def _typed(exc: Exception, url: str) -> thaw_agents.ThawError:
    if isinstance(exc, openai.APIStatusError):
        return typed_error(exc.status_code, _error_message(exc), url)
    if isinstance(exc, openai.APITimeoutError):
        return thaw_agents.EngineError(f"the request to {url} timed out; raise ChatThaw(timeout=...)")
    return typed_error(None, str(exc), url)


@dataclass
class _Turn:
    """One chat call: its request, and what the stream has brought so far."""

    call: dict[str, Any]
    stop: list[str] | None
    fork: Any
    fork_id: str | None
    buffered: bool
    forced: bool
    single_call: bool
    model: str
    text: list[str] = field(default_factory=list)
    usage: UsageMetadata | None = None
    finish_reason: str | None = None

    def drop_fork(self, exc: Exception) -> bool:
        """After a 404 naming the fork: prefill instead (True), with a warning."""
        if self.fork_id is None or getattr(exc, "status_code", None) != 404:
            return False
        body = getattr(exc, "body", None)
        if isinstance(body, dict) and body.get("param") not in (None, "kv_transfer_params"):
            return False
        _warn_prefill(self.fork_id, _error_message(exc))
        extra = dict(self.call["extra_body"])
        extra.pop("kv_transfer_params", None)
        self.call["extra_body"] = extra
        self.fork_id = None
        return True

    def feed(self, chunk: ChatGenerationChunk) -> ChatGenerationChunk | None:
        message = chunk.message
        if getattr(message, "usage_metadata", None):
            self.usage = message.usage_metadata  # type: ignore[attr-defined]
        reason = (chunk.generation_info or {}).get("finish_reason")
        if reason:
            self.finish_reason = reason
        text = message.content if isinstance(message.content, str) else chunk.text
        if not text:
            return None
        self.text.append(text)
        return None if self.buffered else ChatGenerationChunk(message=AIMessageChunk(content=text))

    def read_calls(self, text: str) -> tuple[str, list[Any], list[Any]]:
        read = parse_hermes_calls(text)
        return keep_first_call(read) if self.single_call else read

    def finish(self) -> ChatGenerationChunk:
        if self.finish_reason == "error":
            raise thaw_agents.EngineError("the server's engine failed this request (finish_reason='error')")
        got = self.usage or UsageMetadata(input_tokens=0, output_tokens=0, total_tokens=0)
        cache_read = int((got.get("input_token_details") or {}).get("cache_read") or 0)
        metadata = {
            "model_name": self.model,
            "finish_reason": self.finish_reason,
            "model_provider": "thaw",
            "fork": self.fork_id,
        }
        return last_chunk(
            "".join(self.text),
            buffered=self.buffered,
            forced=self.forced,
            read_calls=self.read_calls,
            usage_metadata=usage(got["input_tokens"], got["output_tokens"], cache_read),
            metadata=metadata,
        )


def _prefix_body(prefix: Any, tools: Sequence[Any] | None = None) -> dict[str, Any]:
    """The body of POST /v1/thaw/snapshots for a prompt string, token ids or chat messages
    (messages and tools written as a chat call writes them, see the module docstring)."""
    if isinstance(prefix, str):
        return {"prompt": prefix}
    if isinstance(prefix, Sequence) and prefix and all(type(t) is int for t in prefix):
        return {"prompt_token_ids": list(prefix)}
    if isinstance(prefix, Sequence) and prefix:
        return {"messages": hermes_messages(to_openai_messages(prefix), to_openai_tools(tools))}
    raise thaw_agents.ConfigError("a prefix is a prompt string, a list of token ids, or chat messages")


class RemoteChat:
    """The HTTP side of one ``ChatThaw(base_url=...)`` (see the module docstring)."""

    def __init__(
        self, base_url: str, api_key: str | None, model: str | None, timeout: float | None, max_retries: int
    ) -> None:
        self.base_url = normalise_base_url(base_url)
        self._key = api_key or "EMPTY"  # a server without --api-key accepts any
        self._model = model
        self._timeout = timeout
        self._max_retries = max_retries
        self._http = self._openai()
        # An async HTTP client belongs to the event loop it first ran on: one per loop, so
        # asyncio.run() twice (or several loops in threads) works as in-process ChatThaw does.
        self._per_loop: weakref.WeakKeyDictionary[Any, _OpenAIChat] = weakref.WeakKeyDictionary()

    def _openai(self, **clients: Any) -> _OpenAIChat:
        return _OpenAIChat(
            model=self._model or "served",
            base_url=self.base_url,
            api_key=self._key,
            timeout=self._timeout,
            max_retries=self._max_retries,
            stream_usage=True,
            **clients,
        )

    def _async_http(self) -> _OpenAIChat:
        import asyncio

        loop = asyncio.get_running_loop()
        http = self._per_loop.get(loop)
        if http is None:
            # A shallow copy with its own async client: no pydantic validation, and no CA bundle
            # loaded for a plain-http server (about 60 ms each, per event loop).
            plain = self.base_url.startswith("http://")
            client = openai.AsyncOpenAI(
                api_key=self._key,
                base_url=self.base_url,
                max_retries=self._max_retries,
                http_client=openai.DefaultAsyncHttpxClient(verify=not plain),
                **({"timeout": self._timeout} if self._timeout is not None else {}),
            )
            http = self._http.model_copy(
                update={"root_async_client": client, "async_client": client.chat.completions}
            )
            self._per_loop[loop] = http
        return http

    # -- the served model --------------------------------------------------------------------
    @property
    def model(self) -> str:
        """The model name requests carry: ChatThaw's ``model``, else the server's first served model."""
        if self._model is None:
            try:
                served = self._http.root_client.models.list().data
            except openai.APIError as exc:
                raise _typed(exc, self.base_url) from exc
            if not served:
                raise thaw_agents.ConfigError(f"the server at {self.base_url} serves no model")
            self._model = served[0].id
        return self._model

    def token_ids(self, text: str) -> list[int]:
        """Token ids from the served model's tokenizer (vLLM's ``/tokenize``)."""
        root = self.base_url.removesuffix("/v1")
        reply = self._json("post", root + "/tokenize", body={"model": self.model, "prompt": text})
        return list(reply["tokens"])

    # -- chat --------------------------------------------------------------------------------
    def turn(
        self, messages: list[BaseMessage], defaults: dict[str, Any], stop: Any, kwargs: dict[str, Any]
    ) -> _Turn:
        """The request of one chat call (``defaults``: the ChatThaw's sampling values)."""
        chat, tools, tool_choice, structured, forced, single_call = chat_request(messages, kwargs)
        values = dict(defaults)
        values.update({k: kwargs[k] for k in SAMPLING_FIELDS if kwargs.get(k) is not None})
        call: dict[str, Any] = {k: values[k] for k in _OPENAI_FIELDS if k in values}
        extra = {k: values[k] for k in SAMPLING_FIELDS if k in values and k not in _OPENAI_FIELDS}
        if structured is not None:
            # Whitespace inside guided JSON follows the server's --structured-outputs-config
            # (vLLM reads disable_any_whitespace engine-wide only).
            extra["structured_outputs"] = structured
        fork = kwargs.get("fork")
        fork_id = fork if isinstance(fork, str) or fork is None else getattr(fork, "id", None)
        if fork is not None and not is_snapshot_id(fork_id):
            _warn_prefill(str(fork)[:80], "not a snapshot id ('thaw-' and 32 hex digits)")
            fork_id = None
        if fork_id is not None:
            extra["kv_transfer_params"] = {"thaw": {"snapshot_id": fork_id}}
        call.update(thaw_chat=hermes_messages(chat, tools), model=self.model, extra_body=extra)
        if kwargs.get("timeout") is not None:
            call["timeout"] = kwargs["timeout"]
        buffered = bool(tools) and tool_choice != "none"
        stops = list(stop) if stop else None
        return _Turn(call, stops, fork, fork_id, buffered, forced, single_call, self.model)

    def _retry_with_push(self, turn: _Turn, exc: Exception) -> bool:
        """A 404 for a local ForkHandle the server lacks: upload it and send again (True)."""
        if not isinstance(turn.fork, thaw_agents.ForkHandle) or getattr(exc, "status_code", None) != 404:
            return False
        turn_fork, turn.fork = turn.fork, None  # one upload per call
        try:
            self.push(turn_fork)
        except thaw_agents.ThawError as error:
            logger.warning("could not upload snapshot %s to %s: %s", turn_fork.id, self.base_url, error)
            return False
        return True

    def stream(self, turn: _Turn) -> Iterator[ChatGenerationChunk]:
        """The call's chunks (text as it comes, the last one with calls, usage and metadata)."""
        while True:
            try:
                for chunk in self._http._stream([], turn.stop, **turn.call):
                    out = turn.feed(chunk)
                    if out is not None:
                        yield out
                break
            except openai.APIError as exc:
                if turn.text or not (self._retry_with_push(turn, exc) or turn.drop_fork(exc)):
                    raise _typed(exc, self.base_url) from exc
        yield turn.finish()

    async def astream(self, turn: _Turn) -> AsyncIterator[ChatGenerationChunk]:
        """The async twin of :meth:`stream` (the OpenAI async client, on the caller's loop)."""
        import asyncio

        while True:
            try:
                async for chunk in self._async_http()._astream([], turn.stop, **turn.call):
                    out = turn.feed(chunk)
                    if out is not None:
                        yield out
                break
            except openai.APIError as exc:
                retry = not turn.text and (
                    await asyncio.to_thread(self._retry_with_push, turn, exc) or turn.drop_fork(exc)
                )
                if not retry:
                    raise _typed(exc, self.base_url) from exc
        yield turn.finish()

    # -- snapshots ---------------------------------------------------------------------------
    def _json(self, method: str, path: str, **options: Any) -> Any:
        try:
            return getattr(self._http.root_client, method)(path, cast_to=object, **options)
        except openai.APIError as exc:
            raise _typed(exc, self.base_url) from exc

    def snapshot(
        self, prefix: Any, parent: str | None = None, tools: Sequence[Any] | None = None
    ) -> RemoteSnapshot:
        """Snapshot ``prefix`` on the server (messages and tools rendered by its chat template,
        as a chat call with them is); id only.

        Raises:
            SnapshotNotFoundError: ``parent`` is not on the server.
        """
        body = _prefix_body(prefix, tools)
        if parent is not None:
            body["parent"] = parent
        reply = self._json("post", "/thaw/snapshots", body=body)
        return RemoteSnapshot(
            reply["id"], int(reply["num_tokens"]), int(reply["num_snapshot_tokens"]), int(reply["nbytes"])
        )

    def fork(
        self,
        prefix: Any,
        parent: thaw_agents.ForkHandle | None = None,
        tools: Sequence[Any] | None = None,
    ) -> thaw_agents.ForkHandle:
        """``thaw_agents.fork`` for a served engine: snapshot there, then fetch it into the local store.

        A parent the server lacks is uploaded first.
        """
        parent_id = parent.id if parent is not None else None
        try:
            made = self.snapshot(prefix, parent_id, tools)
        except thaw_agents.SnapshotNotFoundError:
            if parent is None:
                raise
            self.push(parent)
            made = self.snapshot(prefix, parent_id, tools)
        return self.fetch(made.id)

    def _has(self, snapshot_id: str) -> bool:
        try:
            self._json("get", f"/thaw/snapshots/{snapshot_id}")
            return True
        except thaw_agents.SnapshotNotFoundError:
            return False

    def push(self, handle: thaw_agents.ForkHandle) -> None:
        """Upload ``handle``'s chain, root first, skipping the snapshots the server holds already."""
        for path, manifest in zip(handle.paths, handle.manifests, strict=True):
            if self._has(manifest.snapshot_id):
                continue
            with open(path, "rb") as body:
                self._transfer("POST", "/thaw/snapshots/import", content=body)

    def fetch(self, snapshot_id: str) -> thaw_agents.ForkHandle:
        """A real ForkHandle for a server's snapshot: its chain downloaded, verified and in the
        local store (``THAW_AGENTS_STORE``); snapshots already there are not downloaded again."""
        chain = [snapshot_id]
        while len(chain) < 4096:
            parent = self._json("get", f"/thaw/snapshots/{chain[-1]}").get("parent")
            if parent is None:
                break
            chain.append(parent)
        for sid in reversed(chain):
            with contextlib.suppress(thaw_agents.SnapshotNotFoundError):
                thaw_agents.ForkHandle.from_id(sid)
                continue  # already here
            with tempfile.TemporaryDirectory(prefix="thaw-fetch-") as folder:  # owner-only
                tmp = Path(folder) / f"{sid}.thaw"
                self._transfer("GET", f"/thaw/snapshots/{sid}/content", dest=tmp)
                loaded = thaw_agents.ForkHandle.load(tmp)  # verified, brought into the store by id
            if loaded.id != sid:
                raise thaw_agents.SnapshotFormatError(f"the server sent {loaded.id} for {sid}")
        return thaw_agents.ForkHandle.from_id(snapshot_id)

    def _transfer(self, method: str, path: str, *, content: Any = None, dest: Path | None = None) -> Any:
        """Stream a ``.thaw`` file up (``content``) or down (``dest``) with the server's key."""
        headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/octet-stream"}
        try:
            with httpx.stream(
                method, self.base_url + path, headers=headers, content=content, timeout=self._timeout or 600
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    try:
                        message = resp.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = resp.text[:300]
                    raise typed_error(resp.status_code, message, self.base_url)
                if dest is None:
                    resp.read()
                    return resp.json()
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    for chunk in resp.iter_bytes(1 << 20):
                        out.write(chunk)
                return None
        except httpx.HTTPError as exc:
            raise typed_error(None, str(exc), self.base_url) from exc

    def close(self) -> None:
        """Close the HTTP connections."""
        with contextlib.suppress(Exception):
            self._http.root_client.close()
