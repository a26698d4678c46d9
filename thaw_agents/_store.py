"""The snapshot store: the one folder an engine reads and writes snapshots in, by id.

Layout: ``<store>/<snapshot id>.thaw``, owner-only (folder 0700, files 0600). Requests that
reach an engine name snapshots by id; the connector opens ``<store>/<id>.thaw`` and nothing
else, refuses symbolic links, and checks that the file holds exactly that snapshot. Python
callers may use any path or fsspec URI (``s3://``, ``memory://``): :func:`import_snapshot`
brings a checked file into the store (a hard link where that is safe, else a verified copy)
and the engine only ever sees its id.

Writers (the engine's saves, imports, downloads) write ``.thaw-<pid>-<random>.partial`` and
rename it into place; a killed writer's leftovers are removed by :func:`clean_stale`, which
every :func:`open_store` runs (it rescans a folder only when the folder changed).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import (
    ConfigError,
    DependencyError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotNotFoundError,
    write_failed,
)

if TYPE_CHECKING:
    from ._manifest import KVManifest

__all__ = [
    "SUFFIX",
    "clean_stale",
    "copy_from_uri",
    "copy_to_uri",
    "import_snapshot",
    "is_local_uri",
    "local_path",
    "make_private_dirs",
    "open_store",
    "partial_prefix",
    "read_in_store",
    "resolve_chain",
    "snapshot_path",
    "store_dir",
]

SUFFIX = ".thaw"
_ID = re.compile(r"thaw-[0-9a-f]{32}")
_PARTIAL = re.compile(r"\.thaw-(\d+)-.*\.partial")
# A chain deeper than this is not a conversation, it is a loop or an attack.
MAX_CHAIN_FILES = 4096
# Leftovers of a writer whose pid we cannot check (another host on a shared folder, or a
# recycled pid) are removed once they are this old.
_STALE_AGE_S = 3600.0
_SCANNED: dict[str, tuple[int, bool]] = {}  # folder -> (its mtime at the last scan, live writers seen)


def partial_prefix() -> str:
    """The prefix of this process's temporary files (the store tells dead writers by the pid)."""
    return f".thaw-{os.getpid()}-"


def make_private_dirs(path: Path) -> None:
    """``mkdir -p`` where every folder created is owner-only (``Path.mkdir`` applies ``mode``
    to the last one only)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)


def open_store(path: str | os.PathLike[str] | None = None) -> Path:
    """The store folder (``path``, else ``THAW_AGENTS_STORE``, else ``<cache>/snapshots``),
    created owner-only if missing, with stale temporary files removed.

    Raises:
        ConfigError: the path exists and is not a folder.
        SnapshotWriteError: the folder cannot be created (read-only file system, permissions).
    """
    if path is None:
        env = os.environ.get("THAW_AGENTS_STORE")
        if env:
            path = env
        else:
            from .models import cache_dir

            path = cache_dir() / "snapshots"
    folder = Path(path).expanduser().absolute()
    try:
        make_private_dirs(folder)
    except (NotADirectoryError, FileExistsError) as exc:
        raise ConfigError(
            f"the snapshot store {folder} is not a folder (something else has that name); "
            "point THAW_AGENTS_STORE at a folder"
        ) from exc
    except OSError as exc:
        raise write_failed(folder, exc) from exc
    if not folder.is_dir():
        raise ConfigError(f"the snapshot store {folder} is not a folder; point THAW_AGENTS_STORE at a folder")
    clean_stale(folder)
    return folder


def store_dir() -> Path:
    """The user's store: ``THAW_AGENTS_STORE``, else ``<cache dir>/snapshots``; owner-only."""
    return open_store(None)


def snapshot_path(store: Path, snapshot_id: str) -> Path:
    """``<store>/<id>.thaw``; the id is checked first, so it can never name another folder."""
    if not isinstance(snapshot_id, str) or _ID.fullmatch(snapshot_id) is None:
        raise SnapshotNotFoundError(
            f"{str(snapshot_id)[:80]!r} is not a snapshot id ('thaw-' and 32 hex digits)"
        )
    return store / (snapshot_id + SUFFIX)


