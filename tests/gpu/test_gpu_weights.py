"""Weights restore on a GPU from shared memory: the bounded pinned ring, checked on the GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _module():
    gen = torch.Generator().manual_seed(0)
    layers = [torch.nn.Linear(1024, 3072 + 16 * i, bias=True) for i in range(12)]
    module = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module.to(torch.bfloat16).cuda()


def test_restore_from_shm_ring_route(tmp_path, monkeypatch):
    from thaw_agents.weights import _restore as weights_restore
    from thaw_agents.weights import freeze_module, restore_module

    monkeypatch.setattr(weights_restore, "_CHUNK_NBYTES", 1 << 20)  # many chunks, ring reused
    monkeypatch.setattr(weights_restore, "_RING_SLOTS", 3)
    weights_restore.release_staging()
    src = _module()
    path = f"/dev/shm/thaw-test-{tmp_path.name}.thaw"
    try:
        freeze_module(src, path, model_name="m", model_fingerprint="f")
        dst = _module()
        with torch.no_grad():
            for p in dst.parameters():
                p.zero_()
        stats = restore_module(dst, path, expect_fingerprint="f")
        assert "ring" in stats.route and "gpu-verified" in stats.route, stats.route
        for a, b in zip(src.parameters(), dst.parameters(), strict=True):
            assert torch.equal(a, b)
        # A flipped byte in the payload: refused, nothing written.
        with open(path, "r+b") as f:
            f.seek(-5000, 2)
            byte = f.read(1)
            f.seek(-5000, 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        with torch.no_grad():
            for p in dst.parameters():
                p.fill_(7)
        from thaw_agents import SnapshotChecksumError

        with pytest.raises(SnapshotChecksumError):
            restore_module(dst, path, expect_fingerprint="f")
        assert all(bool((p == 7).all()) for p in dst.parameters())
    finally:
        import os

        os.unlink(path) if os.path.exists(path) else None
        weights_restore.release_staging()
