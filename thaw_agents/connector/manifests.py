"""Validated snapshot headers, cached by file identity, for both connector halves.

A header is parsed and checked in full (ids, chain keys, types) the first time a file is
used; later requests reuse it while the file's device, inode, size and mtime are unchanged.
A replaced or rewritten file is read again. The payload is never trusted from here: the
worker verifies every block's checksum as it reads it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from .._manifest import KVManifest
from .._store import read_in_store, resolve_chain

__all__ = ["ManifestCache"]


class ManifestCache:
    """Least-recently-used cache of validated headers keyed by path and file identity."""

    def __init__(self, store: Path, capacity: int = 256) -> None:
        self.store = store
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str], tuple[tuple[int, ...], KVManifest]] = OrderedDict()

    def read(self, path: Path, snapshot_id: str) -> KVManifest:
        key = (str(path), snapshot_id)
        try:
            st = os.stat(path, follow_symlinks=False)
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        except OSError:
            identity = ()
        cached = self._entries.get(key)
        if cached is not None and identity and cached[0] == identity:
            self._entries.move_to_end(key)
            return cached[1]
        manifest = read_in_store(path, snapshot_id)  # raises the typed error when unusable
        self._entries[key] = (identity, manifest)
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return manifest

    def chain(self, snapshot_id: str) -> list[KVManifest]:
        """The chain of ``snapshot_id`` in the store, root first (see ``resolve_chain``)."""
        return resolve_chain(self.store, snapshot_id, read=self.read)
