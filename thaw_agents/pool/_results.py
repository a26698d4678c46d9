"""What a round returns: one :class:`BranchResult` per branch, plain frozen values.

Example:
    >>> results = fork_completions(llm, prompts, SamplingParams(max_tokens=64), pool)  # doctest: +SKIP
    >>> r = results[0]                                                                  # doctest: +SKIP
    >>> r.text, r.num_cached_tokens, r.worker, r.reason, r.timings.ttft_s               # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..front import Completion  # a branch's samples are the front's

__all__ = ["BranchResult", "BranchTimings", "Completion", "Placement", "WorkerInfo"]

Placement = Literal["parent", "worker"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BranchTimings:
    """Seconds spent on a branch. The first two are shared by the round's branches.

    Attributes:
        trunk_s: computing the trunk in the parent and writing its snapshot.
        ship_s: making the snapshot reachable by the workers (shared memory copy, upload, put).
        queue_s: from dispatch until the worker started this branch's task.
        hydrate_s: the worker opening the snapshot: every checksum and the KV spec (0 in the parent).
        ttft_s: from the branch's request entering its engine to its first token (for a worker,
            copying the trunk's KV blocks into the cache is part of it).
        generate_s: from the branch's request entering its engine to its last token.
        first_token_s: from the start of the round to this branch's first token.
        total_s: from the start of the round until this branch's result was back.
    """

    trunk_s: float = 0.0
    ship_s: float = 0.0
    queue_s: float = 0.0
    hydrate_s: float = 0.0
    ttft_s: float = 0.0
    generate_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class BranchResult:
    """One branch of a round, in input order.

    Attributes:
        index: the branch's position in the input.
        completions: ``n`` samples (``n`` from the sampling parameters).
        num_prompt_tokens: trunk plus suffix.
        num_cached_tokens: prompt tokens served from the prefix cache or the snapshot
            (smallest over the ``n`` samples).
        worker: ``"parent"`` or the worker's name (``"local-0"``, ``"ray-1"``).
        placement: ``"parent"`` (the parent's engine) or ``"worker"`` (a pool worker).
        reason: why the branch ran there, in words: the round's placement decision (``"auto:
            parent has room (12 free slots >= 4 sequences, 300 free KV blocks >= 40 needed)"``),
            then how the trunk reached the branch's engine.
        transport: how the trunk reached the engine: ``"prefix-cache"``, ``"shm"``,
            ``"store"``, ``"uri"``, ``"ray"``, or ``"none"`` (recomputed).
        attempts: 1, or 2 when the branch was retried after its worker died or hung.
        snapshot_id: the trunk snapshot's id, when one was taken.
        snapshot_nbytes: KV bytes this branch's engine read from the snapshot (0 in the parent).
        timings: where the time went.
    """

    index: int
    completions: tuple[Completion, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    worker: str
    placement: Placement
    reason: str
    transport: str
    attempts: int = 1
    snapshot_id: str | None = None
    snapshot_nbytes: int = 0
    timings: BranchTimings = BranchTimings()

    @property
    def text(self) -> str:
        """The first sample's text."""
        return self.completions[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The first sample's token ids."""
        return self.completions[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        """The first sample's finish reason."""
        return self.completions[0].finish_reason

    def __repr__(self) -> str:
        preview = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return (
            f"BranchResult(index={self.index}, text={preview!r}, n={len(self.completions)}, "
            f"finish_reason={self.finish_reason!r}, num_cached_tokens={self.num_cached_tokens}, "
            f"worker={self.worker!r}, attempts={self.attempts}, ttft_s={self.timings.ttft_s:.3f})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """A pool worker as seen from the parent (``ForkPool.workers``).

    Attributes:
        name: ``"local-0"``, ``"ray-1"``...
        state: ``"booting"``, ``"ready"``, ``"replacing"``, ``"failed"`` or ``"closed"``.
        pid: the worker process's id (on its host), once booted.
        device: the device it was given (``CUDA_VISIBLE_DEVICES``), if any.
        generation: 0 for the first process, +1 each time it was replaced.
        tasks_done: tasks it completed (all generations).
        boot_s: how long its current engine took to start.
    """

    name: str
    state: str
    pid: int | None
    device: str | None
    generation: int
    tasks_done: int
    boot_s: float | None
