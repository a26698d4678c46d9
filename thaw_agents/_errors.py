"""The one exception tree of thaw-agents.

::

    ThawError
    ├── ConfigError                 bad arguments, engine not set up for thaw
    ├── DependencyError (+ImportError)  an optional package is missing
    ├── ModelPreparationError       the default model could not be prepared
    ├── SnapshotError               a snapshot cannot be used
    │   ├── SnapshotNotFoundError   (+FileNotFoundError)
    │   ├── SnapshotFormatError     bad magic, header, JSON, schema or offsets
    │   ├── SnapshotVersionError    written by an unknown format version
    │   ├── SnapshotTruncatedError  the payload is shorter than the header says
    │   ├── SnapshotChecksumError   a region's bytes do not match its checksum
    │   ├── SnapshotMismatchError   another model, dtype, block size or KV layout
    │   ├── SnapshotWriteError (+OSError)  full disk, quota or permissions; nothing written
    │   ├── SnapshotReadError (+OSError)   permissions, I/O error, symlink loop, name too long
    │   └── SnapshotChangedError    a mapped file changed under a reader; map it again
    ├── EngineError                 the engine refused or failed a thaw operation
    └── PoolError                   a ForkPool worker failed a step (boot, hydrate, generate)
        ├── WorkerDiedError         the worker process or actor exited
        └── PoolTimeoutError (+TimeoutError)  a step ran past its timeout

Every error carries the fields a caller needs (``path``, ``field``, ``expected``,
``actual``; ``worker``, ``branch``, ``stage`` for pool errors) and a message that says what to do.
"""

from __future__ import annotations

import errno as _errno
import os
import shutil
from typing import Any

__all__ = [
    "ConfigError",
    "DependencyError",
    "EngineError",
    "ModelPreparationError",
    "PoolError",
    "PoolTimeoutError",
    "RequestTimeoutError",
    "SnapshotChangedError",
    "SnapshotChecksumError",
    "SnapshotError",
    "SnapshotFormatError",
    "SnapshotMismatchError",
    "SnapshotNotFoundError",
    "SnapshotReadError",
    "SnapshotTruncatedError",
    "SnapshotVersionError",
    "SnapshotWriteError",
    "ThawError",
    "WorkerDiedError",
    "error_json",
    "write_failed",
]


class ThawError(Exception):
    """Base class of every error raised by thaw-agents."""


class ConfigError(ThawError, ValueError):
    """An argument or an engine configuration cannot work."""


class DependencyError(ThawError, ImportError):
    """An optional dependency is missing; the message is the install command."""

    def __init__(self, package: str, install: str, purpose: str = "") -> None:
        self.package = package
        self.install = install
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(f"the package {package!r} is not installed{what}; install it with: {install}")


class ModelPreparationError(ThawError, RuntimeError):
    """The default model could not be prepared."""


class EngineError(ThawError, RuntimeError):
    """The engine refused or failed a thaw operation (save, load, describe)."""


class RequestTimeoutError(EngineError, TimeoutError):
    """A request ran past its ``timeout_s``; the front aborted it in the engine: retry with a
    longer timeout, or fewer tokens (``max_tokens``)."""


class SnapshotError(ThawError):
    """A snapshot cannot be read or used.

    Attributes:
        path: the snapshot's location, when known.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{message}")


class SnapshotNotFoundError(SnapshotError, FileNotFoundError):
    """No snapshot exists at the given location or id."""


class SnapshotFormatError(SnapshotError, ValueError):
    """The file is not a valid thaw snapshot (magic, header, JSON, schema, offsets)."""


class SnapshotVersionError(SnapshotError, ValueError):
    """The snapshot was written by a format version this library cannot read."""


class SnapshotTruncatedError(SnapshotError, ValueError):
    """The payload is shorter than the header declares."""


class SnapshotChecksumError(SnapshotError, ValueError):
    """A payload region does not match its recorded checksum (corruption)."""

    def __init__(self, message: str, *, path: str | None = None, region: int | None = None) -> None:
        self.region = region
        super().__init__(message, path=path)


class SnapshotMismatchError(SnapshotError, ValueError):
    """The snapshot was taken from an engine that differs from the target.

    Attributes:
        field: the manifest field that differs (``model.fingerprint``, ``kv.dtype``...).
        expected: the target engine's value.
        actual: the snapshot's value.
    """

    def __init__(
        self, field: str, expected: Any, actual: Any, *, path: str | None = None, hint: str = ""
    ) -> None:
        self.field = field
        self.expected = expected
        self.actual = actual
        message = (
            f"snapshot does not match this engine: {field} is {actual!r} in the snapshot "
            f"but {expected!r} in the engine"
        )
        if hint:
            message += f"; {hint}"
        super().__init__(message, path=path)


class SnapshotWriteError(SnapshotError, OSError):
    """A snapshot or weights file could not be written: a full disk, a quota, permissions.

    Nothing is left behind: the destination is untouched and the partial file removed.

    Attributes:
        errno: the operating system's error number, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message, path=path)
        self.errno = errno


