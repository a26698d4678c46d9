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
* :class:`~thaw_agents.weights.HostWeights` (``_host.py``): a verified copy kept in pinned
  memory (restore = host-to-device only), or a ``/dev/shm`` file mapped and page-locked once
  (CUDA only; checked unchanged before every restore).
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .._errors import SnapshotChangedError, SnapshotTruncatedError
from ._files import check_size, close_mapping, map_payload, on_tmpfs, pread_into, round_up_page
from ._freeze import module_tensors
from ._manifest import Pairs, WeightsManifest, WeightsStats, check_targets, read_weights_manifest
from ._verify import Verifier

if TYPE_CHECKING:
    import torch

__all__ = ["chunk_feed", "release_staging", "restore_module", "restore_tensors", "run_restore"]


_CHUNK_NBYTES = 32 << 20
# Page-cache reads are memcpys in the kernel: they scale with threads. O_DIRECT wants a few
# large requests in flight (4 x 32 MiB matched dd on the H100 host's disk).
_NUM_READERS = 12
# Pinned chunks in flight on the ring route (16 x 32 MiB = 512 MiB, allocated once).
_RING_SLOTS = 16
_LANDING_MARGIN_NBYTES = 1 << 30
_staging_lock = threading.Lock()
_staging: Any = None


def _pinned_staging(nbytes: int, pinned: bool) -> torch.Tensor:
    """A reused page-aligned host buffer of at least ``nbytes`` (pinned when ``pinned``)."""
    global _staging
    from ..accel import StagingBuffer

    with _staging_lock:
        if _staging is None or _staging.pinned != pinned:
            _staging = StagingBuffer(pin_memory=pinned)
        return _staging.flat(nbytes)


def release_staging() -> None:
    """Free the pinned read buffer that restores keep for the next restore."""
    global _staging
    with _staging_lock:
        _staging = None


def restore_tensors(
    path: str | os.PathLike[str],
    targets: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    *,
    expect_fingerprint: str | None = None,
    source: str = "auto",
    before_write: Callable[[], None] | None = None,
) -> WeightsStats:
    """Restore a weights file into ``targets`` (CPU or CUDA tensors), all or nothing.

    Every check (header, manifest, names, dtypes, shapes, fingerprint, then every checksum)
    passes before the first target byte is written.

    Args:
        source: ``auto``, ``direct`` (O_DIRECT reads), ``buffered`` (page cache) or ``mmap``
            (map the file; on CUDA page-locked with cudaHostRegister: the /dev/shm fast path).
        before_write: called once every byte is verified, before the first target is written;
            raising there leaves the targets untouched (tensor-parallel ranks agree there).
    """
    manifest = read_weights_manifest(path)
    items = targets.items() if isinstance(targets, Mapping) else targets
    pairs = check_targets(manifest, items, expect_fingerprint=expect_fingerprint)
    return _restore_from_file(manifest, pairs, source=source, before_write=before_write)


def restore_module(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    expect_fingerprint: str | None = None,
    **kwargs: Any,
) -> WeightsStats:
    """Restore every parameter and persistent buffer of ``module`` from a weights file."""
    return restore_tensors(path, module_tensors(module), expect_fingerprint=expect_fingerprint, **kwargs)


def run_restore(
    manifest: WeightsManifest,
    pairs: Pairs,
    host: torch.Tensor,
    feed: Callable[[Callable[[int, int], None]], None],
    *,
    verify: bool,
    route: str,
    landing_ok: bool = True,
    before_write: Callable[[], None] | None = None,
) -> WeightsStats:
    """Move the payload from ``host`` (filled by ``feed``) into the targets, all or nothing."""
    import torch

    from ..accel import copy_segments

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
    verifier = Verifier(pairs, host, nbytes, _CHUNK_NBYTES, verify, landing=landing, stream=side)
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
    if before_write is not None:
        before_write()
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


