"""accel on one GPU: KV block gather/scatter and weights freeze/restore, each beside its limit.

Measured in the same run, on the same buffers:

* KV: a Llama-3-8B-shaped paged cache (32 layers of ``[2, 2048 blocks, 16, 8, 128]`` fp16,
  FlashAttention layout), 65 random blocks (136 MB): gather and scatter GPU <-> pinned host
  and GPU <-> GPU, against a plain pinned ``cudaMemcpyAsync`` of the same byte count.
* Weights: ~8 GiB in 291 Llama-shaped bf16 tensors: freeze to a file, restore from a cold
  file (page cache dropped), from the page cache, from ``/dev/shm`` and from pinned memory,
  against ``dd`` with O_DIRECT, the pinned host-to-device bandwidth, the host's own copy and
  BLAKE3 rates, BLAKE3 on the GPU, and the published ``thaw-native`` extension (if
  importable) on the same tensors. Each restore row names the route its stats report.

Run: ``python benchmarks/accel_gpu.py [--out-dir DIR] [--weights-gib 8] [--dir /var/tmp]``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import machine, machine_tag, print_table, write_results

DEV = "cuda:0"


def _events_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _wall_s(
    fn: Callable[[], Any], reps: int, warmup: int = 1, before: Callable[[], Any] | None = None
) -> float:
    for _ in range(warmup):
        if before:
            before()
        fn()
    times = []
    for _ in range(reps):
        if before:
            before()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


_routes: list[str] = []


def _routed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` (a restore) remembering the route its stats name, for the row."""

    def call() -> Any:
        stats = fn()
        _routes.append(stats.route)
        return stats

    return call


def _row(case: str, nbytes: int, seconds: float, limit_name: str, limit_gbps: float | None) -> dict[str, Any]:
    gbps = nbytes / seconds / 1e9
    route = _routes[-1] if _routes else None
    _routes.clear()
    return {
        "case": case,
        "route": route,
        "nbytes": nbytes,
        "ms": seconds * 1e3,
        "gbps": gbps,
        "limit": limit_name,
        "limit_gbps": limit_gbps,
        "pct_of_limit": 100 * gbps / limit_gbps if limit_gbps else None,
    }


# -- KV ----------------------------------------------------------------------------------------