def clean_stale(store: Path, *, force: bool = False) -> int:
    """Remove temporary files of writers that died (SIGKILL, power loss); return how many.

    A ``.thaw-<pid>-*.partial`` file is stale when that process no longer exists, or when it
    is older than an hour (the pid may be another host's, or recycled). The folder is scanned
    again only when it changed since the last scan, or when a live writer's file was seen then
    (that writer may have died since), so calling this on every store operation is cheap.
    """
    key = str(store)
    try:
        mtime_ns = os.stat(store).st_mtime_ns
    except OSError:
        return 0
    last = _SCANNED.get(key)
    if not force and last is not None and last[0] == mtime_ns and not last[1]:
        return 0
    removed, live = 0, False
    try:
        entries = list(os.scandir(store))
    except OSError:
        return 0
    wall = time.time()
    for entry in entries:
        try:
            age_s = wall - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if entry.name.endswith(".error"):  # left by versions that reported save errors in files
            stale = age_s > _STALE_AGE_S
        elif entry.name.startswith(".thaw-") and entry.name.endswith(".partial"):
            match = _PARTIAL.fullmatch(entry.name)
            stale = age_s > _STALE_AGE_S or (match is not None and not _alive(int(match.group(1))))
            live = live or not stale
        else:
            continue
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    with contextlib.suppress(OSError):
        mtime_ns = os.stat(store).st_mtime_ns
    _SCANNED[key] = (mtime_ns, live)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process: not ours to judge
    return True


def read_in_store(path: Path, snapshot_id: str) -> KVManifest:
    """The validated manifest of ``<store>/<id>.thaw``: a regular file, no symbolic link,
    holding exactly ``snapshot_id``."""
    from ._manifest import read_kv_manifest

    return read_kv_manifest(path, expect_id=snapshot_id, follow_symlinks=False)


def resolve_chain(
    store: Path, snapshot_id: str, *, read: Callable[[Path, str], KVManifest] = read_in_store
) -> list[KVManifest]:
    """The validated manifests of ``snapshot_id`` and its ancestors in ``store``, root first.

    Every file must be a regular file (no symbolic links) holding exactly the snapshot its
    name says, and each must extend the one before it (block counts and chain keys).

    Args:
        read: reads one file of the chain (the connector passes a cached reader).

    Raises:
        SnapshotNotFoundError: the snapshot or an ancestor is not in the store.
        SnapshotFormatError: a file is not what its name says, or the chain is broken.
    """
    chain: list[KVManifest] = []
    wanted: str | None = snapshot_id
    while wanted is not None:
        if len(chain) >= MAX_CHAIN_FILES:
            raise SnapshotFormatError(f"the chain of {snapshot_id} is longer than {MAX_CHAIN_FILES} files")
        manifest = read(snapshot_path(store, wanted), wanted)
        chain.append(manifest)
        wanted = manifest.parent.snapshot_id if manifest.parent else None
    chain.reverse()
    check_links(chain)
    return chain


def check_links(chain: list[KVManifest]) -> None:
    """Each file of ``chain`` (root first) extends the one before it."""
    for previous, manifest in itertools.pairwise(chain):
        parent = manifest.parent
        last_key = (
            previous.keys[-1] if previous.keys else (previous.parent.last_key if previous.parent else "")
        )
        if (
            parent is None
            or parent.snapshot_id != previous.snapshot_id
            or parent.num_blocks != previous.end_block
            or parent.last_key != last_key
            or manifest.spec.differences(previous.spec)
        ):
            raise SnapshotFormatError(
                f"{manifest.snapshot_id} does not extend {previous.snapshot_id}: the chain is broken; "
                "fork again from the trunk",
                path=manifest.path,
            )
    if chain and chain[0].parent is not None:
        raise SnapshotFormatError("the chain does not start at a root snapshot", path=chain[0].path)