def chunk_feed(nbytes: int) -> Callable[[Callable[[int, int], None]], None]:
    def feed(arrived: Callable[[int, int], None]) -> None:
        for a in range(0, nbytes, _CHUNK_NBYTES):
            arrived(a, min(nbytes, a + _CHUNK_NBYTES))

    return feed


def _restore_from_file(
    manifest: WeightsManifest,
    pairs: Pairs,
    *,
    source: str = "auto",
    before_write: Callable[[], None] | None = None,
) -> WeightsStats:
    """Restore validated ``pairs`` from ``manifest``'s file (see the module docstring)."""
    from ..accel import HostRegistration, probe_o_direct, read_into

    if source not in {"auto", "direct", "buffered", "mmap"}:
        raise ValueError(f"source must be auto, direct, buffered or mmap, got {source!r}")
    path = manifest.path
    nbytes = manifest.nbytes
    offset = manifest.container.payload_offset
    cuda = any(t.is_cuda for _, t in pairs)
    if nbytes == 0:
        if before_write is not None:
            before_write()
        return WeightsStats(nbytes=0, num_tensors=len(pairs), seconds=0.0, route="empty")
    if source == "auto":
        if not cuda:
            source = "mmap"
        elif on_tmpfs(path):
            # Page-locking a mapping per restore costs more than copying it (~1.7 s vs 0.5 s
            # for 8 GiB on an H100 host): use HostWeights.map to register it once instead.
            source = "buffered"
        else:
            source = "direct" if probe_o_direct(os.path.dirname(os.path.abspath(path))) else "buffered"
    if source == "mmap":
        host, region, _ = map_payload(path, offset, nbytes, shared=cuda)
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
                return run_restore(
                    manifest,
                    pairs,
                    host,
                    chunk_feed(nbytes),
                    verify=True,
                    route=route,
                    before_write=before_write,
                )
            finally:
                if registration is not None:
                    registration.close()
                del host
                close_mapping(region)
        del host
        close_mapping(region)
        source = "buffered"
    if source == "buffered" and cuda:
        stats = _run_ring(manifest, pairs, path, offset, nbytes, before_write)
        if stats is not None:
            return stats
    host = _pinned_staging(round_up_page(nbytes), pinned=cuda)

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

    return run_restore(
        manifest,
        pairs,
        host,
        feed,
        verify=True,
        route="o_direct" if source == "direct" else "buffered",
        before_write=before_write,
    )


def _run_ring(
    manifest: WeightsManifest,
    pairs: Pairs,
    path: str,
    offset: int,
    nbytes: int,
    before_write: Callable[[], None] | None = None,
) -> WeightsStats | None:
    """The page-cache (or ``/dev/shm``) route on a GPU with room for a landing buffer: reader
    threads fill a ring of ``_RING_SLOTS`` pinned chunks, each chunk goes host-to-device into the
    landing buffer as it arrives and is hashed there, and a slot is read into again once its
    copy is done. Pinned memory stays bounded (a whole-file pinned buffer costs seconds to
    allocate and fault in at engine start: 8 s for 14.8 GB on an H200 VM). None when the
    landing buffer does not fit: the caller stages the whole file in host memory instead.
    """
    import torch

    from ..accel import copy_segments

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
    verifier = Verifier(pairs, ring, nbytes, _CHUNK_NBYTES, True, landing=landing, stream=side)
    chunks = [(a, min(nbytes, a + _CHUNK_NBYTES)) for a in range(0, nbytes, _CHUNK_NBYTES)]
    nonblock = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, nonblock)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotChangedError("is no longer a regular file; read it again", path=path)
        check_size(fd, offset + nbytes, path)

        def read(c: int) -> None:
            a, b = chunks[c]
            freed[c % slots].synchronize()  # the slot's previous copy to the GPU is done
            pread_into(fd, offset + a, b - a, ring_np[c % slots], path)

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
    if before_write is not None:
        before_write()
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
