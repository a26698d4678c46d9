"""The restore pipeline of weights files: read, verify, then write the targets, overlapped.

All or nothing: no target byte is written until every region's checksum has passed. On a
GPU the bytes still move while they are being checked: each chunk goes host-to-device into
a *landing* buffer as soon as it is read, on a side stream, and the GPU hashes the regions
already complete right there (BLAKE3 kernels queued behind the copies, so the host CPUs
only read); once all pass, one kernel launch copies the landing buffer into every parameter
(device bandwidth, milliseconds). Without room for a landing buffer the bytes wait in
pinned host memory, hashed there by a thread pool, and are copied afterwards.

Sources of the bytes:

* ``direct``: O_DIRECT reads into a reused, pinned, page-aligned buffer (cold files).
* ``buffered``: the same through the page cache (warm files).
* ``mmap``: the file mapped in place; on CUDA page-locked with ``cudaHostRegister`` so the
  GPU copies straight out of it (the ``/dev/shm`` same-host hand-off).
* :class:`HostWeights`: a verified copy kept in pinned memory (restore = host-to-device only),
  or a ``/dev/shm`` file mapped and page-locked once (CUDA only; checked unchanged before
  every restore).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ._errors import SnapshotChangedError, SnapshotChecksumError, SnapshotTruncatedError
from ._validate import open_regular, read_failed
from .accel import blake3_hex
from .weights import TensorEntry, WeightsManifest, WeightsStats, check_targets, read_weights_manifest

if TYPE_CHECKING:
    import torch

__all__ = ["HostWeights", "release_staging", "restore_from_file"]

_CHUNK_NBYTES = 32 << 20
# Page-cache reads are memcpys in the kernel: they scale with threads. O_DIRECT wants a few
# large requests in flight (4 x 32 MiB matched dd on the H100 host's disk).
_NUM_READERS = 12
# Pinned chunks in flight on the ring route (16 x 32 MiB = 512 MiB, allocated once).
_RING_SLOTS = 16
_LANDING_MARGIN_NBYTES = 1 << 30
# GPU verification: a hashing launch per this many arrived bytes, queued behind their copies.
_GPU_BATCH_NBYTES = 1 << 30
_staging_lock = threading.Lock()
_staging: Any = None

Pairs = Sequence[tuple[TensorEntry, "torch.Tensor"]]


def _pinned_staging(nbytes: int, pinned: bool) -> torch.Tensor:
    """A reused page-aligned host buffer of at least ``nbytes`` (pinned when ``pinned``)."""
    global _staging
    from .accel import StagingBuffer

    with _staging_lock:
        if _staging is None or _staging.pinned != pinned:
            _staging = StagingBuffer(pin_memory=pinned)
        return _staging.flat(nbytes)


def release_staging() -> None:
    """Free the pinned read buffer that restores keep for the next restore."""
    global _staging
    with _staging_lock:
        _staging = None


def _round_up(n: int) -> int:
    return -(-n // 4096) * 4096


def _map(
    path: str, offset: int, nbytes: int, *, shared: bool, keep_fd: bool = False
) -> tuple[torch.Tensor, mmap.mmap, int | None]:
    """Map the payload. ``shared``: the file's own pages (what cudaHostRegister must lock for a
    zero-copy /dev/shm hand-off); otherwise a private, never-written mapping of a read-only fd.
    ``keep_fd``: return the open fd (its owner closes it), else None."""
    import torch

    nonblock = os.O_NONBLOCK | os.O_CLOEXEC  # never wait on a FIFO swapped in since the header
    try:
        fd = os.open(path, (os.O_RDWR if shared else os.O_RDONLY) | nonblock)
    except PermissionError:
        fd, shared = os.open(path, os.O_RDONLY | nonblock), False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotChangedError("is no longer a regular file; read it again", path=path)
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        region = mmap.mmap(fd, nbytes, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except BaseException:
        os.close(fd)
        raise
    if not keep_fd:
        os.close(fd)
    return torch.frombuffer(region, dtype=torch.uint8), region, fd if keep_fd else None


def _on_tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            best, fstype = "", ""
            real = os.path.realpath(path)
            for line in mounts:
                parts = line.split()
                if (
                    len(parts) > 2
                    and real.startswith(parts[1].rstrip("/") + "/")
                    and len(parts[1]) > len(best)
                ):
                    best, fstype = parts[1], parts[2]
            return fstype == "tmpfs"
    except OSError:
        return False


def _checksum_error(entry: TensorEntry, index: int, path: str) -> SnapshotChecksumError:
    return SnapshotChecksumError(
        f"tensor {entry.name} does not match its checksum: the file is corrupt, and "
        "no parameter was changed. Freeze the model again or fetch the file again.",
        path=path,
        region=index,
    )


class _Verifier:
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

        from .accel import launch_blake3_digests

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
                    raise _checksum_error(entry, index, path)
            self._launch()
            for indices, pending in self._launched:
                for index, digest in zip(indices, pending.result(), strict=True):
                    entry = self._pairs[index][0]
                    if digest != entry.checksum:
                        raise _checksum_error(entry, index, path)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)


def _run(
    manifest: WeightsManifest,
    pairs: Pairs,
    host: torch.Tensor,
    feed: Callable[[Callable[[int, int], None]], None],
    *,
    verify: bool,
    route: str,
    landing_ok: bool = True,
) -> WeightsStats:
    """Move the payload from ``host`` (filled by ``feed``) into the targets, all or nothing."""
    import torch

    from .accel import copy_segments

    start_t = time.perf_counter()
    nbytes = manifest.nbytes
    cuda = [t for _, t in pairs if t.is_cuda]
    device = cuda[0].device if cuda else None
    landing = None
    if device is not None and landing_ok:
        free, _ = torch.cuda.mem_get_info(device)
        if free > nbytes + _LANDING_MARGIN_NBYTES:
            landing = torch.empty(nbytes, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device=device) if device is not None else None
    verifier = _Verifier(pairs, host, nbytes, _CHUNK_NBYTES, verify, landing=landing, stream=side)
    arrivals: queue.Queue[tuple[int, int] | BaseException | None] = queue.Queue()

    def feeder() -> None:
        try:
            feed(lambda a, b: arrivals.put((a, b)))
            arrivals.put(None)
        except BaseException as exc:
            arrivals.put(exc)

    thread = threading.Thread(target=feeder, name="thaw-weights-read", daemon=True)
    thread.start()
    try:
        while True:
            item = arrivals.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                if isinstance(item, EOFError):
                    raise SnapshotTruncatedError(f"{item}; no parameter was changed", path=manifest.path)
                raise item
            a, b = item
            if landing is not None:
                with torch.cuda.stream(side):
                    landing[a:b].copy_(host[a:b], non_blocking=True)
            verifier.arrived(a)
    finally:
        thread.join()
        if verify:
            verifier.check(manifest.path)
    # Every byte is verified: now, and only now, the targets are written.
    main = torch.cuda.current_stream(device) if device is not None else None
    if landing is not None:
        main.wait_stream(side)
        copy_segments([(landing[e.offset : e.offset + e.nbytes], t) for e, t in pairs])
        landing.record_stream(main)
    else:
        if side is not None:
            side.wait_stream(main)
        for entry, target in pairs:
            src = host[entry.offset : entry.offset + entry.nbytes]
            dst = target.reshape(-1).view(torch.uint8)
            if target.is_cuda:
                with torch.cuda.stream(side):
                    dst.copy_(src, non_blocking=True)
            else:
                dst.copy_(src)
        if side is not None:
            main.wait_stream(side)
    if main is not None:
        main.synchronize()
    route += "+landing" if landing is not None else ""
    route += "+gpu-verified" if landing is not None and verify else ""
    return WeightsStats(
        nbytes=nbytes, num_tensors=len(pairs), seconds=time.perf_counter() - start_t, route=route
    )


def _chunks(nbytes: int) -> Callable[[Callable[[int, int], None]], None]:
    def feed(arrived: Callable[[int, int], None]) -> None:
        for a in range(0, nbytes, _CHUNK_NBYTES):
            arrived(a, min(nbytes, a + _CHUNK_NBYTES))

    return feed


def restore_from_file(manifest: WeightsManifest, pairs: Pairs, *, source: str = "auto") -> WeightsStats:
    """Restore validated ``pairs`` from ``manifest``'s file (see the module docstring)."""
    from .accel import HostRegistration, probe_o_direct, read_into

    if source not in {"auto", "direct", "buffered", "mmap"}:
        raise ValueError(f"source must be auto, direct, buffered or mmap, got {source!r}")
    path = manifest.path
    nbytes = manifest.nbytes
    offset = manifest.container.payload_offset
    cuda = any(t.is_cuda for _, t in pairs)
    if nbytes == 0:
        return WeightsStats(nbytes=0, num_tensors=len(pairs), seconds=0.0, route="empty")
    if source == "auto":
        if not cuda:
            source = "mmap"
        elif _on_tmpfs(path):
            # Page-locking a mapping per restore costs more than copying it (~1.7 s vs 0.5 s
            # for 8 GiB on an H100 host): use HostWeights.map to register it once instead.
            source = "buffered"
        else:
            source = "direct" if probe_o_direct(os.path.dirname(os.path.abspath(path))) else "buffered"
    if source == "mmap":
        host, region, _ = _map(path, offset, nbytes, shared=cuda)
        registration = None
        route = "mmap"
        if cuda:
            try:
                registration = HostRegistration(host)
                route = "mmap+registered"
            except Exception:  # file-backed pages of some filesystems cannot be page-locked
                registration = None
        if not cuda or registration is not None:
            try:
                return _run(manifest, pairs, host, _chunks(nbytes), verify=True, route=route)
            finally:
                if registration is not None:
                    registration.close()
                del host
                _close(region)
        del host
        _close(region)
        source = "buffered"
    if source == "buffered" and cuda:
        stats = _run_ring(manifest, pairs, path, offset, nbytes)
        if stats is not None:
            return stats
    host = _pinned_staging(_round_up(nbytes), pinned=cuda)

    def feed(arrived: Callable[[int, int], None]) -> None:
        read_into(
            path,
            offset,
            nbytes,
            host,
            direct=source == "direct",
            chunk_nbytes=_CHUNK_NBYTES,
            num_readers=_NUM_READERS if source == "buffered" else 4,
            on_chunk=arrived,
        )

    return _run(
        manifest, pairs, host, feed, verify=True, route="o_direct" if source == "direct" else "buffered"
    )


