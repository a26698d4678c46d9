"""``ChatThaw``: a LangChain chat model on vLLM's async engine, fork-aware."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

import thaw_agents

from . import _runtime
from ._local import engine_chunks
from ._output import aggregate
from ._remote import RemoteChat, normalise_base_url
from ._request import (
    SAMPLING_FIELDS,
    local_tokenizer,
)
from ._structured import structured_output_runnable
from ._tools import forced_call_schema

__all__ = ["ChatThaw"]

logger = logging.getLogger(__name__)


class ChatThaw(BaseChatModel):
    """A LangChain chat model on vLLM's ``AsyncLLM`` with thaw's fork support.

    Setup:
        ``pip install 'thaw-agents[cpu,langgraph]'`` (``[gpu,langgraph]`` on a CUDA machine).
        The default model (SmolLM2-135M-Instruct) is prepared offline on first use.

    Key init args:
        model: a Hugging Face folder or id; None is the default model.
        temperature, max_tokens, top_p, top_k, seed, stop, presence_penalty,
        frequency_penalty, repetition_penalty: sampling defaults, overridable per call.
        timeout: seconds a call may take before it is aborted.
        engine_kwargs: vLLM engine arguments on top of ``thaw_agents.engine_kwargs()``.
        tool_parser: the vLLM tool parser for this model family (``"hermes"``).

    Instantiate:
        .. code-block:: python

            from thaw_agents.integrations.langchain import ChatThaw

            llm = ChatThaw(temperature=0, max_tokens=128)   # cheap: the engine starts on first use

    Invoke:
        .. code-block:: python

            llm.invoke([("system", "You are terse."), ("human", "Name a prime number.")])

    Stream:
        .. code-block:: python

            for chunk in llm.stream("Tell me a short story."):
                print(chunk.text, end="")

    Async:
        .. code-block:: python

            await llm.ainvoke("Hello")
            await llm.abatch(["one", "two", "three"])   # one engine, continuous batching

    Tool calling:
        .. code-block:: python

            from langchain_core.tools import tool

            @tool
            def add(a: int, b: int) -> int:
                "Add two integers."
                return a + b

            llm.bind_tools([add], tool_choice="any").invoke("What is 2 + 3?").tool_calls

        The tools go into the prompt through the model's chat template when it takes tools,
        otherwise in the Hermes convention (described in the system message; SmolLM2's
        template is such a one), with tool calls and tool results of the history; see
        :mod:`thaw_agents.chat`. ``tool_choice``: ``"auto"`` (default) lets the model answer or
        call, read by ``tool_parser``; ``"required"`` forces one or more calls, ``"any"`` one
        call, a tool name one call of it, all by constrained decoding; ``"none"`` reads no calls.
        ``parallel_tool_calls`` True/False sets whether several calls are allowed: False allows
        one at most (a forced call's schema allows one; of calls read from free text the first
        is kept). See ``docs/tools.md``.

        A trunk for tool-calling branches is forked with the same tools, so that every branch's
        prompt starts with the trunk's tokens:

        .. code-block:: python

            agent = llm.bind_tools([add])
            handle = thaw_agents.fork(agent, history)   # or thaw_agents.fork(llm, history, tools=[add])
            agent.invoke(history + [("human", "And 4 + 5?")], fork=handle)

        ``fork_sends(agent, ...)`` and ``fork_fanout(agent, ...)`` (LangGraph) fork the bound
        model's trunk the same way.

    Structured output:
        .. code-block:: python

            from pydantic import BaseModel

            class Answer(BaseModel):
                city: str

            llm.with_structured_output(Answer).invoke("Capital of France?")   # guided decoding

    Forks:
        .. code-block:: python

            import thaw_agents

            handle = thaw_agents.fork(llm, trunk_messages)          # snapshot the trunk's KV
            llm.invoke(trunk_messages + [("human", "Q1")], fork=handle)   # or fork=handle.id

    Token usage:
        .. code-block:: python

            msg = llm.invoke("Hi")
            msg.usage_metadata   # input/output/total tokens; input_token_details.cache_read

    Against a server (``thaw-agents serve``):
        .. code-block:: python

            llm = ChatThaw(base_url="http://127.0.0.1:8000", api_key=KEY, temperature=0)
            handle = thaw_agents.fork(llm, trunk_messages)   # snapshot there, file fetched here
            llm.invoke(trunk_messages + [("human", "Q1")], fork=handle.id)

        Everything above works the same; ``langchain-openai``'s ``ChatOpenAI`` does the HTTP and
        the fork travels as ``extra_body={"kv_transfer_params": {"thaw": {"snapshot_id": id}}}``.
        What differs: the model is the server's (``model=None`` asks it); ``engine_kwargs`` are
        ``thaw-agents serve`` options instead (a ConfigError here); the messages and tools are
        always written in the Hermes convention before the served chat template renders them
        (the client cannot see whether that template takes tools; the request carries no
        ``tools`` field), the same for a call and for ``thaw_agents.fork(llm, ..., tools=...)``,
        and free-text tool calls are read on the client in the Hermes convention only
        (``tool_parser`` must stay ``"hermes"``); whitespace inside
        guided JSON follows the server's ``--structured-outputs-config``; ``timeout`` and
        ``max_retries`` go to the OpenAI client. A fork id the server lacks (404) prefills with
        a warning; a local ForkHandle it lacks is uploaded first. ``ForkHandle.hydrate`` and
        ``fork_fanout(pool=...)`` need a local engine.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = None
    """Hugging Face folder or id; None means the default model (SmolLM2-135M-Instruct)."""
    temperature: float | None = None
    """Sampling temperature; None is vLLM's default (1.0)."""
    max_tokens: int | None = 512
    """Most tokens to generate per call (default 512); None means up to the context length."""
    top_p: float | None = None
    """Nucleus sampling probability mass; None is 1.0."""
    top_k: int | None = None
    """Sample from the k most likely tokens; None means all."""
    seed: int | None = None
    """Per-request sampling seed for reproducible sampling."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Stop sequences (not included in the output)."""
    presence_penalty: float | None = None
    """vLLM presence penalty."""
    frequency_penalty: float | None = None
    """vLLM frequency penalty."""
    repetition_penalty: float | None = None
    """vLLM repetition penalty."""
    timeout: float | None = None
    """Seconds a call may take; the request is aborted after it. None: no limit."""
    max_retries: int = 0
    """Accepted for LangChain compatibility; a local engine is not retried."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """vLLM engine arguments applied over ``thaw_agents.engine_kwargs()`` (default: none)."""
    tool_parser: str = "hermes"
    """vLLM tool parser used to read tool calls from free text (default ``"hermes"``)."""
    fork: str | None = None
    """Default snapshot id whose prefix calls start from (usually passed per call instead)."""
    base_url: str | None = None
    """A ``thaw-agents serve`` (``http://host:8000``, ``/v1`` optional): the engine runs there, not here."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("THAW_AGENTS_API_KEY", default=None))
    """The server's API key (``thaw-agents serve --api-key``); default ``THAW_AGENTS_API_KEY``."""

    _engine_key: str | None = PrivateAttr(default=None)
    _acquired: bool = PrivateAttr(default=False)
    _closed: bool = PrivateAttr(default=False)
    _args_cache: tuple[str, dict[str, Any]] | None = PrivateAttr(default=None)
    _remote: Any = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check_remote()  # after pydantic, so the error stays a thaw_agents.ConfigError

    def _check_remote(self) -> None:
        if self.base_url is not None:
            if self.engine_kwargs:
                raise thaw_agents.ConfigError(
                    "engine_kwargs configure an engine in this process; a served engine takes them as "
                    "`thaw-agents serve` options. Drop engine_kwargs or base_url."
                )
            if self.tool_parser != "hermes":
                raise thaw_agents.ConfigError(
                    "against a server, tool calls are read in the Hermes convention only; "
                    "leave tool_parser at 'hermes'"
                )
            normalise_base_url(self.base_url)  # a bad URL fails now, not on the first call

    def _remote_chat(self) -> RemoteChat:
        """The HTTP side (``base_url`` given); created on first use."""
        if self._closed:
            raise thaw_agents.EngineError("this ChatThaw was closed; create a new one")
        if self._remote is None:
            key = self.api_key.get_secret_value() if self.api_key is not None else None
            self._remote = RemoteChat(str(self.base_url), key, self.model, self.timeout, self.max_retries)
        return self._remote

    @property
    def _thaw_remote_fork(self) -> Callable[..., thaw_agents.ForkHandle] | None:
        """``thaw_agents.fork``'s hook: a served engine snapshots on its server (None: in-process)."""
        return None if self.base_url is None else self._remote_chat().fork

    # -- LangChain plumbing ---------------------------------------------------------------
    @classmethod
    def is_lc_serializable(cls) -> bool:
        """True: ``dumpd(llm)`` gives the constructor fields, the API key as a secret reference."""
        return True

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "THAW_AGENTS_API_KEY"}

    @property
    def _llm_type(self) -> str:
        return "thaw-vllm"

    @property
    def model_name(self) -> str:
        if self.model is None and self.base_url is not None:
            return self._remote_chat().model
        return self.model or thaw_agents.models.DEFAULT_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, **self._default_sampling(), "engine_kwargs": self.engine_kwargs}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="thaw", ls_model_name=kwargs.get("model", self.model_name), ls_model_type="chat"
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            tool_calling=True,
            structured_output=True,
            image_inputs=False,
            audio_inputs=False,
            pdf_inputs=False,
            video_inputs=False,
        )

    # -- engine ---------------------------------------------------------------------------
    def _engine_args(self) -> dict[str, Any]:
        # Resolved once per configuration, not per request: resolving checks the prepared model's
        # files and the platform.
        key = json.dumps([self.model, self.engine_kwargs], sort_keys=True, default=str)
        if self._args_cache is None or self._args_cache[0] != key:
            # Guided decoding is configured engine-wide in vLLM; compact JSON keeps a small model
            # from spending its token budget on whitespace.
            overrides = {
                "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
                **self.engine_kwargs,
            }
            self._args_cache = (key, thaw_agents.engine_kwargs(self.model, **overrides))
        return dict(self._args_cache[1])

    async def _handle(self) -> _runtime.EngineHandle:
        if self._closed:
            raise thaw_agents.EngineError("this ChatThaw was closed; create a new one")
        future = _runtime.acquire(self._engine_args())
        try:
            handle = await asyncio.wrap_future(future)
        except Exception as exc:
            raise thaw_agents.ConfigError(
                f"the vLLM engine for model {self.model_name!r} failed to start: {exc}. Check the model "
                "path or id; on CPU vLLM starts its engine process with 'spawn', so a script must guard "
                'its entry point with `if __name__ == "__main__":`.'
            ) from exc
        if not self._acquired:
            self._acquired = True
            handle.refs += 1
        self._engine_key = handle.key
        return handle

    def close(self) -> None:
        """Release this instance's share of the engine; the last user shuts it down."""
        if self._closed:
            return
        self._closed = True
        if self._remote is not None:
            self._remote.close()
        if self._acquired and self._engine_key is not None:
            future = _runtime._engines.get(self._engine_key)
            if future is not None and future.done() and not future.exception():
                handle = future.result()
                handle.refs -= 1
                if handle.refs <= 0:
                    _runtime.release_key(self._engine_key)

    def __enter__(self) -> ChatThaw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request building -----------------------------------------------------------------
    def _default_sampling(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}

    # -- the engine call: streamed chunks, or the final output only ---------------------
    async def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Generate on the background loop; yields LangChain chunks, the last one marked."""
        async for chunk in engine_chunks(self, messages, stop, **kwargs):
            yield chunk

    async def _final(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any) -> ChatResult:
        """One call for its final output only (on the background loop): ``invoke``/``ainvoke``."""
        return aggregate([c async for c in engine_chunks(self, messages, stop, stream=False, **kwargs)])

    def _turn(
        self, remote: RemoteChat, messages: list[BaseMessage], stop: Any, kwargs: dict[str, Any]
    ) -> Any:
        stop = stop if stop is not None else kwargs.get("stop", self.stop)
        return remote.turn(messages, self._default_sampling(), stop, {"fork": self.fork, **kwargs})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if self.base_url is not None:
            remote = self._remote_chat()
            chunks: Iterator[ChatGenerationChunk] = remote.stream(self._turn(remote, messages, stop, kwargs))
        else:
            chunks = _runtime.runtime.iterate(lambda: self._chunks(messages, stop, **kwargs))
        for chunk in chunks:
            if run_manager and chunk.text:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        if self.base_url is not None:
            remote = self._remote_chat()
            chunks: AsyncIterator[ChatGenerationChunk] = remote.astream(
                self._turn(remote, messages, stop, kwargs)
            )
        else:
            chunks = _runtime.runtime.aiterate(lambda: self._chunks(messages, stop, **kwargs))
        async for chunk in chunks:
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # LangChain calls _generate only when nothing listens for tokens: the final output is enough.
        if self.base_url is None:
            return _runtime.runtime.run(self._final(messages, stop, **kwargs))
        return aggregate(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.base_url is None:
            return await _runtime.runtime.arun(self._final(messages, stop, **kwargs))
        chunks = [c async for c in self._astream(messages, stop, run_manager, **kwargs)]
        return aggregate(iter(chunks))

    # -- tools and structured output ------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (see "Tool calling" in the class docstring).

        Args:
            tools: OpenAI tool dicts, LangChain tools, pydantic models or typed functions.
            tool_choice: ``"auto"``/None, ``"none"``, ``"required"`` (one or more forced
                calls), ``"any"`` (one forced call), or a tool name (one forced call of it).
            parallel_tool_calls: False allows at most one call per reply, True several (also
                with ``"any"``); None: several, except for ``"any"``.

        Example:
            >>> agent = ChatThaw().bind_tools([add], tool_choice="required")   # doctest: +SKIP
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice is not None:
            forced_call_schema(formatted, tool_choice)  # validate the name now
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return _BoundChatThaw(bound=self, kwargs={"tools": formatted, "tool_choice": tool_choice, **kwargs})

    def with_structured_output(
        self,
        schema: dict | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Structured output; ``json_schema`` (default) is enforced by vLLM's guided decoding."""
        del strict  # always strict: decoding is constrained
        return structured_output_runnable(self, schema, method=method, include_raw=include_raw, **kwargs)

    # -- tokens ---------------------------------------------------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (never a download; a server's ``/tokenize``)."""
        if self.base_url is not None:
            return self._remote_chat().token_ids(text)
        return list(local_tokenizer(self._engine_args()["model"]).encode(text))

    # -- forks ----------------------------------------------------------------------------
    def _thaw_adapter(self, tools: Sequence[dict[str, Any]] | None = None) -> Any:
        from ._fork_adapter import ChatThawAdapter, RemoteAdapter

        return ChatThawAdapter(self, tools) if self.base_url is None else RemoteAdapter(self)


class _BoundChatThaw(RunnableBinding):
    """What ``ChatThaw.bind_tools`` returns: a ``RunnableBinding`` that ``thaw_agents.fork`` (and
    LangGraph's ``fork_sends``/``fork_fanout``) sees with its tools, so a trunk forked through it
    is rendered as its calls are. It serialises as a plain ``RunnableBinding``."""

    @classmethod
    def lc_id(cls) -> list[str]:
        return RunnableBinding.lc_id()

    def _thaw_adapter(self) -> Any:
        return self.bound._thaw_adapter(self.kwargs.get("tools"))

    @property
    def _thaw_remote_fork(self) -> Callable[..., thaw_agents.ForkHandle] | None:
        remote_fork = self.bound._thaw_remote_fork
        if remote_fork is None:
            return None
        bound_tools = self.kwargs.get("tools")

        def fork(prefix: Any, parent: Any = None, tools: Any = None) -> thaw_agents.ForkHandle:
            return remote_fork(prefix, parent=parent, tools=bound_tools if tools is None else tools)

        return fork
