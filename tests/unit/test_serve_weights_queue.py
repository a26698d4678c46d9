"""The serve weights queue: who runs when (arrival order, no starvation, one swap per run of
requests). The swap itself is replaced by a recorder here; tests/e2e/test_serve_weights.py runs
the real one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from thaw_agents import ConfigError, SnapshotMismatchError
from thaw_agents.serve.weights import WeightsService, parse_weights_args
from thaw_agents.weights import freeze_tensors


def _file(folder: Path, name: str, shape: tuple[int, ...] = (4,)) -> str:
    path = folder / f"{name}.thaw"
    freeze_tensors(path, {"w": torch.ones(shape)}, model_name=name, model_fingerprint="f")
    return str(path)


def _service(tmp_path: Path, log: list[str]) -> WeightsService:
    names = {"a": _file(tmp_path, "a"), "b": _file(tmp_path, "b")}
    service = WeightsService(None, names, [str(tmp_path)], served_name="base")

    async def swap(name: str) -> None:
        await asyncio.sleep(0.01)
        log.append(f"swap {name}")
        service.loaded = name

    service._swap = swap  # type: ignore[method-assign]
    return service


def test_arrival_order_without_starvation(tmp_path: Path) -> None:
    log: list[str] = []

    async def main() -> None:
        service = _service(tmp_path, log)
        await service.start()

        async def request(name: str, hold_s: float) -> None:
            async with service.use(name):
                log.append(f"run {name}")
                await asyncio.sleep(hold_s)

        first = asyncio.create_task(request("a", 0.05))  # a is loaded: runs at once
        await asyncio.sleep(0.01)
        b = asyncio.create_task(request("b", 0.01))  # waits for the a in flight
        await asyncio.sleep(0.01)
        late_a = asyncio.create_task(request("a", 0.01))  # a is loaded, but b came first
        await asyncio.gather(first, b, late_a)

    asyncio.run(main())
    assert log == ["swap a", "run a", "swap b", "run b", "swap a", "run a"]


def test_waiting_requests_for_the_same_weights_run_together(tmp_path: Path) -> None:
    log: list[str] = []

    async def main() -> None:
        service = _service(tmp_path, log)
        await service.start()
        running: list[int] = []
        peak = [0]

        async def request(name: str) -> None:
            async with service.use(name):
                running.append(1)
                peak[0] = max(peak[0], len(running))
                await asyncio.sleep(0.02)
                running.pop()

        await asyncio.gather(*(request("b") for _ in range(3)))
        assert peak[0] == 3

    asyncio.run(main())
    assert log == ["swap a", "swap b"]


def test_registration_checks(tmp_path: Path) -> None:
    service = _service(tmp_path, [])
    other = tmp_path / "sub"
    other.mkdir()
    assert service.register("c", _file(other, "c"))["id"] == "c"
    with pytest.raises(ConfigError):
        service.register("c", _file(other, "c2"))  # the name is taken
    with pytest.raises(ConfigError):
        service.register("d", "/etc/passwd")  # outside the folders
    with pytest.raises(SnapshotMismatchError):
        service.register("e", _file(other, "e", (5,)))  # other shapes
    with pytest.raises(ConfigError):
        parse_weights_args(["no-equals-sign"])
