"""accel's file I/O and host staging on the CPU: atomic files, O_DIRECT with fallback, round trips."""

from __future__ import annotations

import os
import sys

import blake3
import pytest
import torch

from thaw_agents.accel import (
    AtomicFile,
    CupyMissingError,
    StagingBuffer,
    aligned_empty,
    copy_segments,
    probe_o_direct,
    read_into,
    write_segments,
)


def _tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(1, generator=gen),  # 4 bytes: unaligned everything after it
        torch.randint(0, 255, (4095,), dtype=torch.uint8, generator=gen),
        torch.randn(3, 1000, generator=gen).to(torch.bfloat16),
        torch.empty(0),
        torch.randn(300_001, generator=gen),
    ]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("chunk_nbytes", [4096, 1 << 16, 64 << 20])
def test_write_then_read_round_trip(tmp_path, direct: bool, chunk_nbytes: int) -> None:
    tensors = _tensors()
    path = tmp_path / "seg.bin"
    with AtomicFile(path, direct=direct) as file:
        digests = write_segments(file, 8192, tensors, hasher=blake3.blake3, chunk_nbytes=chunk_nbytes)
        file.pwrite(b"h" * 8192, 0)
        file.commit()
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
    assert os.path.getsize(path) == 8192 + flat.numel()
    assert digests == [
        blake3.blake3(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest() for t in tensors
    ]
    seen: list[tuple[int, int]] = []
    back = aligned_empty(flat.numel() + 4096)
    read_into(
        path,
        8192,
        flat.numel(),
        back,
        direct=direct,
        chunk_nbytes=chunk_nbytes,
        on_chunk=lambda a, b: seen.append((a, b)),
    )
    assert torch.equal(back[: flat.numel()], flat)
    assert sorted(seen)[0][0] == 0 and max(b for _, b in seen) == flat.numel()


def test_unaligned_destination_falls_back_to_buffered(tmp_path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(bytes(range(256)) * 64)
    dest = torch.empty(16385, dtype=torch.uint8)[1:]  # not page-aligned
    read_into(path, 4096, 16384 - 4096, dest, direct=True)
    assert dest[:4].tolist() == [0, 1, 2, 3]


def test_short_file_raises_eof(tmp_path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(EOFError):
        read_into(path, 0, 9000, aligned_empty(12288))


def test_atomic_file_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), AtomicFile(target) as file:
        file.pwrite(b"new bytes", 0)
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_file_is_owner_only(tmp_path) -> None:
    with AtomicFile(tmp_path / "m.bin") as file:
        file.pwrite(b"x", 0)
        file.commit()
    assert os.stat(tmp_path / "m.bin").st_mode & 0o777 == 0o600


def test_probe_is_cached_and_boolean(tmp_path) -> None:
    assert probe_o_direct(tmp_path) in (True, False)
    assert probe_o_direct(tmp_path) == probe_o_direct(str(tmp_path))


def test_aligned_and_staging_buffers() -> None:
    buf = aligned_empty(10_000)
    assert buf.data_ptr() % 4096 == 0 and buf.numel() == 10_000
    staging = StagingBuffer(pin_memory=False)
    first = staging.rows(3, 5000)
    assert first.data_ptr() % 4096 == 0 and tuple(first.shape) == (3, 5000)
    assert staging.flat(100).data_ptr() == first.data_ptr()  # reused, not reallocated


def test_copy_segments_cpu() -> None:
    pairs = [(torch.arange(10), torch.zeros(10, dtype=torch.int64)), (torch.ones(3, 3), torch.empty(9))]
    copy_segments(pairs)
    assert pairs[0][1].tolist() == list(range(10)) and pairs[1][1].sum() == 9
    with pytest.raises(ValueError, match="bytes"):
        copy_segments([(torch.zeros(2), torch.zeros(3))])


def test_missing_cupy_names_the_install_command(monkeypatch) -> None:
    from thaw_agents.accel import _kernels

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(CupyMissingError) as info:
        _kernels.require_cupy()
    assert isinstance(info.value, ImportError)
    assert "pip install 'thaw-agents[cuda1" in str(info.value)
