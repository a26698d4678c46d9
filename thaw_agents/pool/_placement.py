"""Where a round's branches run: the parent engine or the pool's workers (``placement=``).

``"parent"`` and ``"pool"`` are taken as given. ``"auto"`` (the default) runs the round in the
parent when the parent has room for all of it, else in the pool:

1. No pool: the parent.
2. The parent has room: free batch slots (``max_num_seqs`` less its unfinished sequences) for
   every branch's ``n`` sequences, and free KV blocks (its cache less what its unfinished
   requests can come to hold) for the trunk's full blocks once plus, per sequence, its prompt
   and ``max_tokens`` beyond them. Then the parent: its prefix cache holds the trunk after one
   pass, nothing is snapshotted or copied, and one batch decodes every branch.
3. Else, a ready worker: the pool. The parent would queue what does not fit behind its own
   requests; the workers start at once from the trunk's snapshot.
4. Else (every worker booting or lost): the parent, which queues what does not fit.

Workers on devices of their own add compute, but a round that fits the parent is still cheapest
there: a batch of branches decodes in about the time of one, and the pool pays for the trunk's
snapshot and its hand-off. On a CPU host the workers also share the parent's cores (each pinned
to its share), so the parent with room wins by more. Pass ``placement="pool"`` when the parent
must keep its batch for other requests. A round is not split between the two.

Example:
    >>> decision = decide(front, plan.trunk, plan.prompts, params, pool, "auto")  # doctest: +SKIP
    >>> decision.target, decision.reason                                          # doctest: +SKIP
    ('parent', 'auto: parent has room (256 free slots >= 4 sequences, 32767 free KV blocks >= 40 needed)')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .._errors import ConfigError, PoolError, SnapshotMismatchError
from .._kvspec import KVSpec
from .._manifest import check_compatible
from ..front import Capacity, Front
from ..front._capacity import blocks_for
from ._pool import ForkPool

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = [
    "PLACEMENTS",
    "Decision",
    "PlacementChoice",
    "blocks_needed",
    "check_placement",
    "check_spec",
    "decide",
]

PlacementChoice = Literal["auto", "parent", "pool"]
PLACEMENTS: tuple[str, ...] = ("auto", "parent", "pool")


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a round runs, and why in words (the start of every branch's ``reason``)."""

    target: Literal["parent", "pool"]
    reason: str


def decide(
    front: Front,
    trunk: Sequence[int],
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    pool: ForkPool | None,
    placement: str,
) -> Decision:
    """Where the round runs (see the module docstring for the rule).

    Raises:
        ConfigError: ``placement`` is not ``"auto"``, ``"parent"`` or ``"pool"``, or is
            ``"pool"`` without a pool.
        SnapshotMismatchError: under ``"auto"``, the parent differs from the pool's workers.
        PoolError: the pool is not started, or closed.
    """
    check_placement(placement, pool)
    if pool is None:
        return Decision("parent", "no pool: the parent engine")
    if placement == "parent":
        return Decision("parent", "placement='parent'")
    if pool.closed:
        raise PoolError("the pool is closed")
    if placement == "pool":
        return Decision("pool", "placement='pool'")
    # A pool that cannot take this parent's branches is an error now, not when the parent fills up.
    check_spec(front.kv_spec(), pool.spec, "the parent engine")
    caching, _ = front.prefix_caching()
    try:
        cap = front.capacity()
    except ConfigError as exc:  # not knowing whether the parent has room: the pool, if it can
        if pool.ready_slots():
            return Decision("pool", f"auto: {exc}: pool")
        return Decision("parent", f"auto: {exc}, and no worker is ready: parent")
    sequences = sum(max(1, p.n) for p in params)
    needed = blocks_needed(trunk, prompts, params, cap, caching=caching)
    fits_slots, fits_blocks = cap.free_slots >= sequences, cap.free_blocks >= needed
    slots = f"{cap.free_slots} free slots {'>=' if fits_slots else '<'} {sequences} sequences"
    blocks = f"{cap.free_blocks} free KV blocks {'>=' if fits_blocks else '<'} {needed} needed"
    if fits_slots and fits_blocks:
        return Decision("parent", f"auto: parent has room ({slots}, {blocks})")
    ready = pool.ready_slots()
    if not ready:
        return Decision(
            "parent", f"auto: parent full ({slots}, {blocks}), but no worker is ready: parent, which queues"
        )
    return Decision("pool", f"auto: parent full ({slots}, {blocks}): pool ({_workers(pool, len(ready))})")


def check_placement(placement: str, pool: ForkPool | None) -> None:
    """ConfigError unless ``placement`` is one of :data:`PLACEMENTS` and a pool backs ``"pool"``."""
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement must be 'auto', 'parent' or 'pool', not {placement!r}")
    if placement == "pool" and pool is None:
        raise ConfigError("placement='pool' needs a pool: pass pool=ForkPool(...)")


def blocks_needed(
    trunk: Sequence[int],
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    cap: Capacity,
    *,
    caching: bool = True,
) -> int:
    """KV blocks a round can come to hold in one engine: the trunk's full blocks once (shared
    through the prefix cache, when it is on), and per sequence its prompt plus ``max_tokens``
    beyond them."""
    shared = len(trunk) // cap.block_size if caching else 0
    needed = shared
    for prompt, p in zip(prompts, params, strict=True):
        most = len(prompt) + p.max_tokens if p.max_tokens is not None else cap.max_model_len
        needed += max(1, p.n) * (blocks_for(min(most, cap.max_model_len), cap.block_size) - shared)
    return needed


def check_spec(parent: KVSpec, workers: KVSpec, what: str) -> None:
    """SnapshotMismatchError (saying what to do) when ``what`` cannot feed the pool's workers."""
    try:
        check_compatible(parent, workers)
    except SnapshotMismatchError as exc:
        raise SnapshotMismatchError(
            exc.field,
            exc.expected,
            exc.actual,
            hint=f"{what} differs from the pool's workers; start the pool with the parent's model and "
            "engine overrides (dtype, block_size)",
        ) from None


def _workers(pool: ForkPool, ready: int) -> str:
    """What the workers bring, in words."""
    from .._engine import is_cpu_platform

    devices = [w.device for w in pool.workers if w.device]
    if pool.backend == "ray":
        where = "as Ray actors"
    elif devices:
        where = f"on devices {', '.join(devices)}"
    elif is_cpu_platform():
        where = "sharing this host's CPU cores"
    else:
        where = "sharing the parent's device"
    return f"{ready} of {pool.size} {pool.backend} workers ready, {where}"
