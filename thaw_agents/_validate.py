"""Checks a reader applies to untrusted files: open only regular files, bound JSON before parsing
it, and strict types and ranges for every header field.

A snapshot may come from anyone (a download, another tenant's store, an HTTP client), so a
reader trusts nothing in it: a FIFO must not hang it, a 16 MiB header of ``[[[[`` must not
exhaust the stack or the memory, ``1e999`` or ``true`` must not pass as an int, and an id
that is later used as a file name must never hold a ``/``. Every failure is a typed
:class:`~thaw_agents.SnapshotError`.
"""

from __future__ import annotations

import errno as _errno
import json
import math
import os
import re
import stat
from collections.abc import Iterable
from typing import Any

import blake3
import numpy as np

from ._errors import (
    SnapshotFormatError,
    SnapshotNotFoundError,
    SnapshotReadError,
    SnapshotTruncatedError,
)

__all__ = [
    "DTYPE_ITEMSIZE",
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "MAX_ITEMS",
    "MAX_TOKEN_ID",
    "CHUNK_NBYTES",
    "describe",
    "loads_bounded",
    "open_regular",
    "pread_all",
    "read_failed",
    "region_digest",
    "dtype_itemsize",
    "want_dict",
    "want_fields",
    "want_hex",
    "want_id",
    "want_int",
    "want_list",
    "want_shape",
    "want_str",
    "want_tokens",
]

# Real headers nest about 5 deep (header > snapshot > parent, header > kv_spec > layers > layer
# > block_shape); anything deeper is hostile, and a bound keeps json.loads off the C stack.
MAX_DEPTH = 16
# Objects and arrays in one header: a KV header holds one region object per block (a 16 MiB
# header has room for ~50k blocks), a weights header one region and one tensor per tensor.
MAX_CONTAINERS = 1 << 18
# Values in one header (commas + 1): token ids dominate, ~7 bytes each, so 16 MiB holds ~2.4M.
MAX_ITEMS = 1 << 22
MAX_TOKEN_ID = 2**31 - 1  # keys hash token ids as int32
# Elements of one tensor or block: far above any real tensor, far below int64 overflow.
MAX_ELEMENTS = 2**48
MAX_INT = 2**62
# Reads and hashes go through buffers of at most this size.
CHUNK_NBYTES = 8 << 20
MAX_STR = 4096

ID_RE = re.compile(r"thaw-[0-9a-f]{32}")
HEX_RE = re.compile(r"[0-9a-f]+")
# dtypes a file may declare (names as torch prints them, without "torch.") and their sizes:
# a closed set, so a byte count is always computed, never looked up in torch by a file's word.
DTYPE_ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}

_DEPTH_TABLE = np.zeros(256, dtype=np.int8)
_DEPTH_TABLE[[ord("["), ord("{")]] = 1
_DEPTH_TABLE[[ord("]"), ord("}")]] = -1
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")


