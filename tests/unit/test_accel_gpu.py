"""CUDA data path: the CPU round trips again on a GPU, bit-exact, every host route and layout.

Skipped without a CUDA device or CuPy. Run on the H100 before resolving issue 4:
``python -m pytest -q -m gpu tests/unit/test_accel_gpu.py``.
"""

from __future__ import annotations

import os
import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("cupy")

from thaw_agents.accel import (  # noqa: E402
    AtomicFile,
    BlockLayout,
    HostRegistration,
    StagingBuffer,
    _cuda,
    aligned_empty,
    copy_segments,
    gather_blocks,
    read_into,
    scatter_blocks,
    staging_nbytes,
)

pytestmark = pytest.mark.gpu
DEV = "cuda:0"


def _cache(num_blocks: int, shape=(3, 32, 128), layers: int = 4, dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    if dtype == torch.uint8:
        return [
            torch.randint(0, 255, (num_blocks, *shape), dtype=dtype, device=DEV, generator=gen)
            for _ in range(layers)
        ]
    return [torch.randn((num_blocks, *shape), device=DEV, generator=gen).to(dtype) for _ in range(layers)]


def _host(shape, route: str) -> torch.Tensor:
    if route == "pinned":
        return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
    if route == "pageable":
        return torch.empty(shape, dtype=torch.uint8)
    return torch.empty(shape, dtype=torch.uint8, device=DEV)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
@pytest.mark.parametrize("where", ["device", "pinned", "pageable"])
@pytest.mark.parametrize("route", ["staged", "staged-slots", "direct"])
def test_round_trip_random_ids(dtype: torch.dtype, where: str, route: str, monkeypatch) -> None:
    # Several pipeline chunks: growing ones in one scratch, or two rotating slots.
    monkeypatch.setattr(_cuda, "_FIRST_NBYTES", 64 << 10)
    monkeypatch.setattr(_cuda, "_CHUNK_NBYTES", 256 << 10)
    if route == "staged-slots":
        monkeypatch.setattr(_cuda, "_WHOLE_NBYTES", 0)
    src = _cache(64, dtype=dtype)
    dst = [torch.zeros_like(t) for t in src]
    ids = random.Random(1).sample(range(64), 17)
    targets = random.Random(2).sample(range(64), 17)
    row = staging_nbytes(src, 1)
    out = _host((17, row), where).fill_(0xAB)  # poisoned: every byte must be written
    if route == "direct":
        _cuda.gather_cuda(src, ids, out, BlockLayout(), route="direct")
    else:
        assert gather_blocks(src, ids, out=out) is out
    torch.cuda.synchronize()
    ref = torch.cat([_u8(t[ids]).reshape(17, -1).cpu() for t in src], dim=1)
    assert torch.equal(out.cpu(), ref)
    if route == "direct":
        _cuda.scatter_cuda(out, dst, targets, BlockLayout(), route="direct")
    else:
        scatter_blocks(out, dst, targets)
    torch.cuda.synchronize()
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(_u8(s[ids]), _u8(d[targets]))
    untouched = sorted(set(range(64)) - set(targets))
    assert all(int(_u8(d[untouched]).sum()) == 0 for d in dst)


@pytest.mark.parametrize("where", ["device", "pinned"])
def test_flash_attention_layout(where: str) -> None:
    # [2, num_blocks, block, heads, dim]: each layer block is two separate runs (K and V).
    src = [torch.randn(2, 10, 16, 2, 8, device=DEV, dtype=torch.float16) for _ in range(3)]
    dst = [torch.zeros_like(t) for t in src]
    layout = BlockLayout(block_dim=1)
    out = _host((3, staging_nbytes(src, 1, layout)), where)
    gather_blocks(src, [9, 0, 4], out=out, layout=layout)
    scatter_blocks(out, dst, [1, 2, 3], layout=layout)
    torch.cuda.synchronize()
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(s[:, [9, 0, 4]], d[:, [1, 2, 3]])
    cpu = [t.cpu() for t in src]
    assert torch.equal(out.cpu(), gather_blocks(cpu, [9, 0, 4], layout=layout))


def test_odd_sizes_and_unaligned_bases() -> None:
    # 15-byte blocks and layers that start 1 byte into their storage: the byte-wise path.
    base = [torch.randint(0, 255, (1 + 9 * 15,), dtype=torch.uint8, device=DEV) for _ in range(3)]
    src = [b[1:].view(9, 3, 5) for b in base]
    dst = [torch.zeros(9, 3, 5, dtype=torch.uint8, device=DEV) for _ in range(3)]
    staged = gather_blocks(src, [8, 0, 3])
    scatter_blocks(staged, dst, [0, 1, 2])
    torch.cuda.synchronize()
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(s[[8, 0, 3]], d[[0, 1, 2]])


def test_mixed_layer_shapes_match_cpu() -> None:
    src = [torch.randn(12, 2, 8, device=DEV), torch.randn(12, 5, device=DEV, dtype=torch.float16)]
    ids = [11, 3, 7]
    assert torch.equal(gather_blocks(src, ids).cpu(), gather_blocks([t.cpu() for t in src], ids))


def test_empty_repeated_and_out_of_range() -> None:
    src = _cache(8)
    assert gather_blocks(src, []).shape[0] == 0
    scatter_blocks(gather_blocks(src, []), src, [])
    with pytest.raises(ValueError, match="repeated"):
        gather_blocks(src, [1, 1])
    with pytest.raises(IndexError):
        gather_blocks(src, [8])


def test_runs_on_the_current_stream() -> None:
    src = _cache(32)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        staged = gather_blocks(src, [5, 6, 7])
        dst = [torch.zeros_like(t) for t in src]
        scatter_blocks(staged, dst, [0, 1, 2])
    stream.synchronize()
    assert all(torch.equal(s[[5, 6, 7]], d[:3]) for s, d in zip(src, dst, strict=True))


def test_llama_shaped_65_blocks_through_staging_buffer() -> None:
    # 32 layers x [2, blocks, 16, 8, 128] fp16: 2 MiB per block, 136 MB for 65 blocks.
    src = [torch.randn(2, 128, 16, 8, 128, device=DEV, dtype=torch.float16) for _ in range(32)]
    layout = BlockLayout(block_dim=1)
    ids = random.Random(3).sample(range(128), 65)
    staging = StagingBuffer()
    assert staging.pinned
    out = staging.rows(65, staging_nbytes(src, 1, layout))
    gather_blocks(src, ids, out=out, layout=layout)
    dst = [torch.zeros_like(t) for t in src]
    scatter_blocks(out, dst, ids, layout=layout)
    torch.cuda.synchronize()
    assert all(torch.equal(s[:, ids], d[:, ids]) for s, d in zip(src, dst, strict=True))


def test_copy_segments_device_and_pinned() -> None:
    srcs = [torch.randn(n, device=DEV) for n in (1, 17, 1 << 20, 3 << 18)]
    srcs.append(torch.randn(1000).pin_memory())
    dsts = [torch.empty(s.numel(), device=DEV) for s in srcs]
    copy_segments(list(zip(srcs, dsts, strict=True)))
    torch.cuda.synchronize()
    assert all(torch.equal(s.to(DEV), d) for s, d in zip(srcs, dsts, strict=True))


def test_host_registration_and_aligned_pinned() -> None:
    import mmap

    region = mmap.mmap(-1, 1 << 20)
    host = torch.frombuffer(region, dtype=torch.uint8)
    host.copy_(torch.randint(0, 255, (1 << 20,), dtype=torch.uint8))
    with HostRegistration(host):
        assert _cuda.is_pinned(host)
        dev = torch.empty(1 << 20, dtype=torch.uint8, device=DEV)
        copy_segments([(host, dev)])
        torch.cuda.synchronize()
        assert torch.equal(dev.cpu(), host)
    pinned = aligned_empty(12345, pin_memory=True)
    assert pinned.data_ptr() % 4096 == 0 and _cuda.is_pinned(pinned)


def test_write_segments_from_gpu_and_read_back(tmp_path) -> None:
    import blake3

    from thaw_agents.accel import write_segments

    tensors = [torch.randn(n, device=DEV) for n in (3, 1 << 20, 5 << 18)]
    path = tmp_path / "g.bin"
    with AtomicFile(path) as f:
        digests = write_segments(f, 4096, tensors, hasher=blake3.blake3, chunk_nbytes=1 << 20)
        f.pwrite(bytes(4096), 0)
        f.commit()
    assert os.stat(path).st_mode & 0o777 == 0o600
    flat = torch.cat([t.cpu().view(torch.uint8) for t in tensors])
    assert digests == [blake3.blake3(t.cpu().numpy().tobytes()).hexdigest() for t in tensors]
    back = aligned_empty(flat.numel() + 4096)
    read_into(path, 4096, flat.numel(), back)
    assert torch.equal(back[: flat.numel()], flat)


@pytest.mark.parametrize("source", ["direct", "buffered", "mmap"])
@pytest.mark.parametrize("landing", [True, False])
def test_weights_round_trip_on_gpu(tmp_path, source: str, landing: bool, monkeypatch) -> None:
    pytest.importorskip("blake3")
    from thaw_agents.weights import _restore, freeze_module, restore_module

    if not landing:
        monkeypatch.setattr(_restore, "_LANDING_MARGIN_NBYTES", 1 << 50)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 3)).to(DEV, torch.bfloat16)
    folder = "/dev/shm" if source == "mmap" and os.path.isdir("/dev/shm") else tmp_path
    path = os.path.join(folder, f"w-{os.getpid()}-{source}.thaw")
    try:
        freeze_module(model, path, model_name="t", model_fingerprint="sha256:t")
        fresh = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 3)).to(
            DEV, torch.bfloat16
        )
        stats = restore_module(fresh, path, source=source, expect_fingerprint="sha256:t")
        assert ("landing" in stats.route) == landing
        for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
            assert torch.equal(a, b)
        # Corrupt one byte of the last tensor: typed error, parameters unchanged.
        with open(path, "r+b") as handle:
            handle.seek(-3, os.SEEK_END)
            byte = handle.read(1)
            handle.seek(-3, os.SEEK_END)
            handle.write(bytes([byte[0] ^ 0xFF]))
        for p in fresh.parameters():
            p.data.add_(1)
        before = [p.detach().clone() for p in fresh.parameters()]
        from thaw_agents import SnapshotChecksumError

        with pytest.raises(SnapshotChecksumError):
            restore_module(fresh, path, source=source)
        assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters(), strict=True))
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_host_weights_restore_on_gpu(tmp_path) -> None:
    pytest.importorskip("blake3")
    from thaw_agents.weights import HostWeights, freeze_tensors

    tensors = {f"t{i}": torch.randn(1000 + i, device=DEV) for i in range(5)}
    freeze_tensors(tmp_path / "h.thaw", tensors, model_name="m", model_fingerprint="f")
    cached = HostWeights.load(tmp_path / "h.thaw")
    assert _cuda.is_pinned(cached.host)
    targets = {k: torch.empty_like(v) for k, v in tensors.items()}
    cached.restore(targets)
    assert all(torch.equal(tensors[k], targets[k]) for k in tensors)


