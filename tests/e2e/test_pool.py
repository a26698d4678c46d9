"""ForkPool and fork_completions against real vLLM engines (a context-sensitive tiny model).

At most two pool workers run at a time: the local pool's fixture is class-scoped, so it is
gone before the Ray pool starts.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import snapfiles
from helpers.pool_engines import ENGINE_KW, build_context_model, make_side_llm, shutdown, worker_cores
from vllm import SamplingParams, TokensPrompt

import thaw_agents
from thaw_agents import (
    BranchResult,
    ConfigError,
    ForkHandle,
    ForkPool,
    PoolError,
    PoolTimeoutError,
    SnapshotMismatchError,
    fork_completions,
)
from thaw_agents.front import front_for
from thaw_agents.pool._transport import clean_stale, runtime_root

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GREEDY = SamplingParams(max_tokens=16, temperature=0)
SUFFIXES = [" First, the risks:", " Second, the tests:", " Third, the naming:", " Fourth, the docs:"]


def _trunk(topic: str) -> str:
    return f"Context about {topic}. " + " ".join(
        f"{topic} fact {i} is about item {i * 7}." for i in range(60)
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_context_model(tmp_path_factory.mktemp("pool-model") / "ctx-llama")


@pytest.fixture(scope="module")
def parent(model: Path, store: Path):
    # Two workers per pool below: the parent runs with a worker's thread count, so its solo runs
    # sum in the same order as a worker's and greedy tokens compare exactly.
    llm = make_side_llm(model, omp_cores=worker_cores(2))
    yield llm
    shutdown(llm)


def _solo(llm, result: BranchResult, trunk: str, suffix: str, params: SamplingParams) -> list[list[int]]:
    """The parent's own output for one branch, run alone (nothing else in its batch)."""
    ids = llm.get_tokenizer().encode(trunk + suffix)
    assert len(ids) == result.num_prompt_tokens
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    return [list(c.token_ids) for c in out.outputs]