def import_snapshot(manifest: KVManifest, store: Path, *, verify: bool = True) -> Path:
    """Bring a validated snapshot file into ``store`` under its id; returns its path there.

    A hard link when the file is already private to this user on the same file system (no
    copy, and nobody else can change it), else a copy. Checksums are verified once: on the
    linked file when ``verify``, and always on a copy (the source may change while we copy).
    """
    from ._container_reader import verify_regions
    from ._manifest import read_kv_manifest

    dest = snapshot_path(store, manifest.snapshot_id)
    src = Path(manifest.path)
    try:
        if os.path.realpath(src) == os.path.realpath(dest):
            if verify:
                verify_regions(manifest.container)
            return dest
        st = src.stat()
    except OSError as exc:
        raise SnapshotNotFoundError(f"cannot reach the snapshot file: {exc.strerror}", path=str(src)) from exc
    tmp = store / f"{partial_prefix()}{os.urandom(8).hex()}.partial"
    try:
        linked = False
        if st.st_uid == os.getuid() and not st.st_mode & 0o077:
            try:
                os.link(src, tmp)
                linked = True
            except OSError:
                pass  # another file system, or links not allowed: copy
        if not linked:
            _copy_file(src, tmp)
        if verify or not linked:
            try:
                copied = read_kv_manifest(tmp, expect_id=manifest.snapshot_id, follow_symlinks=False)
                verify_regions(copied.container)
            except SnapshotError as exc:  # name the user's file, not our temporary copy
                exc.args = tuple(str(a).replace(str(tmp), str(src)) for a in exc.args)
                exc.path = str(src)
                raise
        os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            nbytes = manifest.container.payload_offset + manifest.container.payload_nbytes
            raise write_failed(dest, exc, nbytes) from exc
        raise
    return dest


def _copy_file(src: Path, dest: Path) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    _copy_into(src, fd, dest)


def _copy_into(src: Path, fd: int, dest: Path) -> None:
    """Copy ``src`` into the open file ``fd`` (closed after) that becomes ``dest``; flushed to
    the device unless ``dest`` is in /dev/shm. Every local copy of a snapshot goes this way."""
    with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
        if not _copy_in_kernel(inp.fileno(), out.fileno()):
            shutil.copyfileobj(inp, out, 16 << 20)
            out.flush()
        if not str(dest).startswith("/dev/shm/"):
            os.fsync(out.fileno())


def _copy_in_kernel(src: int, dest: int) -> bool:
    """Copy with ``sendfile`` (no pass through Python's buffers: 92 MB from a cold disk file
    into /dev/shm took 94-108 ms instead of 149-156, from the page cache 41-45 instead of
    80-86); False, having copied nothing, where the kernel cannot."""
    offset = 0
    while True:
        try:
            sent = os.sendfile(dest, src, offset, 1 << 30)
        except OSError as exc:
            if offset == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise
        if sent == 0:
            return True
        offset += sent


def is_local_uri(uri: str | os.PathLike[str]) -> bool:
    text = os.fspath(uri)
    return "://" not in text or text.startswith("file://")


def local_path(uri: str | os.PathLike[str]) -> Path:
    text = os.fspath(uri)
    # Absolute, not resolved: a symbolic-link loop must reach the reader, which refuses it with a
    # typed error (Path.resolve raises an untyped RuntimeError on one).
    return Path(os.path.abspath(os.path.expanduser(text.removeprefix("file://"))))


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
        if os.path.realpath(dest) == os.path.realpath(src):
            return
        try:
            make_private_dirs(dest.parent)
            fd, tmp = tempfile.mkstemp(prefix=partial_prefix(), suffix=".partial", dir=dest.parent)
        except OSError as exc:
            raise write_failed(dest, exc) from exc
        try:
            os.fchmod(fd, 0o600)
            _copy_into(src, fd, dest)
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
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix(), suffix=".partial", dir=dest.parent)
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
