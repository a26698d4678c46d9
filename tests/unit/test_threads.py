"""The shared pool that checks snapshot blocks on every core of the process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from thaw_agents._threads import in_parts, process_cpus

ROOT = Path(__file__).resolve().parents[2]


def test_parts_cover_the_items_in_order() -> None:
    items = list(range(103))
    parts = in_parts(list, items, min_part=4)
    assert [x for part in parts for x in part] == items
    assert len(parts) == min(len(process_cpus()), 8, 103 // 4)


def test_few_items_run_in_the_callers_thread() -> None:
    caller = threading.get_ident()
    (ran_in,) = in_parts(lambda part: threading.get_ident(), [1, 2, 3], min_part=4)
    assert ran_in == caller


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_helpers_of_a_pinned_thread_use_every_core() -> None:
    """vLLM pins the engine's thread to one core; the pool it starts still spans the process's
    cores (a fresh interpreter, so the pool is made after the pin)."""
    code = (
        "import os, threading\n"
        "from thaw_agents._threads import in_parts\n"
        "every = os.sched_getaffinity(0)\n"
        "os.sched_setaffinity(0, {min(every)})\n"
        "masks = in_parts(lambda part: os.sched_getaffinity(0), list(range(64)), min_part=1)\n"
        "assert len(masks) == min(len(every), 8), masks\n"
        "assert all(m == every for m in masks), (masks, every)\n"
        "assert os.sched_getaffinity(0) == {min(every)}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_one_core_each_pins_every_helper_to_its_own_core() -> None:
    """In vLLM's CPU worker the connector asks for one core per helper (as vLLM pins its
    OpenMP threads): each part runs on a core of its own, together the process's cores; a
    pool made before the call is replaced (a fresh interpreter, so no other test's pool)."""
    code = (
        "import os, threading\n"
        "from thaw_agents._threads import in_parts, pin_one_core_each\n"
        "every = os.sched_getaffinity(0)\n"
        "spread = in_parts(lambda part: os.sched_getaffinity(0), list(range(64)), min_part=1)\n"
        "assert all(m == every for m in spread), spread\n"
        "pin_one_core_each()\n"
        "barrier = threading.Barrier(min(len(every), 8))\n"
        "def part(items):\n"
        "    barrier.wait(timeout=30)  # every part on its own thread at once\n"
        "    return os.sched_getaffinity(0)\n"
        "masks = in_parts(part, list(range(64)), min_part=1)\n"
        "assert len(masks) == min(len(every), 8), masks\n"
        "assert all(len(m) == 1 for m in masks), masks\n"
        "assert set().union(*masks) == set(sorted(every)[:8]), (masks, every)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
