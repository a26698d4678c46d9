"""How a round's trunk snapshot reaches the workers, and where the pool keeps its files.

Transports (``ForkPool(transport=...)``):

- ``"shm"``: a copy in shared memory (``/dev/shm``), one per round, removed after the round.
- ``"store"``: the workers read the parent's snapshot store in place (same host, no copy).
- a directory or fsspec URI (``"/mnt/shared/thaw"``, ``"s3://bucket/thaw"``): durable or
  cross-host; each round writes ``<uri>/round-<token>/`` and removes it afterwards.
- ``"ray"`` (Ray backend): the file's bytes through Ray's object store (see ``_ray.py``).

Everything the pool writes lives under one owner-only runtime folder,
``/dev/shm/thaw-pool-<uid>/`` (or the temp folder where there is no ``/dev/shm``), in
folders named ``<pid>-<token>``: a pool that crashed leaves its folder behind, and the
next pool to start on the host removes folders whose process is gone.

Example:
    >>> root = runtime_root(); clean_stale(root)           # doctest: +SKIP
    >>> shipment = ship(handle, "shm", make_run_dir(root))  # doctest: +SKIP
    >>> shipment.ref["uri"]; shipment.cleanup()             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import ConfigError
from .._store import SUFFIX, is_local_uri, local_path
from ._protocol import SnapshotRef

if TYPE_CHECKING:
    from .._fork import ForkHandle

__all__ = ["Shipment", "clean_stale", "make_run_dir", "pid_alive", "runtime_root", "ship"]

logger = logging.getLogger(__name__)
_RUN_DIR = re.compile(r"^(?:[a-z]+-)?(\d+)-[0-9a-f]+$")
LOCAL_TRANSPORTS = ("shm", "store")


@dataclass(slots=True, kw_only=True)
class Shipment:
    """A snapshot made available to workers, and how to take it back."""

    ref: SnapshotRef
    transport: str
    nbytes: int
    _cleanup: Callable[[], None] = field(default=lambda: None, repr=False)

    def cleanup(self) -> None:
        try:
            self._cleanup()
        except Exception:  # a leftover is removed at the next start; never fail a round for it
            logger.warning(
                "could not remove the round's snapshot copy %s", self.ref.get("uri"), exc_info=True
            )


def runtime_root() -> Path:
    """The pool's owner-only folder on this host (shared memory where there is some)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    root = base / f"thaw-pool-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(
            f"{root} must be a folder owned by this user and closed to others (mode 700); "
            "remove it or fix its permissions"
        )
    return root


def make_run_dir(root: Path, kind: str = "") -> Path:
    """A fresh owner-only folder named after this process (so stale ones can be told apart)."""
    name = f"{kind + '-' if kind else ''}{os.getpid()}-{secrets.token_hex(4)}"
    path = root / name
    path.mkdir(mode=0o700)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(root: Path) -> list[Path]:
    """Remove the folders of pools and workers whose process is gone; return them."""
    removed = []
    for entry in root.iterdir():
        match = _RUN_DIR.match(entry.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed:
        logger.info("removed %d stale pool folder(s) under %s", len(removed), root)
    return removed


def check_transport(transport: str, backend: str) -> str:
    """Resolve ``"auto"`` and reject a transport the backend cannot use."""
    if transport == "auto":
        if backend == "ray":
            return "ray"
        return "shm" if Path("/dev/shm").is_dir() else "store"
    if transport == "ray":
        if backend != "ray":
            raise ConfigError("transport='ray' needs backend='ray'")
        return transport
    if transport in LOCAL_TRANSPORTS:
        if backend == "ray":
            raise ConfigError(
                f"transport={transport!r} only reaches workers on this host; with backend='ray' use "
                "'ray' (the object store) or a shared directory / fsspec URI"
            )
        return transport
    if "://" in transport or transport.startswith("/"):
        return transport
    raise ConfigError(
        f"unknown transport {transport!r}: use 'auto', 'shm', 'store', 'ray', an absolute directory "
        "or an fsspec URI"
    )


def ship(handle: ForkHandle, transport: str, run_dir: Path) -> Shipment:
    """Make ``handle`` readable by the workers through ``transport`` (not ``"ray"``)."""
    token = secrets.token_hex(6)
    name = handle.id + SUFFIX
    base: SnapshotRef = {"id": handle.id, "nbytes": handle.nbytes, "transport": transport}
    if transport == "store":
        return Shipment(ref={**base, "uri": str(handle.path)}, transport=transport, nbytes=0)
    if transport == "shm":
        folder = run_dir / f"round-{token}"
        folder.mkdir(mode=0o700)
        try:
            handle.save(folder / name)  # ancestors land beside it, under their ids
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Shipment(
            ref={**base, "uri": str(folder / name)},
            transport=transport,
            nbytes=handle.nbytes,
            _cleanup=lambda: shutil.rmtree(folder, ignore_errors=True),
        )
    folder_uri = f"{transport.rstrip('/')}/round-{token}"
    handle.save(f"{folder_uri}/{name}")
    return Shipment(
        ref={**base, "uri": f"{folder_uri}/{name}"},
        transport="uri",
        nbytes=handle.nbytes,
        _cleanup=lambda: _remove_uri_folder(folder_uri),
    )


def _remove_uri_folder(uri: str) -> None:
    if is_local_uri(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
