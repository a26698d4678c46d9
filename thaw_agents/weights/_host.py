"""``HostWeights``: a weights file held in host memory (or a page-locked ``/dev/shm`` mapping)
for repeated fast restores."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from .._errors import SnapshotChangedError, SnapshotTruncatedError
from .._validate import open_regular, read_failed
from . import _restore
from ._files import check_size, close_mapping, map_payload, pread_into, round_up_page
from ._manifest import WeightsManifest, WeightsStats, check_targets, read_weights_manifest
from ._verify import Verifier

if TYPE_CHECKING:
    import torch

__all__ = ["HostWeights"]


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
        >>> from thaw_agents.weights import HostWeights, freeze_tensors
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
        from ..accel import aligned_empty, cuda_available, read_into

        manifest = read_weights_manifest(path)
        pin = cuda_available() if pin_memory is None else pin_memory
        nbytes = manifest.nbytes
        host = aligned_empty(round_up_page(max(nbytes, 1)), pin_memory=pin)
        try:
            read_into(manifest.path, manifest.container.payload_offset, nbytes, host, num_readers=16)
        except EOFError as exc:
            raise SnapshotTruncatedError(str(exc), path=manifest.path) from exc
        except OSError as exc:
            raise read_failed(manifest.path, exc) from exc
        verifier = Verifier([(e, host) for e in manifest.tensors], host, nbytes, _restore._CHUNK_NBYTES, True)
        _restore.chunk_feed(nbytes)(lambda a, b: verifier.arrived(a))
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
        from ..accel import HostRegistration, aligned_empty, cuda_available

        manifest = read_weights_manifest(path)
        where, offset, nbytes = manifest.path, manifest.container.payload_offset, manifest.nbytes
        if cuda_available():
            # The GPU reads registered pages by DMA: a truncation fails the copy, it cannot
            # raise SIGBUS in this process.
            host, region, fd = map_payload(where, offset, max(1, nbytes), shared=True, keep_fd=True)
            assert fd is not None
            try:
                check_size(fd, offset + nbytes, where)
                registration = HostRegistration(host)
            except BaseException:
                del host
                close_mapping(region)
                os.close(fd)
                raise
            keep: Any = (region, registration)
        else:
            fd = open_regular(where)
            try:
                check_size(fd, offset + nbytes, where)
                host = aligned_empty(round_up_page(max(nbytes, 1)), pin_memory=False)
                pread_into(fd, offset, nbytes, host.numpy(), where)
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
        return _restore.run_restore(
            self.manifest,
            pairs,
            self.host,
            _restore.chunk_feed(self.manifest.nbytes),
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
            close_mapping(region)
            self._keep = None
        if self._fd is not None:
            self.host = None  # type: ignore[assignment]
            os.close(self._fd)
            self._fd = None