def _run_ring(
    manifest: WeightsManifest, pairs: Pairs, path: str, offset: int, nbytes: int
) -> WeightsStats | None:
    """The page-cache (or ``/dev/shm``) route on a GPU with room for a landing buffer: reader
    threads fill a ring of ``_RING_SLOTS`` pinned chunks, each chunk goes host-to-device into the
    landing buffer as it arrives and is hashed there, and a slot is read into again once its
    copy is done. Pinned memory stays bounded (a whole-file pinned buffer costs seconds to
    allocate and fault in at engine start: 8 s for 14.8 GB on an H200 VM). None when the
    landing buffer does not fit: the caller stages the whole file in host memory instead.
    """
    import torch

    from .accel import copy_segments

    devices = {t.device for _, t in pairs if t.is_cuda}
    if len(devices) != 1 or any(not t.is_cuda for _, t in pairs):
        return None
    device = devices.pop()
    free, _ = torch.cuda.mem_get_info(device)
    if free <= nbytes + _LANDING_MARGIN_NBYTES:
        return None
    start_t = time.perf_counter()
    landing = torch.empty(nbytes, dtype=torch.uint8, device=device)
    slots = _RING_SLOTS
    ring = _pinned_staging(slots * _CHUNK_NBYTES, pinned=True)[: slots * _CHUNK_NBYTES].view(
        slots, _CHUNK_NBYTES
    )
    ring_np = ring.numpy()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    freed = [torch.cuda.Event() for _ in range(slots)]
    verifier = _Verifier(pairs, ring, nbytes, _CHUNK_NBYTES, True, landing=landing, stream=side)
    chunks = [(a, min(nbytes, a + _CHUNK_NBYTES)) for a in range(0, nbytes, _CHUNK_NBYTES)]
    nonblock = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, nonblock)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotChangedError("is no longer a regular file; read it again", path=path)
        _check_size(fd, offset + nbytes, path)

        def read(c: int) -> None:
            a, b = chunks[c]
            freed[c % slots].synchronize()  # the slot's previous copy to the GPU is done
            _pread_into(fd, offset + a, b - a, ring_np[c % slots], path)

        with ThreadPoolExecutor(min(_NUM_READERS, slots)) as pool:
            futures = {c: pool.submit(read, c) for c in range(min(slots, len(chunks)))}
            try:
                for c, (a, b) in enumerate(chunks):
                    futures.pop(c).result()
                    with torch.cuda.stream(side):
                        landing[a:b].copy_(ring[c % slots, : b - a], non_blocking=True)
                        freed[c % slots].record(side)
                    verifier.arrived(a)
                    if c + slots < len(chunks):
                        futures[c + slots] = pool.submit(read, c + slots)
            finally:
                for future in futures.values():
                    future.cancel()
        verifier.check(path)  # every byte verified on the GPU before any target is written
    finally:
        os.close(fd)
        side.synchronize()
    main = torch.cuda.current_stream(device)
    main.wait_stream(side)
    copy_segments([(landing[e.offset : e.offset + e.nbytes], t) for e, t in pairs])
    landing.record_stream(main)
    main.synchronize()
    return WeightsStats(
        nbytes=nbytes,
        num_tensors=len(pairs),
        seconds=time.perf_counter() - start_t,
        route="buffered+ring+landing+gpu-verified",
    )


