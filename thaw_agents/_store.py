"""Where snapshots live: the local store, shared memory, and fsspec URIs.

The engine reads and writes local files only (it may run in another process), so every
snapshot an engine touches is a file in the local store or a local path. Other URIs
(``s3://``, ``memory://``, ...) are copied to and from the store through fsspec.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from ._errors import DependencyError, SnapshotNotFoundError, write_failed

__all__ = ["copy_from_uri", "copy_to_uri", "is_local_uri", "local_path", "store_dir"]

SUFFIX = ".thaw"


def store_dir() -> Path:
    """The local snapshot store: ``THAW_AGENTS_STORE``, else ``<cache dir>/snapshots``; owner-only."""
    env = os.environ.get("THAW_AGENTS_STORE")
    if env:
        path = Path(env).expanduser()
    else:
        from .models import cache_dir

        path = cache_dir() / "snapshots"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def is_local_uri(uri: str | os.PathLike[str]) -> bool:
    text = os.fspath(uri)
    return "://" not in text or text.startswith("file://")


def local_path(uri: str | os.PathLike[str]) -> Path:
    text = os.fspath(uri)
    return Path(text.removeprefix("file://")).expanduser().resolve()


# Local-disk failures of a download (a remote read error stays what fsspec raised).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _fsspec():
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a core dependency
        raise DependencyError("fsspec", "pip install fsspec", "snapshot URIs") from exc
    return fsspec


def copy_to_uri(src: Path, uri: str) -> None:
    """Copy a local snapshot file to ``uri`` (local paths: atomic and owner-only)."""
    if is_local_uri(uri):
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest == src.resolve():
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=".thaw-", suffix=".partial", dir=dest.parent)
        except OSError as exc:
            raise write_failed(dest, exc) from exc
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 16 << 20)
                out.flush()
                if not str(dest).startswith("/dev/shm/"):
                    os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise write_failed(dest, exc, src.stat().st_size) from exc
            raise
        return
    fs, path = _fsspec().core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(str(src), path)


def copy_from_uri(uri: str, dest: Path) -> None:
    """Download ``uri`` to the local file ``dest`` atomically (owner-only)."""
    fs, path = _fsspec().core.url_to_fs(uri)
    if not fs.exists(path):
        raise SnapshotNotFoundError("no snapshot at this URI", path=uri)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".thaw-", suffix=".partial", dir=dest.parent)
    except OSError as exc:
        raise write_failed(dest, exc) from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb") as inp:
            shutil.copyfileobj(inp, out, 16 << 20)
        os.replace(tmp, dest)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            raise write_failed(dest, exc) from exc
        raise


def sibling_uri(uri: str, name: str) -> str:
    """``name`` in the same directory as ``uri``."""
    if is_local_uri(uri):
        return str(local_path(uri).parent / name)
    head, _, _ = uri.rpartition("/")
    return f"{head}/{name}"
