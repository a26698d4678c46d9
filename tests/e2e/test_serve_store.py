"""The server's bounded store: least recently used snapshots go first, never one in use.

Real snapshot files from the session's engine; eviction itself needs no engine.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import thaw_agents
from thaw_agents.serve.service import SnapshotService

pytestmark = pytest.mark.e2e


@pytest.fixture
def service(llm, tmp_path: Path) -> tuple[SnapshotService, list[str]]:
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    ids = []
    now = time.time()
    for age, topic in enumerate(("apples", "boats", "clocks")):
        handle = thaw_agents.fork(llm, f"A note about {topic}. " * 20)
        dest = store / handle.path.name
        shutil.copyfile(handle.path, dest)
        os.utime(dest, (now, now - 1000 * (3 - age)))  # apples written longest ago
        ids.append(handle.id)
    size = (store / f"{ids[0]}.thaw").stat().st_size
    spec = thaw_agents.fork(llm, "A note about apples. " * 20).spec
    svc = SnapshotService(
        None, {"spec": spec.to_json(), "store": str(store)}, max_nbytes=2 * size + size // 2
    )
    return svc, ids


def test_the_least_recently_used_snapshot_is_evicted(service) -> None:
    svc, ids = service
    assert [info.id for info in svc.list()] == ids[::-1]  # most recently used first
    assert svc.enforce_budget() == [ids[0]]
    assert not (svc.store / f"{ids[0]}.thaw").exists()
    assert [e["id"] for e in svc.evicted] == [ids[0]]
    assert svc.enforce_budget() == []


def test_a_snapshot_in_use_is_never_evicted(service) -> None:
    svc, ids = service
    svc.acquire([ids[0]])  # a running request uses the oldest one
    try:
        assert svc.enforce_budget() == [ids[1]]
        assert (svc.store / f"{ids[0]}.thaw").exists()
    finally:
        svc.release([ids[0]])
    assert not svc.in_use(ids[0])


def test_use_refreshes_the_order(service) -> None:
    svc, ids = service
    svc.acquire([ids[0]])
    svc.release([ids[0]])  # used just now: the newest
    assert svc.enforce_budget() == [ids[1]]
