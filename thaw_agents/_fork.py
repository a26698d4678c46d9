"""``fork()`` and ``ForkHandle``: snapshot one session's prefix KV, save it, hydrate it elsewhere.

Example:
    >>> import thaw_agents
    >>> llm = thaw_agents.make_llm()                                  # doctest: +SKIP
    >>> with thaw_agents.fork(llm, trunk_messages) as handle:         # doctest: +SKIP
    ...     handle.save("/dev/shm/trunk.thaw")
    ...     other = thaw_agents.make_llm()
    ...     handle.hydrate(other)            # the trunk is now served from the snapshot
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._container_reader import verify_regions
from ._errors import (
    ConfigError,
    EngineError,
    SnapshotNotFoundError,
)
from ._kvspec import KVSpec
from ._manifest import KVManifest, ParentRef, check_compatible, derive_snapshot, read_kv_manifest
from ._store import (
    SUFFIX,
    check_links,
    copy_from_uri,
    copy_to_uri,
    import_snapshot,
    is_local_uri,
    local_path,
    partial_prefix,
    read_in_store,
    resolve_chain,
    sibling_uri,
    snapshot_path,
    store_dir,
)
from .connector.params import (
    await_save,
    hydrate_params,
    is_snapshot_id,
    load_params,
    save_failure,
    save_params,
)
from .front import Prefix, front_for

__all__ = ["ForkHandle", "fork", "with_fork"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ForkHandle:
    """A snapshot of one session's prefix: a chain of files, root first, leaf last.

    Attributes:
        id: the snapshot id (a plain string; crosses LangGraph state and checkpoints).
        token_ids: the whole prefix, including a partial last block.
        num_tokens: ``len(token_ids)``.
        num_snapshot_tokens: tokens in full blocks, the most a restore can serve.
        paths: the chain's files in a snapshot store, root first (an engine only ever sees
            the id; its connector opens the files of its own store).
    """

    id: str
    token_ids: tuple[int, ...]
    paths: tuple[Path, ...]
    manifests: tuple[KVManifest, ...] = field(compare=False)

    def __repr__(self) -> str:
        return (
            f"ForkHandle(id={self.id!r}, num_tokens={self.num_tokens}, "
            f"num_snapshot_tokens={self.num_snapshot_tokens}, files={len(self.paths)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_blocks(self) -> int:
        return self.manifests[-1].end_block

    @property
    def block_size(self) -> int:
        return self.manifests[-1].spec.block_size

    @property
    def num_snapshot_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def spec(self) -> KVSpec:
        return self.manifests[-1].spec

    @property
    def manifest(self) -> dict[str, Any]:
        """The leaf file's header (JSON data)."""
        return self.manifests[-1].container.header

    @property
    def nbytes(self) -> int:
        """Payload bytes of the whole chain."""
        return sum(m.container.payload_nbytes for m in self.manifests)

    @property
    def path(self) -> Path:
        return self.paths[-1]

    # -- engine side ---------------------------------------------------------------------
    def kv_transfer_params(self) -> dict[str, Any]:
        """``kv_transfer_params`` that make one request load this prefix from the snapshot.

        They name the snapshot by id: the engine's connector finds it in its store. An engine
        with another store than this handle's files needs :meth:`hydrate` or :func:`with_fork`
        with the engine (which bring the files there) first.

        Example:
            >>> sp = SamplingParams(max_tokens=64, extra_args={          # doctest: +SKIP
            ...     "kv_transfer_params": handle.kv_transfer_params()})
        """
        return load_params(self.id)

    def hydrate(self, engine: Any) -> int:
        """Make ``engine`` serve this prefix from the snapshot; return the tokens it will serve.

        Checks every file against the engine first (model, dtype, block size, KV layout) and
        brings it into the engine's store: nothing reaches an engine that does not match. It
        costs no engine step: the engine holds the snapshot, and the next request that starts
        with ``token_ids`` loads it inside its own step, as with :func:`with_fork`; later ones
        find the prefix in the engine's prefix cache, like any cached prefix. That request's
        ``num_cached_tokens`` (and its output's ``kv_transfer_params["thaw"]``) is the honest
        count: a block the engine finds corrupt is recomputed and not counted. The engine lets
        go of a snapshot that leaves its store or no longer matches its weights.

        Returns ``num_snapshot_tokens``: every whole block of the prefix.

        Raises:
            SnapshotMismatchError: the engine differs from the snapshot's.
            ConfigError: ``engine`` is not a local engine (a served one: use ``fork=handle``).

        Example:
            >>> handle.hydrate(llm)                                              # doctest: +SKIP
            1024
            >>> prompt = TokensPrompt(prompt_token_ids=[*handle.token_ids, *question])  # doctest: +SKIP
            >>> llm.generate(prompt)[0].num_cached_tokens  # loaded inside this request  # doctest: +SKIP
            1024
        """
        front = front_for(engine)
        handle = self.for_engine(front)
        front.announce(hydrate_params(handle.id))
        return handle.num_snapshot_tokens

    def for_engine(self, engine: Any) -> ForkHandle:
        """This snapshot checked against ``engine`` and present in the engine's store.

        Raises:
            SnapshotMismatchError: the engine differs from the snapshot's (field named).
        """
        front = front_for(engine)
        spec = front.kv_spec()
        for manifest in self.manifests:
            check_compatible(manifest.spec, spec, path=manifest.path)
        store = front.store()
        if all(Path(path).parent == store for path in self.paths):
            return self
        paths = [import_snapshot(manifest, store) for manifest in self.manifests]
        manifests = [
            read_in_store(path, m.snapshot_id) for path, m in zip(paths, self.manifests, strict=True)
        ]
        return _handle_from_chain(paths, manifests)

    def fork(self, engine: Any, extension: Prefix) -> ForkHandle:
        """A child snapshot at a later point: this prefix plus ``extension`` (token ids or text)."""
        front = front_for(engine)
        if isinstance(extension, str):
            more = front.prefix_token_ids(extension)
        elif _is_token_list(extension):
            more = list(extension)
        else:
            raise ConfigError(
                "a child fork extends its parent by a string or token ids; "
                "for messages call fork(engine, all_messages, parent=handle)"
            )
        return fork(engine, list(self.token_ids) + more, parent=self)

    # -- storage -------------------------------------------------------------------------
    def save(self, uri: str | os.PathLike[str]) -> str:
        """Copy the snapshot to ``uri`` (a path, ``/dev/shm/...``, or an fsspec URI).

        A nested snapshot's ancestors are written beside it under their ids, so
        :meth:`load` finds the whole chain. Returns ``uri``.
        """
        uri = os.fspath(uri)
        for path, manifest in zip(self.paths[:-1], self.manifests[:-1], strict=True):
            copy_to_uri(path, sibling_uri(uri, manifest.snapshot_id + SUFFIX))
        copy_to_uri(self.paths[-1], uri)
        return uri

    @classmethod
    def load(cls, uri: str | os.PathLike[str], *, verify: bool = True) -> ForkHandle:
        """Open a saved snapshot (and its ancestors), validating every header and checksum,
        and bring it into the local store (``THAW_AGENTS_STORE``) under its id.

        Local files are hard-linked into the store where that is safe (same file system,
        owner-only), else copied and verified again; other URIs are downloaded.

        Raises:
            SnapshotNotFoundError, SnapshotFormatError, SnapshotVersionError,
            SnapshotTruncatedError, SnapshotChecksumError, SnapshotReadError
        """
        uri = os.fspath(uri)
        store = store_dir()
        manifests: list[KVManifest] = []
        current = uri
        while True:
            if len(manifests) >= 4096:
                raise SnapshotNotFoundError("the snapshot chain is too long (a loop?)", path=uri)
            path, downloaded = _materialise(current, store)
            try:
                manifest = read_kv_manifest(path)
                imported = import_snapshot(manifest, store, verify=verify or downloaded)
                manifests.append(read_in_store(imported, manifest.snapshot_id))
            finally:
                if downloaded:
                    path.unlink(missing_ok=True)
            if manifest.parent is None:
                break
            current = _find_parent(uri, manifest.parent.snapshot_id, store)
        manifests.reverse()
        return _handle_from_chain([Path(m.path) for m in manifests], manifests)  # checks the links

    @classmethod
    def from_id(
        cls, snapshot_id: str, *, verify: bool = False, store: str | os.PathLike[str] | None = None
    ) -> ForkHandle:
        """The handle of a snapshot in the local store (or ``store``), by id.

        Raises:
            SnapshotNotFoundError: no such snapshot in the store (it was deleted, or this
                is another machine), or ``snapshot_id`` is not an id: fall back to prefill.
            SnapshotFormatError: the file under that name is not that snapshot.
        """
        if not is_snapshot_id(snapshot_id):
            raise SnapshotNotFoundError(
                f"{str(snapshot_id)[:80]!r} is not a snapshot id ('thaw-' and 32 hex digits)"
            )
        store = store_dir() if store is None else Path(store)
        if not snapshot_path(store, snapshot_id).exists():
            raise SnapshotNotFoundError(
                f"snapshot {snapshot_id} is not in the local store",
                path=str(snapshot_path(store, snapshot_id)),
            )
        manifests = resolve_chain(store, snapshot_id)
        if verify:
            for manifest in manifests:
                verify_regions(manifest.container)
        return _handle_from_chain([Path(m.path) for m in manifests], manifests)

    def delete(self) -> None:
        """Remove this snapshot's own file (ancestors are shared and stay)."""
        self.paths[-1].unlink(missing_ok=True)

    def __enter__(self) -> ForkHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def _is_token_list(value: Any) -> bool:
    return (
        isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(t, int) for t in value)
    )