def bench_kv(reps: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from thaw_agents.accel import BlockLayout, gather_blocks, scatter_blocks, staging_nbytes
    from thaw_agents.accel import _cuda as cuda_path

    layers = [torch.randn(2, 2048, 16, 8, 128, device=DEV, dtype=torch.float16) for _ in range(32)]
    layout = BlockLayout(block_dim=1)
    ids = random.Random(0).sample(range(2048), 65)
    targets = random.Random(1).sample(range(2048), 65)
    row = staging_nbytes(layers, 1, layout)
    nbytes = 65 * row
    pinned = torch.empty((65, row), dtype=torch.uint8, pin_memory=True)
    device_buf = torch.empty((65, row), dtype=torch.uint8, device=DEV)
    flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    flat_pin = pinned.view(-1)
    limits = {
        "d2h_pinned_gbps": nbytes
        / _events_ms(lambda: flat_pin.copy_(flat_dev, non_blocking=True), reps)
        / 1e6,
        "h2d_pinned_gbps": nbytes
        / _events_ms(lambda: flat_dev.copy_(flat_pin, non_blocking=True), reps)
        / 1e6,
        "d2d_gbps": 2 * nbytes / _events_ms(lambda: device_buf.view(-1).copy_(flat_dev), reps) / 1e6,
        # The same copies as synchronous calls timed on the host clock, like the cases below.
        "d2h_pinned_wall_gbps": nbytes / _wall_s(lambda: flat_pin.copy_(flat_dev), reps, warmup=3) / 1e9,
        "h2d_pinned_wall_gbps": nbytes / _wall_s(lambda: flat_dev.copy_(flat_pin), reps, warmup=3) / 1e9,
    }
    # Correctness first: bit-exact against PyTorch indexing.
    gather_blocks(layers, ids, out=pinned, layout=layout)
    ref = torch.cat(
        [layer[:, ids].permute(1, 0, 2, 3, 4).reshape(65, -1).view(torch.uint8) for layer in layers], 1
    )
    assert torch.equal(pinned.to(DEV), ref), "gather to pinned is not bit-exact"
    scatter_blocks(pinned, layers, targets, layout=layout)
    gather_blocks(layers, targets, out=device_buf, layout=layout)
    assert torch.equal(device_buf, ref), "scatter is not bit-exact"
    rows = []
    cases = [
        (
            "KV gather GPU->pinned (staged)",
            lambda: gather_blocks(layers, ids, out=pinned, layout=layout),
            "d2h",
        ),
        (
            "KV gather GPU->pinned (direct)",
            lambda: cuda_path.gather_cuda(layers, ids, pinned, layout, route="direct"),
            "d2h",
        ),
        (
            "KV scatter pinned->GPU (staged)",
            lambda: scatter_blocks(pinned, layers, targets, layout=layout),
            "h2d",
        ),
        (
            "KV scatter pinned->GPU (direct)",
            lambda: cuda_path.scatter_cuda(pinned, layers, targets, layout, route="direct"),
            "h2d",
        ),
        ("KV gather GPU->GPU", lambda: gather_blocks(layers, ids, out=device_buf, layout=layout), "d2d"),
        ("KV scatter GPU->GPU", lambda: scatter_blocks(device_buf, layers, targets, layout=layout), "d2d"),
    ]
    for name, fn, kind in cases:
        seconds = _wall_s(fn, reps, warmup=3)
        if kind == "d2d":
            rows.append(_row(name, nbytes, seconds, "device copy (read+write)/2", limits["d2d_gbps"] / 2))
        else:
            limit = limits["d2h_pinned_gbps" if kind == "d2h" else "h2d_pinned_gbps"]
            rows.append(_row(name, nbytes, seconds, f"pinned memcpy {kind.upper()}", limit))
    layers.clear()
    torch.cuda.empty_cache()
    return rows, limits


# -- weights -------------------------------------------------------------------------------------


def llama_like(target_gib: float) -> list[tuple[str, tuple[int, ...]]]:
    """291 Llama-shaped tensors (32 layers) whose MLP width is chosen to total ``target_gib``."""
    hidden, kv, vocab, layers = 4096, 1024, 32000, 32
    fixed = 2 * vocab * hidden + hidden + layers * (2 * hidden * hidden + 2 * kv * hidden + 2 * hidden)
    inter = int((target_gib * 2**30 / 2 - fixed) / (layers * 3 * hidden)) // 128 * 128
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def drop_page_cache(*paths: str) -> str:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return "drop_caches"
    except OSError:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def dd_gbps(directory: str, gib: int) -> dict[str, float]:
    path = os.path.join(directory, "dd-probe.bin")
    out: dict[str, float] = {}
    try:
        for label, args in (
            (
                "write",
                ["if=/dev/zero", f"of={path}", "bs=64M", f"count={gib * 16}", "oflag=direct", "conv=fsync"],
            ),
            ("read", [f"if={path}", "of=/dev/null", "bs=64M", "iflag=direct"]),
        ):
            res = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
            match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", res.stderr)
            if match:
                out[label] = int(match.group(1)) / float(match.group(2)) / 1e9
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return out


def _native() -> Any:
    try:
        import thaw  # the published thaw-native wheel

        return thaw
    except ImportError:
        return None


def bench_weights(directory: str, gib: float, reps: int, limits: dict[str, float]) -> list[dict[str, Any]]:
    from thaw_agents.weights import HostWeights, freeze_tensors, restore_tensors

    shapes = llama_like(gib)
    gen = torch.Generator(device=DEV).manual_seed(0)
    weights = {n: torch.randn(s, device=DEV, generator=gen, dtype=torch.bfloat16) for n, s in shapes}
    targets = {n: torch.empty_like(t) for n, t in weights.items()}
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    print(f"weights: {len(weights)} tensors, {nbytes / 2**30:.2f} GiB", flush=True)
    # The disk probe writes and reads as many bytes as the freeze: a short probe can ride a
    # write-back cache the 8 GiB freeze outruns.
    disk = dd_gbps(directory, max(1, round(nbytes / 2**30)))
    print(f"dd O_DIRECT: {disk}", flush=True)
    path = os.path.join(directory, "weights.thaw")
    rows: list[dict[str, Any]] = []

    def check() -> None:
        assert all(torch.equal(weights[n], targets[n]) for n in weights), "restore is not bit-exact"
        for t in targets.values():
            t.zero_()

    kw = {"model_name": "llama-like", "model_fingerprint": "sha256:bench"}
    from thaw_agents.accel import _direct

    # Both ways of growing the file, interleaved so that drift in the disk hits both alike.
    freeze_times: dict[bool, list[float]] = {False: [], True: []}
    default = _direct.WRITE_TUNING["preallocate"]
    freeze_tensors(path, weights, **kw)  # warm-up
    for _ in range(max(2, reps)):
        for preallocate in (False, True):
            _direct.WRITE_TUNING["preallocate"] = preallocate
            start = time.perf_counter()
            freeze_tensors(path, weights, **kw)
            freeze_times[preallocate].append(time.perf_counter() - start)
    _direct.WRITE_TUNING["preallocate"] = default
    for preallocate in (default, not default):
        label = "fallocate first" if preallocate else "no fallocate"
        rows.append(
            _row(
                f"weights freeze -> file (O_DIRECT, {label}{', default' if preallocate == default else ''})",
                nbytes,
                statistics.median(freeze_times[preallocate]),
                "dd O_DIRECT write",
                disk.get("write"),
            )
        )
    how = drop_page_cache(path)
    cold = _wall_s(
        _routed(lambda: restore_tensors(path, targets, source="direct")),
        max(1, reps - 1),
        warmup=1,
        before=lambda: drop_page_cache(path),
    )
    check()
    rows.append(
        _row(f"weights restore cold file ({how})", nbytes, cold, "dd O_DIRECT read", disk.get("read"))
    )
    with open(path, "rb") as handle:  # warm the page cache
        while handle.read(64 << 20):
            pass
    warm = _wall_s(_routed(lambda: restore_tensors(path, targets, source="buffered")), reps, warmup=1)
    check()
    rows.append(
        _row("weights restore page cache", nbytes, warm, "pinned memcpy H2D", limits["h2d_pinned_gbps"])
    )
    # With the GPU verifying, every host core is free to copy: how many readers pay off?
    from thaw_agents.weights import _restore as weights_restore

    default_readers = weights_restore._NUM_READERS
    for readers in (8, 16):
        weights_restore._NUM_READERS = readers
        t = _wall_s(_routed(lambda: restore_tensors(path, targets, source="buffered")), reps, warmup=1)
        check()
        rows.append(
            _row(
                f"weights restore page cache ({readers} readers; default {default_readers})",
                nbytes,
                t,
                "pinned memcpy H2D",
                limits["h2d_pinned_gbps"],
            )
        )
    weights_restore._NUM_READERS = default_readers
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize > nbytes * 1.2:
        shm_path = os.path.join(shm, "weights.thaw")
        freeze_tensors(shm_path, weights, **kw)
        t = _wall_s(_routed(lambda: restore_tensors(shm_path, targets)), reps, warmup=1)
        check()
        rows.append(
            _row("weights restore /dev/shm (copy)", nbytes, t, "pinned memcpy H2D", limits["h2d_pinned_gbps"])
        )
        per_call = _routed(lambda: restore_tensors(shm_path, targets, source="mmap"))
        t = _wall_s(per_call, max(1, reps - 1), warmup=0)
        check()
        rows.append(
            _row(
                "weights restore /dev/shm (register per call)",
                nbytes,
                t,
                "pinned memcpy H2D",
                limits["h2d_pinned_gbps"],
            )
        )
        start = time.perf_counter()
        mapped = HostWeights.map(shm_path)
        limits["shm_register_s"] = time.perf_counter() - start
        t = _wall_s(_routed(lambda: mapped.restore(targets)), reps, warmup=1)
        check()
        rows.append(
            _row(
                "weights restore /dev/shm (registered once)",
                nbytes,
                t,
                "pinned memcpy H2D",
                limits["h2d_pinned_gbps"],
            )
        )
        mapped.close()
        trusted = HostWeights.map(shm_path, verify=False)
        t = _wall_s(_routed(lambda: trusted.restore(targets)), reps, warmup=1)
        check()
        rows.append(
            _row(
                "weights restore /dev/shm (registered, unverified)",
                nbytes,
                t,
                "pinned memcpy H2D",
                limits["h2d_pinned_gbps"],
            )
        )
        trusted.close()
        os.unlink(shm_path)
    cached = HostWeights.load(path)
    t = _wall_s(_routed(lambda: cached.restore(targets)), reps, warmup=1)
    check()
    rows.append(
        _row("weights restore pinned memory", nbytes, t, "pinned memcpy H2D", limits["h2d_pinned_gbps"])
    )
    rows += bench_host_limits(path, cached, nbytes, reps, limits)
    cached = None
    rows += bench_native(directory, weights, targets, nbytes, reps, check)
    os.unlink(path)
    return rows


def bench_host_limits(path: str, cached: Any, nbytes: int, reps: int, limits: dict[str, float]) -> list:
    """What the host alone can do: copy the file out of the page cache, and hash it."""
    from thaw_agents.accel import read_into
    from thaw_agents.weights._restore import _CHUNK_NBYTES, _NUM_READERS
    from thaw_agents.weights._restore import chunk_feed as _chunks
    from thaw_agents.weights._verify import Verifier as _Verifier

    manifest = cached.manifest
    host = cached.host
    offset = manifest.container.payload_offset
    t = _wall_s(
        lambda: read_into(
            path, offset, nbytes, host, direct=False, chunk_nbytes=_CHUNK_NBYTES, num_readers=_NUM_READERS
        ),
        reps,
        warmup=1,
    )
    limits["page_cache_copy_gbps"] = nbytes / t / 1e9

    def verify() -> None:
        verifier = _Verifier([(e, host) for e in manifest.tensors], host, nbytes, _CHUNK_NBYTES, True)
        _chunks(nbytes)(lambda a, b: verifier.arrived(a))
        verifier.check(path)

    t = _wall_s(verify, reps, warmup=1)
    limits["blake3_verify_gbps"] = nbytes / t / 1e9

    # The same digests on the GPU, over a device copy of the payload (what a landing buffer holds).
    from thaw_agents.accel import blake3_digests

    device_copy = host[:nbytes].to(DEV)
    regions = [(e.offset, e.nbytes) for e in manifest.tensors]
    assert blake3_digests(device_copy, regions) == [e.checksum for e in manifest.tensors], (
        "GPU BLAKE3 differs from the file's checksums"
    )
    t = _wall_s(lambda: blake3_digests(device_copy, regions), reps, warmup=1)
    limits["blake3_gpu_gbps"] = nbytes / t / 1e9
    return [
        _row(
            "host: page cache -> pinned copy only",
            nbytes,
            nbytes / limits["page_cache_copy_gbps"] / 1e9,
            "-",
            None,
        ),
        _row("host: BLAKE3 verify only", nbytes, nbytes / limits["blake3_verify_gbps"] / 1e9, "-", None),
        _row("GPU: BLAKE3 verify only", nbytes, nbytes / limits["blake3_gpu_gbps"] / 1e9, "-", None),
    ]


def bench_native(directory, weights, targets, nbytes, reps, check) -> list[dict[str, Any]]:
    thaw = _native()
    if thaw is None:
        print("thaw-native is not importable: its rows are skipped", flush=True)
        return []
    path = os.path.join(directory, "native.thaw")
    requests = [
        ("weights", i, t.data_ptr(), t.numel() * t.element_size()) for i, t in enumerate(weights.values())
    ]
    mapping = [
        ("weights", i, t.data_ptr(), t.numel() * t.element_size()) for i, t in enumerate(targets.values())
    ]
    rows = []
    try:
        t = _wall_s(lambda: thaw.freeze_to_file_pipelined(path, requests), max(1, reps - 1), warmup=1)
        rows.append(_row("thaw-native freeze_to_file_pipelined", nbytes, t, "same, thaw-agents", None))
        t = _wall_s(
            lambda: thaw.restore_from_file_pipelined(path, mapping),
            max(1, reps - 1),
            warmup=1,
            before=lambda: drop_page_cache(path),
        )
        check()
        rows.append(
            _row("thaw-native restore_from_file_pipelined cold", nbytes, t, "same, thaw-agents", None)
        )
        t = _wall_s(lambda: thaw.restore_from_file_pipelined(path, mapping, direct_io=False), reps, warmup=1)
        check()
        rows.append(
            _row("thaw-native restore_from_file_pipelined warm", nbytes, t, "same, thaw-agents", None)
        )
        import mmap

        fd = os.open(path, os.O_RDONLY)
        buf = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        os.close(fd)
        t = _wall_s(lambda: thaw.restore_from_bytes_pipelined(buf, mapping), reps, warmup=1)
        check()
        rows.append(
            _row("thaw-native restore_from_bytes_pipelined (mmap)", nbytes, t, "same, thaw-agents", None)
        )
        buf.close()
    except Exception as exc:  # a foreign extension: report, do not abort the run
        print(f"thaw-native failed: {type(exc).__name__}: {exc}", flush=True)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return rows


def bench_freeze_sweep(directory: str, gib: float, reps: int) -> list[dict[str, Any]]:
    """Freeze with several writer settings and ``dd``, interleaved: which setting tracks the disk?"""
    from thaw_agents.accel import _direct
    from thaw_agents.weights import freeze_tensors

    gen = torch.Generator(device=DEV).manual_seed(0)
    weights = {n: torch.randn(s, device=DEV, generator=gen, dtype=torch.bfloat16) for n, s in llama_like(gib)}
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    path = os.path.join(directory, "sweep.thaw")
    default = dict(_direct.WRITE_TUNING)
    configs = [(32 << 20, 4), (64 << 20, 1), (64 << 20, 2), (16 << 20, 8)]
    times: dict[Any, list[float]] = {c: [] for c in [*configs, "dd"]}
    kw = {"model_name": "llama-like", "model_fingerprint": "sha256:bench"}
    freeze_tensors(path, weights, **kw)  # warm-up
    for _ in range(reps):
        for config in configs:
            chunk, writers = config
            _direct.WRITE_TUNING.update(chunk_nbytes=chunk, num_writers=writers, num_buffers=writers + 2)
            start = time.perf_counter()
            freeze_tensors(path, weights, **kw)
            times[config].append(time.perf_counter() - start)
        times["dd"].append(nbytes / dd_gbps(directory, max(1, round(nbytes / 2**30)))["write"] / 1e9)
    _direct.WRITE_TUNING.clear()
    _direct.WRITE_TUNING.update(default)
    os.unlink(path)
    dd = nbytes / statistics.median(times["dd"]) / 1e9
    rows = [_row("dd O_DIRECT write, 64 MiB blocks", nbytes, statistics.median(times["dd"]), "-", None)]
    for chunk, writers in configs:
        rows.append(
            _row(
                f"weights freeze, {chunk >> 20} MiB chunks x {writers} writers",
                nbytes,
                statistics.median(times[(chunk, writers)]),
                "dd O_DIRECT write (interleaved)",
                dd,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default: results/)")
    parser.add_argument("--weights-gib", type=float, default=8.0)
    parser.add_argument("--dir", default="/var/tmp", help="a folder on the disk under test")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-weights", action="store_true")
    parser.add_argument(
        "--freeze-sweep", action="store_true", help="only: freeze writer settings against dd, interleaved"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("accel_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.freeze_sweep:
        rows, limits = bench_freeze_sweep(args.dir, args.weights_gib, args.reps), {}
    else:
        kv_rows, limits = bench_kv(max(args.reps, 20))
        rows = list(kv_rows)
    if not args.skip_weights and not args.freeze_sweep:
        rows += bench_weights(args.dir, args.weights_gib, args.reps, limits)
    table = [
        (
            r["case"],
            f"{r['ms']:.2f}",
            f"{r['gbps']:.1f}",
            r["limit"],
            f"{r['limit_gbps']:.1f}" if r["limit_gbps"] else "-",
            f"{r['pct_of_limit']:.0f}%" if r["pct_of_limit"] else "-",
            r.get("route") or "",
        )
        for r in rows
    ]
    print()
    print_table(["case", "ms", "GB/s", "limit (same run)", "limit GB/s", "of limit", "route"], table)
    info = machine()
    payload = {
        "machine": info,
        "limits": limits,
        "results": rows,
        "params": vars(args) | {"out_dir": None, "out": None},
    }
    out = args.out
    stem = "accel_gpu_freeze_sweep" if args.freeze_sweep else "accel_gpu"
    if out is None and args.out_dir:
        out = args.out_dir / f"{stem}-{machine_tag(info)}-{time.strftime('%Y-%m-%d')}.json"
    print("wrote", write_results(stem, payload, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