def _close(region: mmap.mmap) -> None:
    # BufferError: a view is still alive somewhere; the mapping goes away with it.
    with contextlib.suppress(BufferError):
        region.close()


class HostWeights:
    """A weights file held in host memory, for repeated fast restores.

    :meth:`load` reads and verifies the file once into private (pinned with CUDA) memory.
    :meth:`map` is the same-host hand-off of a ``/dev/shm`` file: with CUDA it maps the file
    in place and page-locks it once (``cudaHostRegister``), no copy on the host at all; without
    CUDA it reads the file into private memory, since there a mapping saves nothing and a file
    truncated under a mapping would kill the process with SIGBUS. :meth:`restore` then copies
    into a model's tensors. A mapped file is verified again on every restore (another process
    may have rewritten it), on the GPU and overlapped with the copy (48 GB/s for 8.5 GB on an
    H100, 88% of its pinned copy bandwidth), and before every restore the file is checked to
    be unchanged (same inode, size and mtime): a changed file raises
    :class:`~thaw_agents._errors.SnapshotChangedError`, map it again.

    Example:
        >>> import torch
        >>> from thaw_agents.weights import freeze_tensors
        >>> _ = freeze_tensors("/tmp/h.thaw", {"w": torch.ones(3)}, model_name="m", model_fingerprint="f")
        >>> cached = HostWeights.load("/tmp/h.thaw")
        >>> target = torch.zeros(3)
        >>> _ = cached.restore({"w": target})
        >>> target.tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(
        self, manifest: WeightsManifest, host: torch.Tensor, *, verified: bool, keep: Any = None
    ) -> None:
        self.manifest = manifest
        self.host = host
        self.verified = verified
        self._keep = keep
        self._fd: int | None = None
        self._stat: os.stat_result | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, pin_memory: bool | None = None) -> HostWeights:
        """Read and verify ``path`` into private host memory (pinned when CUDA is present)."""
        from .accel import aligned_empty, cuda_available, read_into

        manifest = read_weights_manifest(path)
        pin = cuda_available() if pin_memory is None else pin_memory
        nbytes = manifest.nbytes
        host = aligned_empty(_round_up(max(nbytes, 1)), pin_memory=pin)
        try:
            read_into(manifest.path, manifest.container.payload_offset, nbytes, host, num_readers=16)
        except EOFError as exc:
            raise SnapshotTruncatedError(str(exc), path=manifest.path) from exc
        except OSError as exc:
            raise read_failed(manifest.path, exc) from exc
        verifier = _Verifier([(e, host) for e in manifest.tensors], host, nbytes, _CHUNK_NBYTES, True)
        _chunks(nbytes)(lambda a, b: verifier.arrived(a))
        verifier.check(manifest.path)
        return cls(manifest, host, verified=True)

    @classmethod
    def map(cls, path: str | os.PathLike[str], *, verify: bool = True) -> HostWeights:
        """Hold ``path`` (a ``/dev/shm`` file) for restores: mapped in place and page-locked with
        CUDA, read into private memory without (see the class docstring).

        Args:
            verify: check every checksum on each restore (default). ``False`` trusts whoever
                wrote the file (a process of yours on this host): the header, manifest and
                target checks still run, the payload is copied unchecked.

        Raises:
            SnapshotError: the header is bad, or the file is shorter than it says.
        """
        from .accel import HostRegistration, aligned_empty, cuda_available

        manifest = read_weights_manifest(path)
        where, offset, nbytes = manifest.path, manifest.container.payload_offset, manifest.nbytes
        if cuda_available():
            # The GPU reads registered pages by DMA: a truncation fails the copy, it cannot
            # raise SIGBUS in this process.
            host, region, fd = _map(where, offset, max(1, nbytes), shared=True, keep_fd=True)
            assert fd is not None
            try:
                _check_size(fd, offset + nbytes, where)
                registration = HostRegistration(host)
            except BaseException:
                del host
                _close(region)
                os.close(fd)
                raise
            keep: Any = (region, registration)
        else:
            fd = open_regular(where)
            try:
                _check_size(fd, offset + nbytes, where)
                host = aligned_empty(_round_up(max(nbytes, 1)), pin_memory=False)
                _pread_into(fd, offset, nbytes, host.numpy(), where)
            except BaseException:
                os.close(fd)
                raise
            keep = None
        cached = cls(manifest, host, verified=not verify, keep=keep)
        cached._fd, cached._stat = fd, os.fstat(fd)
        return cached

    def check_unchanged(self) -> None:
        """Raise :class:`SnapshotChangedError` if the mapped file was changed, replaced or removed
        since :meth:`map` (a no-op for :meth:`load`, whose copy is private)."""
        if self._fd is None or self._stat is None:
            if self.host is None:
                raise SnapshotChangedError("this HostWeights is closed; map the file again")
            return
        path, before = self.manifest.path, self._stat
        now = os.fstat(self._fd)
        if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise SnapshotChangedError(
                f"the file changed since it was mapped ({before.st_size} -> {now.st_size} bytes, "
                "or rewritten); map it again with HostWeights.map",
                path=path,
            )
        try:
            named = os.stat(path)
        except OSError as exc:
            raise SnapshotChangedError(
                "the file was removed since it was mapped; map the new file again", path=path
            ) from exc
        if (named.st_dev, named.st_ino) != (before.st_dev, before.st_ino):
            raise SnapshotChangedError(
                "another file now has this name (it was replaced since it was mapped); "
                "map it again with HostWeights.map",
                path=path,
            )

    def restore(
        self, targets: Any, *, expect_fingerprint: str | None = None, landing: bool | None = None
    ) -> WeightsStats:
        """Copy the bytes into ``targets`` (name -> tensor, or (name, tensor) pairs), all or nothing.

        Args:
            landing: stage through a device landing buffer; default: only when the bytes
                must be verified (a mapped file), so the check overlaps the copy.

        Raises:
            SnapshotChangedError: a mapped file changed since :meth:`map`; map it again.
        """
        self.check_unchanged()
        items = targets.items() if hasattr(targets, "items") else targets
        pairs = check_targets(self.manifest, items, expect_fingerprint=expect_fingerprint)
        verify = not self.verified
        return _run(
            self.manifest,
            pairs,
            self.host,
            _chunks(self.manifest.nbytes),
            verify=verify,
            route="host" if self.verified else "mapped",
            landing_ok=verify if landing is None else landing,
        )

    def __del__(self) -> None:
        # A dropped handle must not leak its fd (map keeps one open to watch the file).
        with contextlib.suppress(Exception):
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        """Unregister and unmap (a mapped file); drop the host copy; close the file."""
        if self._keep is not None:
            region, registration = self._keep
            if registration is not None:
                registration.close()
            self.host = None  # type: ignore[assignment]
            _close(region)
            self._keep = None
        if self._fd is not None:
            self.host = None  # type: ignore[assignment]
            os.close(self._fd)
            self._fd = None


def _check_size(fd: int, end: int, path: str) -> None:
    size = os.fstat(fd).st_size
    if size < end:
        raise SnapshotTruncatedError(f"the file is {size} bytes, its header says {end}", path=path)
    if size > end:
        raise SnapshotChangedError("the file grew since its header was read; map it again", path=path)


def _pread_into(fd: int, offset: int, nbytes: int, out: Any, path: str) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < nbytes:
        want = min(nbytes - done, _CHUNK_NBYTES)
        try:
            got = os.preadv(fd, [view[done : done + want]], offset + done)
        except OSError as exc:
            raise read_failed(path, exc) from exc
        if got <= 0:
            raise SnapshotTruncatedError("the file shrank while it was read; map it again", path=path)
        done += got