def test_blake3_on_the_gpu_matches_the_package() -> None:
    blake3 = pytest.importorskip("blake3")
    from thaw_agents.accel import blake3_digests, launch_blake3_digests

    gen = torch.Generator(device=DEV).manual_seed(3)
    data = torch.randint(0, 256, ((64 << 20) + 8192,), dtype=torch.uint8, device=DEV, generator=gen)
    regions = [
        (0, 0),
        (0, 1),
        (5, 63),
        (16, 64),
        (16, 65),
        (32, 1023),
        (64, 1024),
        (1, 1025),
        (0, 3072),
        (7, 5000),
        (0, 256 * 1024),
        (0, 257 * 1024),
        (3, 300_000),
        (4096, (64 << 20) + 1024 + 5),  # three levels
        (0, data.numel()),
    ]
    host = data.cpu().numpy()
    expected = [blake3.blake3(host[o : o + n].tobytes()).hexdigest() for o, n in regions]
    assert blake3_digests(data, regions) == expected
    # Queued on a side stream behind a write to the same bytes: the digest sees the write.
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        data[:1024].fill_(7)
        pending = launch_blake3_digests(data, [(0, 1024)])
    assert pending.result() == [blake3.blake3(bytes([7]) * 1024).hexdigest()]
    with pytest.raises(ValueError, match="outside"):
        blake3_digests(data, [(data.numel(), 1)])


