"""Checking restored bytes against their checksums while they still arrive (host or GPU)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .._errors import SnapshotChecksumError
from ..accel import blake3_hex
from ._manifest import Pairs, TensorEntry

if TYPE_CHECKING:
    import torch

__all__ = ["Verifier", "checksum_error"]

# GPU verification: a hashing launch per this many arrived bytes, queued behind their copies.
_GPU_BATCH_NBYTES = 1 << 30


def checksum_error(entry: TensorEntry, index: int, path: str) -> SnapshotChecksumError:
    return SnapshotChecksumError(
        f"tensor {entry.name} does not match its checksum: the file is corrupt, and "
        "no parameter was changed. Freeze the model again or fetch the file again.",
        path=path,
        region=index,
    )


class Verifier:
    """Hashes regions as soon as the chunks covering them have arrived.

    On the host a thread pool hashes the host copy. With ``landing`` (a device buffer the
    bytes are copied into on ``stream``) the GPU hashes them there instead, a launch per
    ``_GPU_BATCH_NBYTES`` of arrived regions on a second stream that waits for their copies,
    and the host CPUs are left to the reads.
    """

    def __init__(
        self,
        pairs: Pairs,
        host: torch.Tensor,
        nbytes: int,
        chunk_nbytes: int,
        enabled: bool,
        landing: torch.Tensor | None = None,
        stream: Any = None,
    ) -> None:
        self._host = host.numpy()
        self._pairs = sorted(pairs, key=lambda p: p[0].offset)
        self._chunk = chunk_nbytes
        self._arrived = [False] * max(1, -(-nbytes // chunk_nbytes))
        self._mark = 0
        self._next = 0
        self._landing = landing if enabled else None
        self._stream = stream
        self._hash_stream: Any = None
        use_pool = enabled and self._landing is None
        self._pool = ThreadPoolExecutor(max(1, min(32, os.cpu_count() or 1))) if use_pool else None
        self._futures: list[tuple[int, TensorEntry, Future[str]]] = []
        self._batch: list[int] = []
        self._batch_nbytes = 0
        self._launched: list[tuple[list[int], Any]] = []

    def arrived(self, start: int) -> None:
        self._arrived[start // self._chunk] = True
        while self._mark < len(self._arrived) and self._arrived[self._mark]:
            self._mark += 1
        ready = self._mark * self._chunk
        while (
            self._next < len(self._pairs)
            and self._pairs[self._next][0].offset + self._pairs[self._next][0].nbytes <= ready
        ):
            entry = self._pairs[self._next][0]
            if self._pool is not None:
                view = self._host[entry.offset : entry.offset + entry.nbytes]
                self._futures.append((self._next, entry, self._pool.submit(blake3_hex, view)))
            elif self._landing is not None:
                self._batch.append(self._next)
                self._batch_nbytes += entry.nbytes
            self._next += 1
        if self._batch_nbytes >= _GPU_BATCH_NBYTES:
            self._launch()

    def _launch(self) -> None:
        import torch

        from ..accel import launch_blake3_digests

        if not self._batch:
            return
        regions = [(self._pairs[i][0].offset, self._pairs[i][0].nbytes) for i in self._batch]
        # Hash on a stream of its own, after the copies queued so far: on the copy stream the
        # kernels would hold back the copies queued behind them.
        if self._hash_stream is None:
            self._hash_stream = torch.cuda.Stream(device=self._landing.device)
        self._hash_stream.wait_stream(self._stream)
        with torch.cuda.stream(self._hash_stream):
            self._launched.append((self._batch, launch_blake3_digests(self._landing, regions)))
        self._batch, self._batch_nbytes = [], 0

    def check(self, path: str) -> None:
        try:
            for index, entry, future in self._futures:
                if future.result() != entry.checksum:
                    raise checksum_error(entry, index, path)
            self._launch()
            for indices, pending in self._launched:
                for index, digest in zip(indices, pending.result(), strict=True):
                    entry = self._pairs[index][0]
                    if digest != entry.checksum:
                        raise checksum_error(entry, index, path)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