def describe(value: Any) -> str:
    """A short, printable description of a hostile value for an error message."""
    text = ascii(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def open_regular(path: str, *, follow_symlinks: bool = True) -> int:
    """Open ``path`` read-only and return its fd, refusing anything but a regular file.

    Opened non-blocking (a FIFO would otherwise block until a writer appears) and checked
    with ``fstat`` before a byte is read, so what is checked is what is read.

    Raises:
        SnapshotNotFoundError: no such file.
        SnapshotFormatError: a FIFO, device, socket, directory, or (``follow_symlinks=False``)
            a symbolic link.
        SnapshotReadError: permissions, I/O errors, symlink loops, names too long.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except ValueError as exc:  # an embedded NUL byte
        raise SnapshotNotFoundError(f"not a usable file name ({exc})", path=path) from exc
    except OSError as exc:
        raise _open_failed(path, exc, follow_symlinks) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SnapshotFormatError(
                f"this is {_file_kind(mode)}, not a snapshot file; give the path of a .thaw file",
                path=path,
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_failed(path: str, exc: OSError, follow_symlinks: bool) -> Exception:
    code = exc.errno
    if code in (_errno.ENOENT, _errno.ENOTDIR):
        return SnapshotNotFoundError("no snapshot file here", path=path)
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):
        mode = 0
    if code == _errno.ELOOP and not follow_symlinks and stat.S_ISLNK(mode):
        return SnapshotFormatError(
            "this is a symbolic link; snapshot files here must be regular files", path=path
        )
    if code == _errno.ENXIO and stat.S_ISSOCK(mode):
        return SnapshotFormatError("this is a socket, not a snapshot file", path=path)
    if code in (_errno.EACCES, _errno.EPERM):
        why = "permission denied; make the file readable by this user, or read it as its owner"
    elif code == _errno.ELOOP:
        why = "too many levels of symbolic links (a symlink loop); fix or remove the link"
    elif code == _errno.ENAMETOOLONG:
        why = "the file name is too long for this file system"
    elif code == _errno.EIO:
        why = "the device reported an I/O error; check the disk, or fetch the file again"
    else:
        why = f"cannot open it ({exc.strerror or exc})"
    return SnapshotReadError(why, path=path, errno=code)


def read_failed(path: str, exc: OSError) -> SnapshotReadError:
    """The typed error for an ``OSError`` met while reading an opened file."""
    return SnapshotReadError(
        f"reading failed ({exc.strerror or exc}); check the disk, or fetch the file again",
        path=path,
        errno=exc.errno,
    )


def _refuse_constant(name: str) -> Any:
    raise SnapshotFormatError(f"header holds {name}, which JSON does not allow")


def loads_bounded(blob: bytes, path: str) -> Any:
    """``json.loads`` of an untrusted header, after bounding its structure.

    Strings are cut out first (brackets inside them do not count), then the nesting depth,
    the number of objects/arrays and the number of values are checked with a few vectorised
    passes: a header of ``[[[[...`` or of ten million ``[]`` is refused in milliseconds
    instead of taking the stack or gigabytes.
    """
    _check_structure(blob, path)
    try:
        text = blob.decode("utf-8")
        header = json.loads(text, parse_constant=_refuse_constant)
    except SnapshotFormatError as exc:
        raise SnapshotFormatError(str(exc), path=path) from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotFormatError(f"header is not UTF-8 JSON: {exc}", path=path) from exc
    if _SURROGATE_ESCAPE_RE.search(blob):
        _refuse_surrogates(header, path)
    return header


def _check_structure(blob: bytes, path: str) -> None:
    """Bound nesting, objects/arrays and values of a JSON text, brackets in strings excluded.

    Vectorised (a few passes of n bytes each, no Python loop over bytes, no regex that a
    hostile string could make quadratic): a quote is escaped when an odd run of backslashes
    ends right before it; the parity of the real quotes before a byte says whether it is
    inside a string. For valid JSON this is exactly JSON's own lexing; for invalid JSON it
    may count wrong, and json.loads refuses the text anyway.
    """
    arr = np.frombuffer(blob, dtype=np.uint8)
    quote = arr == ord('"')
    backslash = (arr == ord("\\")).view(np.int8)
    if backslash.any():
        edges = np.diff(backslash, prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        escaped = ends[((ends - starts) % 2 == 1) & (ends < arr.size)]
        quote[escaped] = False
        del edges, starts, ends, escaped
    del backslash
    # uint8 wraps at 256, parity survives: odd = inside a string (from its opening quote on).
    inside = (np.cumsum(quote, dtype=np.uint8) & 1).view(bool)
    del quote
    # Commas outside strings bound the number of values (each a Python object once parsed).
    commas = int(np.count_nonzero((arr == ord(",")) & ~inside))
    if commas >= MAX_ITEMS:
        raise SnapshotFormatError(f"header holds more than {MAX_ITEMS:,} values", path=path)
    delta = _DEPTH_TABLE[arr]
    delta[inside] = 0
    del inside
    opens, closes = int(np.count_nonzero(delta == 1)), int(np.count_nonzero(delta == -1))
    if max(opens, closes) > MAX_CONTAINERS:
        raise SnapshotFormatError(
            f"header holds {max(opens, closes):,} objects or arrays (at most {MAX_CONTAINERS:,})",
            path=path,
        )
    if opens:
        depth = np.cumsum(delta[delta != 0], dtype=np.int32)
        deepest, lowest = int(depth.max()), int(depth.min())
        if deepest > MAX_DEPTH or lowest < 0:
            raise SnapshotFormatError(
                f"header nests {deepest} levels deep (at most {MAX_DEPTH}) or is unbalanced", path=path
            )


def _refuse_surrogates(header: Any, path: str) -> None:
    """Refuse lone surrogates (``"\\ud800"``): valid JSON, but no UTF-8 can encode them, so
    they would crash whatever later writes, hashes or prints the string."""
    stack = [header]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SnapshotFormatError(
                    f"header string {describe(item)} holds a lone surrogate", path=path
                ) from exc


def _bad(what: str, expected: str, value: Any, path: str | None) -> SnapshotFormatError:
    return SnapshotFormatError(f"{what} must be {expected}, got {describe(value)}", path=path)


def want_int(value: Any, what: str, path: str | None, *, lo: int = 0, hi: int = MAX_INT) -> int:
    """An ``int`` (never a bool, float or string) in ``lo..hi``."""
    if type(value) is not int:
        raise _bad(what, "an integer", value, path)
    if not lo <= value <= hi:
        raise SnapshotFormatError(f"{what} is {value}, outside {lo}..{hi}", path=path)
    return value


def want_str(value: Any, what: str, path: str | None, *, max_len: int = MAX_STR) -> str:
    if type(value) is not str:
        raise _bad(what, "a string", value, path)
    if len(value) > max_len:
        raise SnapshotFormatError(f"{what} is {len(value):,} characters (at most {max_len:,})", path=path)
    return value


def want_hex(value: Any, what: str, path: str | None, *, nchars: int = 64) -> str:
    """Exactly ``nchars`` lowercase hex digits (a BLAKE3 digest or chain key)."""
    if type(value) is not str or len(value) != nchars or not HEX_RE.fullmatch(value):
        raise _bad(what, f"{nchars} lowercase hex digits", value, path)
    return value


def want_id(value: Any, what: str, path: str | None) -> str:
    """A snapshot id, ``thaw-`` + 32 lowercase hex: later a file name, so never a path."""
    if type(value) is not str or not ID_RE.fullmatch(value):
        raise _bad(what, "a snapshot id (thaw- and 32 lowercase hex digits)", value, path)
    return value


def want_dict(value: Any, what: str, path: str | None) -> dict[str, Any]:
    if type(value) is not dict:
        raise _bad(what, "an object", value, path)
    return value


def want_fields(value: Any, what: str, path: str | None, fields: Iterable[str]) -> dict[str, Any]:
    """An object holding every one of ``fields`` (their types are the caller's next checks).

    Example:
        >>> want_fields({"name": "a", "offset": 0}, "region 0", None, ("name", "offset"))
        {'name': 'a', 'offset': 0}
        >>> want_fields({"name": "a"}, "region 0", "f.thaw", ("name", "offset"))
        Traceback (most recent call last):
        ...
        thaw_agents._errors.SnapshotFormatError: f.thaw: region 0 lacks the field 'offset'
    """
    obj = want_dict(value, what, path)
    for field in fields:
        if field not in obj:
            raise SnapshotFormatError(f"{what} lacks the field {field!r}", path=path)
    return obj


def want_list(value: Any, what: str, path: str | None) -> list[Any]:
    if type(value) is not list:
        raise _bad(what, "a list", value, path)
    return value


def want_tokens(value: Any, what: str, path: str | None) -> tuple[int, ...]:
    """Token ids: a list of ints in ``0..2**31-1`` (checked in C-speed passes)."""
    items = want_list(value, what, path)
    if not set(map(type, items)) <= {int}:  # exact ints (no bools), in one C-speed pass
        raise SnapshotFormatError(f"{what} must be a list of integers", path=path)
    if items and (min(items) < 0 or max(items) > MAX_TOKEN_ID):
        raise SnapshotFormatError(f"{what} holds a token id outside 0..{MAX_TOKEN_ID}", path=path)
    return tuple(items)


def want_shape(value: Any, what: str, path: str | None) -> tuple[int, ...]:
    """A tensor shape: ints >= 0 whose product (exact, in Python ints) is below 2**48."""
    dims = want_list(value, what, path)
    if len(dims) > 64 or not all(type(d) is int and d >= 0 for d in dims):
        raise _bad(what, "a list of at most 64 integers >= 0", value, path)
    if math.prod(dims) >= MAX_ELEMENTS:
        raise SnapshotFormatError(f"{what} {describe(dims)} has 2**48 or more elements", path=path)
    return tuple(dims)


def dtype_itemsize(value: Any, what: str, path: str | None) -> int:
    if type(value) is not str or value not in DTYPE_ITEMSIZE:
        raise _bad(what, f"one of {', '.join(DTYPE_ITEMSIZE)}", value, path)
    return DTYPE_ITEMSIZE[value]


def pread_all(fd: int, nbytes: int, offset: int, path: str) -> bytes:
    """Up to ``nbytes`` from ``offset``; shorter only at the end of the file."""
    parts: list[bytes] = []
    got = 0
    while got < nbytes:
        try:
            part = os.pread(fd, min(nbytes - got, CHUNK_NBYTES), offset + got)
        except OSError as exc:
            raise read_failed(path, exc) from exc
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def region_digest(fd: int, offset: int, nbytes: int, view: memoryview, path: str) -> str:
    """The BLAKE3 hex digest of ``nbytes`` at ``offset``, read through ``view`` (bounded memory).

    Raises:
        SnapshotTruncatedError: the file ends first (it shrank since its header was read).
    """
    big = nbytes >= CHUNK_NBYTES
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if big else blake3.blake3()
    done = 0
    while done < nbytes:
        want = min(nbytes - done, len(view))
        try:
            got = os.preadv(fd, [view[:want]], offset + done)
        except OSError as exc:
            raise read_failed(path, exc) from exc
        if got <= 0:
            raise SnapshotTruncatedError(
                f"the file ends inside a region (byte {offset + done}): it shrank since its "
                "header was read; fetch or re-create it",
                path=path,
            )
        hasher.update(view[:got])
        done += got
    return hasher.hexdigest()
