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

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._adapter import Prefix, adapter_for
from ._container import verify_regions
from ._errors import ConfigError, EngineError, SnapshotNotFoundError, SnapshotWriteError
from ._kvspec import KVSpec, chain_keys, snapshot_id
from ._manifest import KVManifest, read_kv_manifest
from ._store import (
    SUFFIX,
    copy_from_uri,
    copy_to_uri,
    is_local_uri,
    local_path,
    sibling_uri,
    store_dir,
)
from .connector.params import load_params, save_params

__all__ = ["ForkHandle", "fork", "with_fork"]

logger = logging.getLogger(__name__)
_ID_RE = re.compile(r"^thaw-[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ForkHandle:
    """A snapshot of one session's prefix: a chain of files, root first, leaf last.

    Attributes:
        id: the snapshot id (a plain string; crosses LangGraph state and checkpoints).
        token_ids: the whole prefix, including a partial last block.
        num_tokens: ``len(token_ids)``.
        num_snapshot_tokens: tokens in full blocks, the most a restore can serve.
        paths: local files of the chain, root first.
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

        Example:
            >>> sp = SamplingParams(max_tokens=64, extra_args={          # doctest: +SKIP
            ...     "kv_transfer_params": handle.kv_transfer_params()})
        """
        return load_params([str(p) for p in self.paths])

    def hydrate(self, engine: Any) -> int:
        """Make ``engine`` serve this prefix from the snapshot; return the tokens it served.

        Checks every file against the engine first (model, dtype, block size, KV layout):
        nothing reaches an engine that does not match. The prefix then sits in the engine's
        prefix cache, so any request starting with ``token_ids`` skips its prefill.

        Raises:
            SnapshotMismatchError: the engine differs from the snapshot's.
        """
        adapter = adapter_for(engine)
        spec = adapter.kv_spec()
        for path in self.paths:
            read_kv_manifest(path, expect_spec=spec, check_keys=False)
        return adapter.run_prefix(list(self.token_ids), self.kv_transfer_params())

    def fork(self, engine: Any, extension: Prefix) -> ForkHandle:
        """A child snapshot at a later point: this prefix plus ``extension`` (token ids or text)."""
        adapter = adapter_for(engine)
        if isinstance(extension, str):
            more = adapter.prefix_token_ids(extension)
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
        """Open a saved snapshot (and its ancestors), validating every header and checksum.

        Local paths are used in place; other URIs are copied into the local store.

        Raises:
            SnapshotNotFoundError, SnapshotFormatError, SnapshotVersionError,
            SnapshotTruncatedError, SnapshotChecksumError
        """
        uri = os.fspath(uri)
        paths: list[Path] = []
        manifests: list[KVManifest] = []
        current = uri
        while True:
            path = _materialise(current)
            manifest = read_kv_manifest(path)
            if verify:
                verify_regions(manifest.container)
            paths.append(path)
            manifests.append(manifest)
            if manifest.parent is None:
                break
            current = _find_parent(uri, manifest.parent.snapshot_id)
        paths.reverse()
        manifests.reverse()
        return _handle_from_chain(paths, manifests)

    @classmethod
    def from_id(cls, snapshot_id: str, *, verify: bool = False) -> ForkHandle:
        """The handle of a snapshot in the local store, by id.

        Raises:
            SnapshotNotFoundError: no such snapshot in the store (it was deleted, or this
                is another machine): fall back to prefill.
        """
        if not _ID_RE.match(snapshot_id):
            raise SnapshotNotFoundError(f"{snapshot_id!r} is not a snapshot id")
        path = store_dir() / (snapshot_id + SUFFIX)
        if not path.exists():
            raise SnapshotNotFoundError(f"snapshot {snapshot_id} is not in the local store", path=str(path))
        return cls.load(path, verify=verify)

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


def _materialise(uri: str) -> Path:
    if is_local_uri(uri):
        path = local_path(uri)
        if not path.exists():
            raise SnapshotNotFoundError("no snapshot file here", path=str(path))
        return path
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "snapshot.thaw"
    # A stable name per URI: loading it again (in any process) refreshes one copy, not another.
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = store_dir() / f".remote-{digest}-{name}"
    copy_from_uri(uri, dest)
    return dest


def _find_parent(uri: str, parent_id: str) -> str:
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
    in_store = store_dir() / (parent_id + SUFFIX)
    if in_store.exists():
        return str(in_store)
    raise SnapshotNotFoundError(
        f"the parent snapshot {parent_id} is neither beside the file nor in the local store; "
        "save the parent too, or fork again from the trunk",
        path=uri,
    )


def _handle_from_chain(paths: list[Path], manifests: list[KVManifest]) -> ForkHandle:
    tokens: list[int] = []
    for index, manifest in enumerate(manifests):
        if index and manifests[index - 1].snapshot_id != (
            manifest.parent.snapshot_id if manifest.parent else None
        ):
            raise SnapshotNotFoundError(f"{manifest.path} does not extend {manifests[index - 1].snapshot_id}")
        tokens.extend(manifest.token_ids)
    tokens.extend(manifests[-1].tail_token_ids)
    return ForkHandle(
        id=manifests[-1].snapshot_id,
        token_ids=tuple(tokens),
        paths=tuple(paths),
        manifests=tuple(manifests),
    )


def fork(engine: Any, prefix: Prefix, *, parent: ForkHandle | None = None) -> ForkHandle:
    """Snapshot the KV of ``prefix`` in ``engine`` and return its handle.

    The prefix is computed once if the engine has not cached it yet (a one-token request);
    exactly its full blocks are written, never another session's. With ``parent`` the new
    snapshot stores only the blocks after the parent's and refers to it.

    Args:
        engine: a ``vllm.LLM`` built with :func:`thaw_agents.engine_kwargs`, or a ChatThaw.
        prefix: a prompt string, token ids, or chat messages (rendered with the model's chat
            template as vLLM's chat path renders them, without a generation prompt).
        parent: a handle whose tokens ``prefix`` starts with.

    Example:
        >>> trunk = fork(llm, [{"role": "system", "content": diff}])     # doctest: +SKIP
        >>> child = trunk.fork(llm, " and the reviewer said")            # doctest: +SKIP
    """
    adapter = adapter_for(engine)
    spec = adapter.kv_spec()
    tokens = adapter.prefix_token_ids(prefix)
    if not tokens:
        raise ConfigError("the prefix is empty")
    bs = spec.block_size
    start_key: bytes | None = None
    parent_ref = None
    parent_paths: tuple[Path, ...] = ()
    parent_manifests: tuple[KVManifest, ...] = ()
    if parent is not None:
        differences = parent.spec.differences(spec)
        if differences:
            field_name = differences[0][0]
            raise ConfigError(f"the parent snapshot was taken on a different engine ({field_name} differs)")
        covered = parent.num_snapshot_tokens
        if tuple(tokens[: parent.num_tokens]) != parent.token_ids:
            raise ConfigError("the prefix does not start with the parent's tokens")
        if parent.num_blocks:
            start_key = (
                bytes.fromhex(parent.manifests[-1].keys[-1])
                if parent.manifests[-1].keys
                else bytes.fromhex(parent.manifests[-1].parent.last_key)
            )  # type: ignore[union-attr]
        parent_ref = {
            "snapshot_id": parent.id,
            "num_blocks": parent.num_blocks,
            "last_key": start_key.hex() if start_key else "",
        }
        if start_key is None:
            parent_ref = None  # a parent without a single full block adds nothing to refer to
        else:
            parent_paths, parent_manifests = parent.paths, parent.manifests
        own = tokens[covered:]
    else:
        covered, own = 0, tokens
    keys = chain_keys(spec, own[: len(own) // bs * bs], start_key=start_key)
    last_key = keys[-1] if keys else (start_key or b"")
    full = covered + len(keys) * bs
    sid = snapshot_id(spec, last_key, tokens[full:])
    dest = store_dir() / (sid + SUFFIX)
    error_file = Path(str(dest) + ".error")
    error_file.unlink(missing_ok=True)
    adapter.run_prefix(tokens, save_params(str(dest), len(tokens), parent_ref))
    if error_file.exists():
        try:
            message = json.loads(error_file.read_text()).get("error", "unknown error")
        finally:
            error_file.unlink(missing_ok=True)
        kind, _, detail = message.partition(": ")
        if kind == "SnapshotWriteError":  # a full disk in the engine: the same typed error
            raise SnapshotWriteError(detail.removeprefix(f"{dest}: "), path=str(dest))
        raise EngineError(f"the engine could not write the snapshot {dest}: {message}")
    if not dest.exists():
        raise EngineError(
            f"the engine did not write the snapshot {dest}. Is the thaw connector configured? "
            "Build the engine with thaw_agents.engine_kwargs()."
        )
    manifest = read_kv_manifest(dest, expect_spec=spec)
    if manifest.snapshot_id != sid:
        raise EngineError(f"the engine wrote snapshot {manifest.snapshot_id}, expected {sid}")
    logger.debug(
        "fork: %s holds %d blocks (%d tokens of %d) at %s",
        sid,
        manifest.num_blocks,
        full,
        len(tokens),
        dest,
    )
    if parent_ref is None:
        return _handle_from_chain([dest], [manifest])
    return _handle_from_chain([*parent_paths, dest], [*parent_manifests, manifest])


def with_fork(sampling_params: Any, handle: ForkHandle) -> Any:
    """A copy of ``sampling_params`` whose request loads ``handle``'s prefix from the snapshot.

    Example:
        >>> sp = with_fork(SamplingParams(max_tokens=64), handle)        # doctest: +SKIP
        >>> llm.generate(TokensPrompt(prompt_token_ids=[*handle.token_ids, *suffix]), sp)  # doctest: +SKIP
    """
    import copy

    params = copy.deepcopy(sampling_params)
    extra = dict(params.extra_args or {})
    extra["kv_transfer_params"] = handle.kv_transfer_params()
    params.extra_args = extra
    return params
