"""One KV snapshot file written by every rank of a tensor-parallel engine.

Each rank's cache holds its own slice of the KV heads, in its own process (on its own GPU), so
no rank can write the others' bytes. The ranks share one file instead, without talking to each
other over the engine's communicators (a collective on a background writer thread would race
the forward pass's collectives)::

    <store>/.thaw-<engine pid>-tp-<job>.partial             the file, filled by every rank
    <store>/.thaw-<engine pid>-tp-<job>.rank<r>.partial     rank r's region checksums (JSON)
    <store>/.thaw-<engine pid>-tp-<job>.final.partial       taken (O_EXCL) by the finishing rank

The header's length does not depend on the checksums (each is 64 hex digits), so every rank
knows where the payload starts before any checksum exists. Regions are rank-major: rank ``r``
writes its blocks at ``payload + (r * num_blocks + i) * block_nbytes``, flushes them, then
publishes its checksums (written and renamed: never seen half-written). A rank that finds all
ranks' checksums present after publishing its own takes the final lock; exactly one rank
does (the last to publish always sees every file). It writes the header, flushes, renames the
file to ``<id>.thaw`` and removes the side files. The engine pid is the engine-core process's
(the scheduler half's, sent with the save job, the same for every rank): the store's
stale-file sweep removes a dead engine's leftovers, and those of a save where a rank failed
after an hour (see ``_store.clean_stale``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3

from ._container import (
    Container,
    Region,
    RegionData,
    checksum,
    container_header,
    encode_header,
    region_parts,
)
from ._container_writer import fsync_dir, write_parts
from ._errors import SnapshotFormatError, write_failed

__all__ = ["combine_rank_results", "write_rank_share"]

_PENDING = "0" * 64  # a checksum's length, before it is known


def _header(
    meta: dict[str, Any], names: Sequence[str], block_nbytes: int, sums: Sequence[str]
) -> tuple[tuple[Region, ...], dict[str, Any], bytes]:
    regions = tuple(
        Region(name=name, offset=i * block_nbytes, nbytes=block_nbytes, checksum=digest)
        for i, (name, digest) in enumerate(zip(names, sums, strict=True))
    )
    header = container_header("kv", meta, regions)
    return regions, header, encode_header(header)


def write_rank_share(
    dest: Path,
    meta: dict[str, Any],
    names: Sequence[str],
    blocks: Sequence[RegionData],
    *,
    rank: int,
    ranks: int,
    block_nbytes: int,
    job: str,
    owner_pid: int,
    fsync: bool,
) -> Container | None:
    """Write ``rank``'s ``blocks`` into the shared file of ``dest``; the last rank renames it.

    Args:
        dest: ``<store>/<id>.thaw``.
        meta: the ``kv`` object of the header (the same on every rank).
        names: every region's name, rank-major (``len(blocks)`` per rank).
        blocks: this rank's share of each block, ``block_nbytes`` each.
        rank, ranks: this rank, and how many write the file.
        job: the same on every rank for one save, unique between saves.
        owner_pid: the engine's process (names the temporary files; the same on every rank).

    Returns:
        The file's container when this rank finished it, else None.

    Raises:
        SnapshotWriteError: this rank's share or the file could not be written.
    """
    num_blocks = len(blocks)
    if len(names) != ranks * num_blocks or not 0 <= rank < ranks:
        raise ValueError(f"{len(names)} region names for rank {rank} of {ranks} with {num_blocks} blocks")
    store = dest.parent
    tag = blake3.blake3(f"{dest.name}|{job}".encode()).hexdigest()[:16]
    base = f".thaw-{owner_pid}-tp-{tag}"
    data_path = store / f"{base}.partial"
    blob_nbytes = len(_header(meta, names, block_nbytes, [_PENDING] * len(names))[2])
    try:
        fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise write_failed(dest, exc) from exc
    try:
        sums = []
        for i, block in enumerate(blocks):
            parts = region_parts(block)
            if sum(p.nbytes for p in parts) != block_nbytes:
                raise ValueError(f"block {i} is not {block_nbytes} bytes")
            write_parts(fd, parts, blob_nbytes + (rank * num_blocks + i) * block_nbytes)
            sums.append(checksum(parts))
        if fsync:
            os.fsync(fd)
        _publish(store / f"{base}.rank{rank}.partial", sums)
        if not all((store / f"{base}.rank{r}.partial").exists() for r in range(ranks)):
            return None
        try:
            os.close(os.open(store / f"{base}.final.partial", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return None  # another rank saw every share at the same moment and finishes
        every = [s for r in range(ranks) for s in _read_sums(store / f"{base}.rank{r}.partial", num_blocks)]
        regions, header, blob = _header(meta, names, block_nbytes, every)
        assert len(blob) == blob_nbytes, "a header's length must not depend on its checksums"
        payload_nbytes = len(names) * block_nbytes
        write_parts(fd, [memoryview(blob)], 0)
        os.ftruncate(fd, blob_nbytes + payload_nbytes)
        if fsync:
            os.fsync(fd)
        os.replace(data_path, dest)
        if fsync:
            fsync_dir(store)
        for suffix in [*(f".rank{r}" for r in range(ranks)), ".final"]:
            with contextlib.suppress(OSError):
                os.unlink(store / f"{base}{suffix}.partial")
    except OSError as exc:
        raise write_failed(dest, exc, blob_nbytes + len(names) * block_nbytes) from exc
    finally:
        os.close(fd)
    return Container(
        path=str(dest),
        header=header,
        regions=regions,
        payload_offset=blob_nbytes,
        payload_nbytes=payload_nbytes,
    )


def _publish(path: Path, sums: list[str]) -> None:
    """Write a rank's checksums under a temporary name and rename: never seen half-written."""
    tmp = path.with_name(path.name.removesuffix(".partial") + ".w.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        write_parts(fd, [memoryview(json.dumps(sums).encode())], 0)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_sums(path: Path, num_blocks: int) -> list[str]:
    """Another rank's checksums: exactly ``num_blocks`` hex digests (the side file is ours,
    but is read like any other file)."""
    with open(path, "rb") as handle:
        sums = json.loads(handle.read(num_blocks * 80 + 64))
    if (
        not isinstance(sums, list)
        or len(sums) != num_blocks
        or not all(isinstance(s, str) and len(s) == 64 for s in sums)
    ):
        raise SnapshotFormatError("a rank's checksum list is malformed", path=str(path))
    return sums


def combine_rank_results(results: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One save's result from every rank's (a worker's ``{"snapshot_id", "rank", "status",
    ...}``): None while any rank's is not in yet; the first failure (in rank order) if any
    rank failed; else written, with the bytes of all ranks. A reply that is not a save result
    (``{"error": ...}`` from an engine without thaw) is passed on as it is.

    Example:
        >>> combine_rank_results([{"status": "written", "rank": 1, "nbytes": 8, "ms": 2.0},
        ...                       {"status": "written", "rank": 0, "nbytes": 8, "ms": 1.0}])
        {'status': 'written', 'nbytes': 16, 'ms': 2.0}
    """
    if not results or any(r is None for r in results):
        return None
    ordered = sorted((r for r in results if r is not None), key=lambda r: r.get("rank", 0))
    for result in ordered:
        if result.get("status") != "written":
            return {k: v for k, v in result.items() if k != "rank"}
    combined = {k: v for k, v in ordered[0].items() if k != "rank"}
    if "nbytes" in combined:
        combined["nbytes"] = sum(int(r.get("nbytes", 0)) for r in ordered)
    if "ms" in combined:
        combined["ms"] = max(float(r.get("ms", 0.0)) for r in ordered)
    return combined
