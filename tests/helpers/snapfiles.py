"""Build hostile variants of a real snapshot file."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thaw_agents._container import MAGIC, PAYLOAD_ALIGN, read_container


def rewrite_header(src: Path, dst: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    """Copy ``src`` to ``dst`` with its JSON header changed by ``mutate`` (payload unchanged)."""
    container = read_container(src)
    header = json.loads(json.dumps(container.header))
    mutate(header)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    total = 16 + len(raw)
    padded = -(-total // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
    raw += b" " * (padded - total)
    with open(src, "rb") as inp, open(dst, "wb") as out:
        out.write(struct.pack("<8sQ", MAGIC, len(raw)))
        out.write(raw)
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