class SnapshotReadError(SnapshotError, OSError):
    """A snapshot or weights file exists but could not be read: permissions, an I/O error,
    a symlink loop, a name too long.

    Attributes:
        errno: the operating system's error number, when known.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message, path=path)
        self.errno = errno


class SnapshotChangedError(SnapshotError):
    """A file held open by a reader (a mapped weights file) changed since it was opened:
    another process truncated, rewrote or replaced it. Map or load it again."""


def error_json(exc: BaseException) -> dict[str, Any]:
    """An exception as plain data, to cross a process boundary (a worker's reply): its type's
    name, its message (without the ``path: `` prefix a :class:`SnapshotError` adds), and where
    the exception has them, ``path``, ``errno`` and a mismatch's ``field``/``expected``/``actual``.

    Example:
        >>> error_json(SnapshotWriteError("disk full", path="/s/x.thaw", errno=28))
        {'type': 'SnapshotWriteError', 'message': 'disk full', 'path': '/s/x.thaw', 'errno': 28}
    """
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)[:4000]}
    path = getattr(exc, "path", None)
    if isinstance(path, str):
        error["path"] = path
        error["message"] = error["message"].removeprefix(f"{path}: ")
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int):
        error["errno"] = errno
    if isinstance(exc, SnapshotMismatchError):
        error.update(field=exc.field, expected=repr(exc.expected), actual=repr(exc.actual))
    return error


def write_failed(path: str | os.PathLike[str], exc: OSError, nbytes: int | None = None) -> SnapshotWriteError:
    """The :class:`SnapshotWriteError` for an ``OSError`` met while writing ``path``."""
    path = os.fspath(path)
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(os.path.dirname(path) or '.').free:,} bytes free there"
        except OSError:
            free = "free space unknown"
        needed = f"{nbytes:,} bytes needed, " if nbytes else ""
        message = (
            f"no space left on the device ({needed}{free}); free some space or write elsewhere "
            "(THAW_AGENTS_STORE moves the snapshot store)"
        )
    elif exc.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        message = f"cannot write here ({exc.strerror}); choose a folder you can write to"
    else:
        message = f"writing failed: {exc}"
    return SnapshotWriteError(message + "; nothing was written", path=path, errno=exc.errno)


class PoolError(ThawError, RuntimeError):
    """A :class:`~thaw_agents.ForkPool` worker could not boot, hydrate or generate.

    Attributes:
        message: what went wrong, without the branch and worker prefix.
        worker: the worker's name (``"local-0"``, ``"ray-1"``), when one is involved.
        branch: the index of the failed branch in the round's input order, when known.
        stage: ``"boot"``, ``"ship"``, ``"hydrate"`` or ``"generate"``.
        remote_type: the exception class raised inside the worker, when it raised one.
        failures: every failed branch of the round (this error first), set by ``fork_completions``.
        results: the round's results in input order, ``None`` where a branch failed.
    """

    def __init__(
        self,
        message: str,
        *,
        worker: str | None = None,
        branch: int | None = None,
        stage: str | None = None,
        remote_type: str | None = None,
    ) -> None:
        self.message = message
        self.worker = worker
        self.branch = branch
        self.stage = stage
        self.remote_type = remote_type
        self.failures: tuple[PoolError, ...] = ()
        self.results: list[Any] | None = None
        where = [f"branch {branch}" if branch is not None else "", f"worker {worker}" if worker else ""]
        prefix = ", ".join(w for w in where if w)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class WorkerDiedError(PoolError):
    """A worker process (or Ray actor) exited; the pool replaces it.

    Attributes:
        exit_code: the process's exit status (negative: killed by that signal), when known.
        log_tail: the last lines the worker logged, when available.
    """

    def __init__(
        self, message: str, *, exit_code: int | None = None, log_tail: str = "", **fields: Any
    ) -> None:
        self.exit_code = exit_code
        self.log_tail = log_tail
        super().__init__(message, **fields)


class PoolTimeoutError(PoolError, TimeoutError):
    """A boot, hydrate or generate step ran past its timeout.

    Attributes:
        timeout_s: the limit that was exceeded.
    """

    def __init__(self, message: str, *, timeout_s: float | None = None, **fields: Any) -> None:
        self.timeout_s = timeout_s
        super().__init__(message, **fields)
