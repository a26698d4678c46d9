"""Build hostile variants of real snapshot and weights files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thaw_agents import _container
from thaw_agents._container import MAGIC, PAYLOAD_ALIGN
from thaw_agents._container_reader import read_container


def encode_header(header: Any, *, pad: bool = True) -> bytes:
    """A header as a file holds it: JSON (ASCII, so lone surrogates travel as escapes; NaN and
    Infinity written as the bare words Python emits), space-padded to align the payload."""
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if pad:
        raw += b" " * (-(16 + len(raw)) % PAYLOAD_ALIGN)
    return raw


def assemble(header: bytes, payload: bytes | memoryview) -> bytes:
    """Prefix (magic, header length) + header + payload."""
    return struct.pack("<8sQ", MAGIC, len(header)) + header + bytes(payload)


def split(data: bytes) -> tuple[dict[str, Any], int]:
    """The header of a well-formed file's bytes, and where its payload starts."""
    (nbytes,) = struct.unpack_from("<Q", data, 8)
    return json.loads(data[16 : 16 + nbytes]), 16 + nbytes


def reid(header: dict[str, Any]) -> None:
    """Recompute ``kv.snapshot.id`` of an edited KV header, as a careful forger would, so that a
    test reaches the checks beyond the id (the engine's spec comparison). Leaves headers that
    do not parse as they are."""
    from thaw_agents._kvspec import KVSpec
    from thaw_agents._manifest import ParentRef, derive_snapshot

    try:
        snap = header["kv"]["snapshot"]
        spec = KVSpec.from_json(header["kv"]["kv_spec"])
        keys, parent = snap["keys"], snap.get("parent")
        last = keys[-1] if keys else (parent["last_key"] if parent else "")
        # The id of the stored keys (not of keys recomputed from the tokens): the tail alone,
        # continuing the chain at the file's last key.
        after = ParentRef(snapshot_id="thaw-" + "0" * 32, num_blocks=0, last_key=last) if last else None
        snap["id"] = derive_snapshot(spec, snap["tail_token_ids"], parent=after).snapshot_id
    except Exception:
        return


def reseal(header: dict[str, Any]) -> None:
    """Make an edited header self-consistent again, as a careful forger would: a KV header
    gets the id of its content (:func:`reid`), a weights header its ``header_checksum``."""
    if header.get("kind") == "kv":
        reid(header)
    elif header.get("kind") == "weights":
        from thaw_agents.weights._manifest import _header_checksum

        header["weights"]["header_checksum"] = _header_checksum(header)


def rewrite_header(
    src: Path, dst: Path, mutate: Callable[[dict[str, Any]], None], *, recompute_id: bool = True
) -> Path:
    """Copy ``src`` to ``dst`` with its JSON header changed by ``mutate`` (payload unchanged).

    ``mutate`` gets the whole header: the container's fields, and the kind's under ``"kv"`` or
    ``"weights"``. ``recompute_id``: make the edited header self-consistent (see :func:`reseal`);
    False leaves the stored id or checksum, which the reader then refuses.
    """
    container = read_container(src)
    header = json.loads(json.dumps(container.header))
    mutate(header)
    if recompute_id:
        reseal(header)
    with open(src, "rb") as inp, open(dst, "wb") as out:
        out.write(_container.encode_header(header))
        inp.seek(container.payload_offset)
        shutil.copyfileobj(inp, out)
    os.chmod(dst, 0o600)
    return dst


def flip_byte(src: Path, dst: Path, payload_index: int = 1000) -> Path:
    if Path(src).resolve() != Path(dst).resolve():
        shutil.copyfile(src, dst)
    container = read_container(dst)
    with open(dst, "r+b") as handle:
        handle.seek(container.payload_offset + payload_index)
        byte = handle.read(1)
        handle.seek(container.payload_offset + payload_index)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return dst


def truncate(src: Path, dst: Path, drop: int = 4096) -> Path:
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    with open(dst, "r+b") as handle:
        handle.truncate(size - drop)
    return dst


def other_dtype(dtype: str) -> str:
    """Another KV dtype of the same item size (so an edited header stays self-consistent):
    what an engine of the other kind of CPU (bfloat16 vs float16) or precision would record."""
    return {"bfloat16": "float16", "float16": "bfloat16", "float32": "int32"}[dtype]