def _materialise(uri: str, store: Path) -> tuple[Path, bool]:
    """A local path for ``uri``; remote files are downloaded into the store (True: remove it
    once imported)."""
    if is_local_uri(uri):
        path = local_path(uri)
        if not os.path.lexists(path):
            raise SnapshotNotFoundError("no snapshot file here", path=str(path))
        return path, False
    dest = store / f"{partial_prefix()}{os.urandom(8).hex()}.partial"
    copy_from_uri(uri, dest)
    return dest, True


def _find_parent(uri: str, parent_id: str, store: Path) -> str:
    if not is_snapshot_id(parent_id):  # the reader checks this too; a file name must never escape
        raise SnapshotNotFoundError(f"{parent_id[:80]!r} is not a snapshot id", path=uri)
    beside = sibling_uri(uri, parent_id + SUFFIX)
    if is_local_uri(beside):
        if local_path(beside).exists():
            return beside
    else:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(beside)
            if fs.exists(path):
                return beside
        except Exception:
            pass
    in_store = snapshot_path(store, parent_id)
    if in_store.exists():
        return str(in_store)
    raise SnapshotNotFoundError(
        f"the parent snapshot {parent_id} is neither beside the file nor in the local store; "
        "save the parent too, or fork again from the trunk",
        path=uri,
    )