def _room(reason: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(free, needed) slots and KV blocks, as the placement decision in ``reason`` states them."""
    found = re.search(
        r"(\d+) free slots [<>=]+ (\d+) sequences, (\d+) free KV blocks [<>=]+ (\d+) needed", reason
    )
    assert found, reason
    free_slots, sequences, free_blocks, needed = map(int, found.groups())
    return (free_slots, sequences), (free_blocks, needed)


def _arm_hang(hook: Path, seconds: int) -> None:
    """Make the next worker that generates sleep ``seconds`` (see thaw_agents.pool._service)."""
    for claimed in hook.glob("hang.*"):
        claimed.unlink()
    (hook / "hang").write_text(str(seconds))


def _wait_all_ready(pool: ForkPool, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w.state == "ready" for w in pool.workers):
            return
        time.sleep(0.5)
    raise AssertionError(f"workers not ready again: {pool.workers}")


# -- no engines, or engines that must fail ---------------------------------------------------
class TestPoolConfig:
    def test_arguments_are_checked_before_anything_starts(self, model: Path) -> None:
        with pytest.raises(ConfigError, match="backend"):
            ForkPool(model, backend="mpi")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="one worker per device"):
            ForkPool(model, workers=3, devices=[0, 1])
        with pytest.raises(ConfigError, match="Ray places"):
            ForkPool(model, devices=[0], backend="ray")
        with pytest.raises(ConfigError, match="plain JSON"):
            ForkPool(model, workers=1, hf_overrides=object())
        with pytest.raises(ConfigError, match="only reaches workers on this host"):
            ForkPool(model, backend="ray", transport="shm")
        with pytest.raises(ConfigError, match="unknown transport"):
            ForkPool(model, transport="carrier-pigeon")
        assert ForkPool(model, devices=["cuda:0", 1]).size == 2
        with pytest.raises(PoolError, match="not started"):
            ForkPool(model).spec  # noqa: B018

    def test_stale_folders_are_removed_and_live_ones_kept(self) -> None:
        root = runtime_root()
        assert (root.stat().st_mode & 0o777) == 0o700
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        stale = root / f"{pid_max + 1}-deadbeef"
        stale.mkdir()
        (stale / "round-0").mkdir()
        live = root / f"{os.getpid()}-cafef00d"
        live.mkdir()
        try:
            assert stale in clean_stale(root)
            assert not stale.exists() and live.exists()
        finally:
            live.rmdir()

    def test_boot_timeout_kills_the_worker(self, model: Path) -> None:
        pool = ForkPool(model, workers=1, boot_timeout_s=1.0, progress=False, **ENGINE_KW)
        start = time.monotonic()
        with pytest.raises(PoolTimeoutError) as info:
            pool.start()
        assert time.monotonic() - start < 30
        assert info.value.stage == "boot" and info.value.worker == "local-0"
        assert pool.workers[0].state == "closed"

    def test_boot_failure_says_why(self, tmp_path: Path) -> None:
        with pytest.raises(PoolError) as info:
            ForkPool(tmp_path / "no-such-model", workers=1, progress=False, **ENGINE_KW).start()
        assert info.value.stage == "boot" and info.value.worker == "local-0"
        assert "no-such-model" in str(info.value)

    def test_parent_with_another_block_size_is_refused(self, model: Path, parent) -> None:
        with ForkPool(model, workers=1, progress=False, **{**ENGINE_KW, "block_size": 64}) as pool:
            with pytest.raises(SnapshotMismatchError) as info:
                fork_completions(
                    parent, prefix=_trunk("pipes"), suffixes=SUFFIXES[:1], sampling_params=GREEDY, pool=pool
                )
            assert info.value.field == "block_size"
            assert (info.value.expected, info.value.actual) == (64, 32)
            assert "pool's workers" in str(info.value)
            assert pool.workers[0].tasks_done == 0


# -- a local pool of two workers -----------------------------------------------------------
class TestLocalPool:
    @pytest.fixture(scope="class")
    def hook(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tmp_path_factory.mktemp("pool-hook")

    @pytest.fixture(scope="class")
    def pool(self, model: Path, parent, hook: Path):
        with ForkPool(
            model,
            workers=2,
            generate_timeout_s=15,
            hydrate_timeout_s=30,
            boot_timeout_s=240,
            worker_env={"THAW_AGENTS_POOL_TEST_HOOK": str(hook)},
            progress=False,
            **ENGINE_KW,
        ) as pool:
            yield pool
        assert not pool.run_dir().exists()

    @pytest.fixture(scope="class")
    def small_parent(self, model: Path, pool: ForkPool):
        """A parent with 4 batch slots and a KV cache of 16 (float32) or 32 (bfloat16) blocks."""
        llm = make_side_llm(
            model,
            omp_cores=worker_cores(2),
            max_num_seqs=4,
            max_model_len=512,
            kv_cache_memory_bytes=256 << 10,
        )
        yield llm
        shutdown(llm)

    def test_branches_start_from_the_trunk_and_match_solo_runs(
        self, parent, pool: ForkPool, store: Path
    ) -> None:
        trunk = _trunk("parsers")
        results = fork_completions(parent, [trunk + s for s in SUFFIXES[:2]], GREEDY, pool, placement="pool")
        assert [r.index for r in results] == [0, 1]
        assert [r.worker for r in results] == ["local-0", "local-1"]
        block = pool.spec.block_size
        for result, suffix in zip(results, SUFFIXES, strict=False):
            assert result.placement == "worker" and result.transport == "shm" and result.attempts == 1
            assert result.reason.startswith("placement='pool'; pool of 2 local workers: round-robin")
            assert "shm" in result.reason
            assert (
                result.num_cached_tokens >= len(parent.get_tokenizer().encode(trunk)) // block * block - block
            )
            assert result.finish_reason == "length" and len(result.token_ids) == 16
            assert result.timings.hydrate_s > 0 and 0 < result.timings.ttft_s <= result.timings.generate_s
            assert result.timings.first_token_s <= result.timings.total_s
            # One branch per worker: the same batch as a solo run, so the same tokens.
            assert _solo(parent, result, trunk, suffix, GREEDY) == [list(result.token_ids)]
        assert list(pool.run_dir().glob("round-*")) == []  # the shared-memory copy is gone
        assert not (store / f"{results[0].snapshot_id}.thaw").exists()  # and the round's own snapshot

    def test_workers_run_on_cores_of_their_own(self, pool: ForkPool) -> None:
        """Whole processes pinned, not only vLLM's OpenMP threads: two engines that share cores
        spin against each other (decode ran 20-40x slower)."""
        if len(os.sched_getaffinity(0)) < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            pytest.skip("needs two free cores and no user pinning")
        masks = [os.sched_getaffinity(w.pid) for w in pool.workers if w.pid]
        assert len(masks) == 2 and all(masks) and masks[0].isdisjoint(masks[1])

    def test_seeded_samples_with_n_greater_than_one(self, parent, pool: ForkPool) -> None:
        trunk = _trunk("caches")
        sampled = SamplingParams(max_tokens=12, temperature=0.9, seed=7, n=3)
        results = fork_completions(
            parent, prefix=trunk, suffixes=SUFFIXES[:2], sampling_params=sampled, pool=pool, placement="pool"
        )
        for result, suffix in zip(results, SUFFIXES, strict=False):
            assert [c.index for c in result.completions] == [0, 1, 2]
            assert len({c.token_ids for c in result.completions}) == 3
            assert result.text == result.completions[0].text
            assert _solo(parent, result, trunk, suffix, sampled) == [
                list(c.token_ids) for c in result.completions
            ]

    def test_a_given_handle_is_shipped_and_kept(self, parent, pool: ForkPool) -> None:
        handle = thaw_agents.fork(parent, _trunk("queues"))
        results = fork_completions(
            parent, prefix=handle, suffixes=SUFFIXES[:2], sampling_params=GREEDY, pool=pool, placement="pool"
        )
        assert {r.snapshot_id for r in results} == {handle.id}
        assert all(r.num_cached_tokens >= handle.num_snapshot_tokens for r in results)
        assert handle.path.exists()  # the caller's snapshot is not the round's to delete
        handle.delete()

    def test_without_a_pool_branches_run_in_the_parent(self, parent) -> None:
        trunk = _trunk("sockets")
        prompts = [trunk + s for s in SUFFIXES]
        results = fork_completions(parent, prompts, GREEDY)
        assert {r.worker for r in results} == {"parent"} and {r.placement for r in results} == {"parent"}
        assert all("prefix cache" in r.reason and r.transport == "prefix-cache" for r in results)
        trunk_ids = parent.get_tokenizer().encode(trunk)
        assert all(r.num_cached_tokens >= len(trunk_ids) // 32 * 32 for r in results)
        # The same batch through LLM.generate gives the same tokens.
        batch = parent.generate(prompts, GREEDY, use_tqdm=False)
        assert [list(r.token_ids) for r in results] == [list(o.outputs[0].token_ids) for o in batch]

    def test_auto_runs_in_the_parent_when_it_has_room(self, parent, pool: ForkPool) -> None:
        trunk = _trunk("ledgers")
        before = [w.tasks_done for w in pool.workers]
        results = fork_completions(parent, [trunk + s for s in SUFFIXES], GREEDY, pool)
        assert {r.placement for r in results} == {"parent"} and {r.worker for r in results} == {"parent"}
        slots, blocks = _room(results[0].reason)
        assert slots[1] == 4 <= slots[0] and 0 < blocks[1] <= blocks[0]
        assert results[0].reason.endswith("the parent's prefix cache holds the trunk (no copy)")
        trunk_ids = parent.get_tokenizer().encode(trunk)
        assert all(r.num_cached_tokens >= len(trunk_ids) // 32 * 32 for r in results)
        assert [w.tasks_done for w in pool.workers] == before  # no worker was asked

    def test_auto_sends_a_round_the_parent_has_no_room_for_to_the_pool(
        self, pool: ForkPool, small_parent
    ) -> None:
        """A parent of 4 batch slots and a small KV cache: 5 branches need more slots than it
        has; 3 long ones more KV blocks. Both rounds go to the workers, and say why."""
        cap = front_for(small_parent).capacity()
        assert cap.max_num_seqs == 4
        trunk = small_parent.get_tokenizer().encode(_trunk("quotas"))[:160]
        five = [*SUFFIXES, " Fifth, the logs:"]
        results = fork_completions(
            small_parent, prefix=trunk, suffixes=five, sampling_params=GREEDY, pool=pool
        )
        assert {r.placement for r in results} == {"worker"}
        assert {r.worker for r in results} == {"local-0", "local-1"}
        assert results[0].reason.startswith(f"auto: parent full ({cap.free_slots} free slots < 5 sequences, ")
        assert "2 of 2 local workers ready" in results[0].reason and "round-robin" in results[0].reason

        max_tokens = cap.max_model_len - len(trunk) - 16
        long = SamplingParams(max_tokens=max_tokens, temperature=0)
        needed = 5 + 3 * (-(-(len(trunk) + 16 + max_tokens) // 32) - 5)  # the trunk's 5 blocks once
        assert needed > cap.free_blocks, "the small parent's KV cache is too big for this test"
        results = fork_completions(
            small_parent, prefix=trunk, suffixes=SUFFIXES[:3], sampling_params=long, pool=pool
        )
        assert {r.placement for r in results} == {"worker"}
        slots, blocks = _room(results[0].reason)
        assert slots[0] >= slots[1] == 3 and blocks[0] == cap.free_blocks < blocks[1]
        assert all(r.finish_reason in ("length", "stop") for r in results)

    def test_placement_values_are_checked(self, parent, pool: ForkPool) -> None:
        prompts = [_trunk("flags") + s for s in SUFFIXES[:2]]
        with pytest.raises(ConfigError, match="placement must be 'auto', 'parent' or 'pool'"):
            fork_completions(parent, prompts, GREEDY, pool, placement="gpu")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="needs a pool"):
            fork_completions(parent, prompts, GREEDY, placement="pool")
        forced = fork_completions(parent, prompts, GREEDY, pool, placement="parent")
        assert {r.placement for r in forced} == {"parent"}
        assert forced[0].reason.startswith("placement='parent'; ")

    def test_a_mismatched_snapshot_is_refused_before_any_branch_runs(
        self, parent, pool: ForkPool, tmp_path: Path
    ) -> None:
        handle = thaw_agents.fork(parent, _trunk("dtypes"))

        other = snapfiles.other_dtype(handle.spec.dtype)

        def to_other(header: dict) -> None:
            header["kv"]["kv_spec"]["dtype"] = other

        bad = ForkHandle.load(snapfiles.rewrite_header(handle.path, tmp_path / "other.thaw", to_other))
        before = [w.tasks_done for w in pool.workers]
        with pytest.raises(SnapshotMismatchError) as info:
            fork_completions(
                parent, prefix=bad, suffixes=SUFFIXES[:2], sampling_params=GREEDY, pool=pool, placement="pool"
            )
        assert info.value.field == "dtype" and info.value.actual == other
        assert [w.tasks_done for w in pool.workers] == before

    def test_concurrent_rounds_match_their_solo_runs(self, parent, pool: ForkPool) -> None:
        rounds = {topic: [_trunk(topic) + s for s in SUFFIXES] for topic in ("graphs", "tensors")}
        alone = {
            t: [r.token_ids for r in fork_completions(parent, p, GREEDY, pool, placement="pool")]
            for t, p in rounds.items()
        }
        together: dict[str, list] = {}

        def run(topic: str) -> None:
            together[topic] = [
                r.token_ids for r in fork_completions(parent, rounds[topic], GREEDY, pool, placement="pool")
            ]

        threads = [threading.Thread(target=run, args=(t,)) for t in rounds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert together == alone

        async def both() -> list:
            return await asyncio.gather(
                *(
                    thaw_agents.afork_completions(parent, p, GREEDY, pool, placement="pool")
                    for p in rounds.values()
                )
            )

        gathered = asyncio.run(both())
        assert [[r.token_ids for r in rs] for rs in gathered] == list(alone.values())

    def test_an_engine_error_names_the_branch_and_worker(self, parent, pool: ForkPool) -> None:
        trunk = _trunk("limits")
        too_long = list(range(1000, 3200))  # past max_model_len=2048
        with pytest.raises(PoolError) as info:
            fork_completions(
                parent,
                prefix=trunk,
                suffixes=[SUFFIXES[0], too_long],
                sampling_params=GREEDY,
                pool=pool,
                placement="pool",
            )
        error = info.value
        assert error.branch == 1 and error.worker == "local-1" and error.stage == "generate"
        assert error.remote_type and "branch 1, worker local-1" in str(error)
        assert len(error.failures) == 1
        assert isinstance(error.results[0], BranchResult) and error.results[1] is None
        assert all(w.state == "ready" for w in pool.workers)  # an engine error is not a dead worker

    def test_a_trunk_shorter_than_a_block_is_not_shipped(self, parent, pool: ForkPool) -> None:
        results = fork_completions(
            parent, ["Hi there, how are you", "Hi! Tell me a story"], GREEDY, pool, placement="pool"
        )
        assert {r.transport for r in results} == {"none"} and {r.snapshot_id for r in results} == {None}
        assert all("recomputed" in r.reason and len(r.token_ids) == 16 for r in results)

    def test_a_round_timeout_is_a_typed_error(self, parent, pool: ForkPool, hook: Path) -> None:
        _arm_hang(hook, 4)  # shorter than the pool's own timeouts: only timeout_s can fire
        start = time.monotonic()
        with pytest.raises(PoolTimeoutError) as info:
            fork_completions(
                parent,
                prefix=_trunk("deadlines"),
                suffixes=SUFFIXES[:2],
                sampling_params=GREEDY,
                pool=pool,
                placement="pool",
                timeout_s=1.5,
            )
        assert time.monotonic() - start < 4
        assert info.value.stage == "round" and info.value.branch in (0, 1)
        time.sleep(4)  # the sleeping worker wakes up and finishes its task; the pool stays whole
        assert all(w.state == "ready" for w in pool.workers)

    def test_a_hung_worker_is_replaced_and_its_branch_retried(
        self, parent, pool: ForkPool, hook: Path
    ) -> None:
        trunk = _trunk("clocks")
        _arm_hang(hook, 600)
        start = time.monotonic()
        results = fork_completions(
            parent, prefix=trunk, suffixes=SUFFIXES[:2], sampling_params=GREEDY, pool=pool, placement="pool"
        )
        assert time.monotonic() - start < 15 + 10 + 60  # the timeout, the grace, the retry
        hung = next(r for r in results if r.attempts == 2)
        assert "took longer than 25 s" in hung.reason and "moved to" in hung.reason
        assert all(r.finish_reason == "length" for r in results)
        _wait_all_ready(pool)
        assert sorted(w.generation for w in pool.workers) == [0, 1]
        for result, suffix in zip(results, SUFFIXES, strict=False):
            if result.attempts == 1:
                assert _solo(parent, result, trunk, suffix, GREEDY) == [list(result.token_ids)]

    def test_a_worker_killed_mid_round_is_replaced_and_its_branch_retried(
        self, parent, pool: ForkPool, hook: Path
    ) -> None:
        _arm_hang(hook, 600)
        box: dict = {}
        trunk = _trunk("signals")
        runner = threading.Thread(
            target=lambda: box.update(
                results=fork_completions(
                    parent,
                    prefix=trunk,
                    suffixes=SUFFIXES[:2],
                    sampling_params=GREEDY,
                    pool=pool,
                    placement="pool",
                )
            )
        )
        runner.start()
        deadline = time.monotonic() + 60
        while not (claimed := list(hook.glob("hang.*"))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert claimed, "no worker reached the hook"
        victim = int(claimed[0].suffix[1:])
        shm_copies = list(pool.run_dir().glob("round-*/*.thaw"))
        assert shm_copies and all((p.stat().st_mode & 0o777) == 0o600 for p in shm_copies)
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=120)
        results = box["results"]
        retried = [r for r in results if r.attempts == 2]
        assert len(retried) == 1 and "killed by signal 9" in retried[0].reason
        assert _solo(parent, retried[0], trunk, SUFFIXES[retried[0].index], GREEDY) == [
            list(retried[0].token_ids)
        ]
        _wait_all_ready(pool)
        assert victim not in {w.pid for w in pool.workers}


# -- Ray -----------------------------------------------------------------------------------------
class TestRayPool:
    @pytest.fixture(scope="class")
    def ray_pool(self, model: Path, parent):
        pytest.importorskip("ray", reason="ray is not installed (pip install 'thaw-agents[ray]')")
        with ForkPool(
            model, workers=2, backend="ray", progress=False, boot_timeout_s=240, **ENGINE_KW
        ) as pool:
            yield pool

    def test_actors_hydrate_from_the_object_store(self, parent, ray_pool: ForkPool) -> None:
        trunk = _trunk("actors")
        results = fork_completions(
            parent,
            prefix=trunk,
            suffixes=SUFFIXES[:2],
            sampling_params=GREEDY,
            pool=ray_pool,
            placement="pool",
        )
        assert [r.worker for r in results] == ["ray-0", "ray-1"]
        assert {r.transport for r in results} == {"ray"}
        for result, suffix in zip(results, SUFFIXES, strict=False):
            assert result.num_cached_tokens >= 32 and result.timings.hydrate_s > 0
            assert _solo(parent, result, trunk, suffix, GREEDY) == [list(result.token_ids)]
