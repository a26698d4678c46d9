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
    │   └── SnapshotMismatchError   another model, dtype, block size or KV layout
    └── EngineError                 the engine refused or failed a thaw operation

Every error carries the fields a caller needs (``path``, ``field``, ``expected``,
``actual``) and a message that says what to do.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "DependencyError",
    "EngineError",
    "ModelPreparationError",
    "SnapshotChecksumError",
    "SnapshotError",
    "SnapshotFormatError",
    "SnapshotMismatchError",
    "SnapshotNotFoundError",
    "SnapshotTruncatedError",
    "SnapshotVersionError",
    "ThawError",
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
