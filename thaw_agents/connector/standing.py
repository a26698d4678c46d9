"""Snapshots an engine holds for the next request that starts with their tokens (``hydrate``).

``ForkHandle.hydrate(engine)`` used to run a one-token request that loaded the snapshot, so
hydrating and then asking cost two engine steps where ``with_fork`` costs one. Now the front
hands the scheduler half a request carrying ``{"op": "hydrate", "snapshot_id": ...}`` and aborts
it at once: the scheduler keeps the snapshot here and never schedules that request. The next
request whose prompt starts with the snapshot's tokens gets a load planned from it, the load a
request naming the snapshot gets, inside its own step. Once a request has loaded every block,
the snapshot leaves this set: the prefix is in vLLM's prefix cache, served (and evicted) like
any cached prefix, as after the old one-token hydrate. A request that matches only part of it
loads that part and leaves the snapshot here for a longer one.

A snapshot that leaves the store (evicted, deleted) or stops matching the engine (a weights
swap) is dropped. The set is small and bounded: the least recently hydrated go first.

Example:
    >>> standing = StandingSnapshots(block_size=2)
    >>> standing.add("thaw-" + "a" * 32, [5, 6, 7, 8])
    True
    >>> standing.candidates([5, 6, 9])
    ['thaw-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa']
    >>> standing.candidates([5, 7])
    []
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["StandingSnapshots"]


class StandingSnapshots:
    """Hydrated snapshot ids keyed by their first block's tokens, most recent last."""

    def __init__(self, block_size: int, capacity: int = 64) -> None:
        self.block_size = block_size
        self._capacity = capacity
        self._first_blocks: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._first_blocks)

    def add(self, snapshot_id: str, token_ids: Sequence[int]) -> bool:
        """Serve ``snapshot_id`` (whose tokens start with ``token_ids``); False when it has no
        whole block, so nothing could be served from it."""
        first = tuple(token_ids[: self.block_size])
        if len(first) < self.block_size:
            return False
        self._first_blocks.pop(snapshot_id, None)
        self._first_blocks[snapshot_id] = first
        while len(self._first_blocks) > self._capacity:
            self._first_blocks.popitem(last=False)
        return True

    def candidates(self, prompt: Sequence[int]) -> list[str]:
        """Snapshots whose first block the prompt starts with, the most recently hydrated first
        (the scheduler plans each and keeps the longest match)."""
        if not self._first_blocks or len(prompt) < self.block_size:
            return []
        first = tuple(prompt[: self.block_size])
        return [sid for sid, block in reversed(self._first_blocks.items()) if block == first]

    def discard(self, snapshot_id: str) -> None:
        self._first_blocks.pop(snapshot_id, None)

    def clear(self) -> None:
        self._first_blocks.clear()