def _handle_from_chain(paths: list[Path], manifests: list[KVManifest]) -> ForkHandle:
    check_links(manifests)
    tokens: list[int] = []
    for manifest in manifests:
        tokens.extend(manifest.token_ids)
    tokens.extend(manifests[-1].tail_token_ids)
    return ForkHandle(
        id=manifests[-1].snapshot_id,
        token_ids=tuple(tokens),
        paths=tuple(paths),
        manifests=tuple(manifests),
    )


def fork(
    engine: Any, prefix: Prefix, *, parent: ForkHandle | None = None, tools: Sequence[Any] | None = None
) -> ForkHandle:
    """Snapshot the KV of ``prefix`` in ``engine`` and return its handle.

    The prefix is computed once if the engine has not cached it yet (a one-token request);
    exactly its full blocks are written, never another session's. With ``parent`` the new
    snapshot stores only the blocks after the parent's and refers to it.

    Args:
        engine: a ``vllm.LLM`` built with :func:`thaw_agents.engine_kwargs`, or a ChatThaw.
        prefix: a prompt string, token ids, or chat messages (rendered with the model's chat
            template as vLLM's chat path renders them, without a generation prompt).
        parent: a handle whose tokens ``prefix`` starts with.
        tools: the tools the branches will bind (OpenAI tool dicts, LangChain tools, pydantic
            models or functions), rendered into a message prefix as a tool-calling call renders
            them. Fork with the tools the branches bind: with other tools (or none) a branch's
            prompt leaves the trunk's in the system message and the snapshot serves almost none of it.
            A ChatThaw with bound tools (``llm.bind_tools(tools)``) forks with them already.

    Example:
        >>> trunk = fork(llm, [{"role": "system", "content": diff}])     # doctest: +SKIP
        >>> agent = fork(llm, history, tools=[get_weather])             # doctest: +SKIP
        >>> child = trunk.fork(llm, " and the reviewer said")            # doctest: +SKIP
    """
    remote_fork = getattr(engine, "_thaw_remote_fork", None)
    if remote_fork is not None:  # a front whose engine is on a server (ChatThaw(base_url=...))
        return remote_fork(prefix, parent=parent, tools=tools)
    front = front_for(engine)
    spec = front.kv_spec()
    store = front.store()
    tokens = front.prefix_token_ids(prefix, tools)
    if not tokens:
        raise ConfigError("the prefix is empty")
    bs = spec.block_size
    start_key: bytes | None = None
    parent_handle: ForkHandle | None = None
    if parent is not None:
        differences = parent.spec.differences(spec)
        if differences:
            field_name = differences[0][0]
            raise ConfigError(f"the parent snapshot was taken on a different engine ({field_name} differs)")
        if tuple(tokens[: parent.num_tokens]) != parent.token_ids:
            raise ConfigError("the prefix does not start with the parent's tokens")
        if parent.num_blocks:  # a parent without a single full block adds nothing to refer to
            parent_handle = parent.for_engine(front)
            leaf = parent_handle.manifests[-1]
            start_key = bytes.fromhex(leaf.keys[-1] if leaf.keys else leaf.parent.last_key)  # type: ignore[union-attr]
    link = None
    if parent_handle is not None and start_key is not None:
        link = ParentRef(
            snapshot_id=parent_handle.id, num_blocks=parent_handle.num_blocks, last_key=start_key.hex()
        )
    covered = parent_handle.num_snapshot_tokens if parent_handle else 0
    content = derive_snapshot(spec, tokens[covered:], parent=link)
    full = covered + content.num_blocks * bs
    sid = content.snapshot_id
    dest = snapshot_path(store, sid)
    run = front.run_prefix(tokens, save_params(sid, len(tokens), parent_handle.id if parent_handle else None))
    # The engine writes in the background; a "pending" report is followed up by id.
    failure = save_failure(await_save(run.report, lambda: front.save_result(sid)), sid, str(dest))
    if failure is not None:
        raise failure
    if not dest.exists():
        raise EngineError(
            f"the engine did not write the snapshot {dest}. Is the thaw connector configured? "
            "Build the engine with thaw_agents.engine_kwargs()."
        )
    manifest = read_in_store(dest, sid)
    check_compatible(manifest.spec, spec, path=str(dest))
    logger.debug(
        "fork: %s holds %d blocks (%d tokens of %d) at %s", sid, manifest.num_blocks, full, len(tokens), dest
    )
    if parent_handle is None:
        return _handle_from_chain([dest], [manifest])
    return _handle_from_chain([*parent_handle.paths, dest], [*parent_handle.manifests, manifest])


def with_fork(sampling_params: Any, handle: ForkHandle, engine: Any | None = None) -> Any:
    """A copy of ``sampling_params`` whose request loads ``handle``'s prefix from the snapshot.

    The request names the snapshot by id; the engine's connector finds it in its store. Pass
    ``engine`` to check the snapshot against it first and bring the files into its store
    (needed when the engine's store is not this process's ``THAW_AGENTS_STORE``). An engine
    whose connector refuses the snapshot prefills instead and says why in the output's
    ``kv_transfer_params["thaw"]["error"]``.

    Example:
        >>> sp = with_fork(SamplingParams(max_tokens=64), handle)        # doctest: +SKIP
        >>> llm.generate(TokensPrompt(prompt_token_ids=[*handle.token_ids, *suffix]), sp)  # doctest: +SKIP
    """
    import copy

    if engine is not None:
        handle = handle.for_engine(engine)
    params = copy.deepcopy(sampling_params)
    extra = dict(params.extra_args or {})
    extra["kv_transfer_params"] = handle.kv_transfer_params()
    params.extra_args = extra
    return params