def test_verified_landing_restore_hashes_on_the_gpu(tmp_path, monkeypatch) -> None:
    """Many regions over several hashing launches; a flipped byte in the middle is caught."""
    pytest.importorskip("blake3")
    from thaw_agents import SnapshotChecksumError
    from thaw_agents.weights import _restore, _verify, freeze_tensors, restore_tensors

    monkeypatch.setattr(_verify, "_GPU_BATCH_NBYTES", 1 << 20)
    monkeypatch.setattr(_restore, "_CHUNK_NBYTES", 1 << 20)
    tensors = {f"t{i}": torch.randn(37_000 + 513 * i, device=DEV) for i in range(40)}
    path = tmp_path / "many.thaw"
    freeze_tensors(path, tensors, model_name="m", model_fingerprint="f")
    targets = {k: torch.zeros_like(v) for k, v in tensors.items()}
    stats = restore_tensors(path, targets, source="buffered")
    # The page-cache route reads through a ring of pinned chunks into the landing buffer.
    assert stats.route == "buffered+ring+landing+gpu-verified"
    assert all(torch.equal(tensors[k], targets[k]) for k in tensors)
    from thaw_agents.weights import read_weights_manifest

    entry = read_weights_manifest(path).tensors[17]
    with open(path, "r+b") as handle:
        handle.seek(read_weights_manifest(path).container.payload_offset + entry.offset + 5)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 1]))
    for t in targets.values():
        t.zero_()
    with pytest.raises(SnapshotChecksumError, match=entry.name):
        restore_tensors(path, targets, source="buffered")
    assert all(not t.any() for t in targets.values())
