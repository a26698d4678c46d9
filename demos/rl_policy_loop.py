"""RL policy loop: update the rollout engine's weights every step, then fork rollouts from a trunk.

What it shows, for a few steps of a (toy) training loop:
1. "train": the policy's weights move a little (seeded noise, as an optimizer step would) and
   are frozen to a ``.thaw`` weights file (``/dev/shm`` when there is one);
2. the new weights go into the rollout engine, three ways, each in a fresh process:
   ``swap``     ``thaw_agents.swap_weights`` into the running engine (verified restore, vLLM's
                post-load processing, prefix cache dropped, model fingerprint changed);
   ``restart``  a new engine every step, started with ``load_format="thaw"`` from the file;
   ``reload``   vLLM's own ``reload_weights`` with the new tensors (in-process), where it works;
3. the trunk (a shared prompt) is forked once per step and N seeded rollouts start from its
   snapshot; the trunk snapshot of the previous step is refused by the new weights
   (``SnapshotMismatchError`` on ``model_fingerprint``): KV of old weights is never served.

Run (the default model on a CPU, a few minutes; ``--small`` for a smoke test)::

    .venv/bin/python demos/rl_policy_loop.py [--model PATH] [--steps 3] [--small] [--json out.json]

``--small`` (2 steps, 2 rollouts of 16 tokens) runs the swap and restart modes only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _demo  # a sibling module: this file runs as a script

TRUNK = (
    "You are a policy being trained to write short, correct answers.\n"
    + " ".join(f"Example {i}: {i} plus {i * 3} is {i * 4}." for i in range(40))
    + "\nNow a new problem. 17 plus 25 is"
)
MODES = ("swap", "restart", "reload")


def _policy_file(folder: Path, step: int) -> Path:
    return folder / f"policy-step-{step}.thaw"


def train(base: Path, folder: Path, steps: int) -> list[dict[str, Any]]:
    """The toy optimizer: step k's weights are the base plus k seeded nudges; each frozen."""
    import torch

    from thaw_agents.weights import freeze_tensors, read_weights_manifest, restore_tensors

    manifest = read_weights_manifest(base)
    weights = {e.name: torch.empty(e.shape, dtype=getattr(torch, e.dtype)) for e in manifest.tensors}
    restore_tensors(base, weights)
    out = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(step)
        for tensor in weights.values():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor.add_((noise * 2e-3 * tensor.float().std().clamp(min=1e-6)).to(tensor.dtype))
        path = _policy_file(folder, step)
        freeze_tensors(
            path, weights, model_name=f"policy step {step}", model_fingerprint=manifest.model_fingerprint
        )
        out.append({"step": step, "train_freeze_s": time.perf_counter() - started, "file": str(path)})
    return out


def _rollouts(llm: Any, args: argparse.Namespace, step: int) -> dict[str, Any]:
    """Fork the trunk, then N seeded rollouts from its snapshot (the prefix cache dropped first,
    as a separate rollout worker would start)."""
    from vllm import SamplingParams

    import thaw_agents

    started = time.perf_counter()
    handle = thaw_agents.fork(llm, TRUNK)
    fork_s = time.perf_counter() - started
    llm.reset_prefix_cache()
    params = [
        thaw_agents.with_fork(
            SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=1000 * step + i), handle, llm
        )
        for i in range(args.rollouts)
    ]
    prompt = [*handle.token_ids]
    rows, batch_s = _demo.timed_generate(llm, [prompt] * args.rollouts, params)
    return {
        "fork_s": fork_s,
        "rollouts_s": batch_s,
        "snapshot_tokens": handle.num_snapshot_tokens,
        "cached_tokens": [r["cached_tokens"] for r in rows],
        "first_text": rows[0]["text"],
        "handle": handle,
    }


def _stale_refused(llm: Any, handle: Any) -> str | None:
    """The field a snapshot of the previous weights is refused on (None if it were accepted)."""
    from thaw_agents import SnapshotMismatchError

    try:
        handle.for_engine(llm)
    except SnapshotMismatchError as exc:
        return exc.field
    return None


def run_mode(args: argparse.Namespace) -> dict[str, Any]:
    import thaw_agents

    steps = [dict(s) for s in args.trained]
    kwargs = {**_demo.ENGINE_KWARGS, "kv_cache_memory_bytes": args.kv_cache_mib << 20}
    llm = None
    previous = None
    for row in steps:
        path = row["file"]
        started = time.perf_counter()
        if args.phase == "restart" or llm is None:
            if llm is not None:
                llm.llm_engine.engine_core.shutdown()
                del llm
            first = args.phase == "restart"
            extra = {"load_format": "thaw", "model_loader_extra_config": {"snapshot": path}} if first else {}
            llm = thaw_agents.make_llm(args.model, **kwargs, **extra)
            _demo.warm_up(llm)
            row["engine_start_s"] = time.perf_counter() - started
            started = time.perf_counter()
        if args.phase == "swap":
            result = thaw_agents.swap_weights(llm, path)
            row.update(fingerprint=result.fingerprint, restore_s=result.restore_s, process_s=result.process_s)
        elif args.phase == "reload":
            row["reload_error"] = _vllm_reload(llm, path)
        row["weights_in_s"] = time.perf_counter() - started
        row.pop("file")
        if row.get("reload_error"):
            _demo.report(f"reload: vLLM could not reload: {row['reload_error']}")
            steps = [r for r in steps if "weights_in_s" in r]
            break  # the engine may be half-reloaded: no rollouts on it
        _demo.report(f"{args.phase}: step {row['step']}: weights in after {row['weights_in_s']:.2f} s")
        if previous is not None:
            if args.phase == "swap":
                row["stale_refused_on"] = _stale_refused(llm, previous)
            previous.delete()
        rollout = _rollouts(llm, args, row["step"])
        previous = rollout.pop("handle")
        row.update(rollout)
    if previous is not None:
        previous.delete()
    return {"steps": steps}


def _vllm_reload(llm: Any, path: str) -> str | None:
    """vLLM's ``reload_weights`` with the step's tensors, handed over in-process; an error string
    where this vLLM or model cannot do it."""
    import torch

    from thaw_agents.weights import read_weights_manifest, restore_tensors

    try:
        manifest = read_weights_manifest(path)
        tensors = {e.name: torch.empty(e.shape, dtype=getattr(torch, e.dtype)) for e in manifest.tensors}
        restore_tensors(path, tensors)
        llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(tensors.items()), "is_checkpoint_format": True}
        )
        llm.reset_prefix_cache()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]


def print_report(results: dict[str, dict[str, Any]]) -> None:
    ms = _demo.ms
    rows: list[Any] = []
    for mode in results:
        for row in results[mode]["steps"]:
            weights = ms(row["weights_in_s"] + row.get("engine_start_s", 0.0))
            if row.get("reload_error"):
                rows.append([mode, row["step"], ms(row["train_freeze_s"]), "n/a", "-", "-", "-"])
                continue
            rows.append(
                [
                    mode,
                    row["step"],
                    ms(row["train_freeze_s"]),
                    weights,
                    ms(row["fork_s"]),
                    ms(row["rollouts_s"]),
                    f"{min(row['cached_tokens'])}/{row['snapshot_tokens']}",
                ]
            )
        rows.append(None)
    _demo.print_table(
        "Per step: new weights into the rollout engine, trunk fork, rollouts",
        ["mode", "step", "train + freeze", "weights in", "trunk fork", "rollouts", "tokens from snapshot"],
        rows[:-1],
    )
    swap = results["swap"]["steps"]
    later = [r["weights_in_s"] for r in swap[1:]] or [swap[0]["weights_in_s"]]
    restart = [
        r["weights_in_s"] + r["engine_start_s"] for r in results.get("restart", {"steps": []})["steps"]
    ]
    out = _demo.console
    out.print(
        f"\nswap: median {ms(statistics.median(later))} per step (restore {ms(swap[-1]['restore_s'])}, "
        f"vLLM post-processing {ms(swap[-1]['process_s'])}); "
        + (f"restart: median {ms(statistics.median(restart))}." if restart else "")
    )
    refused = [r.get("stale_refused_on") for r in swap[1:]]
    if refused:
        out.print(
            "The previous step's trunk snapshot, after each swap: refused on "
            f"{sorted(set(map(str, refused)))}."
        )
    errors = {r.get("reload_error") for r in results.get("reload", {"steps": []})["steps"]} - {None}
    if errors:
        out.print(f"[dim]vLLM reload_weights: {sorted(errors)[0]}[/dim]")
    _demo.print_replies(
        "First rollout of each swap step", [(f"step {r['step']}", r["first_text"]) for r in swap]
    )
    out.print(f"[dim]{_demo.load_note(results)}[/dim]")


def main() -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face folder or id (default: SmolLM2-135M)")
    parser.add_argument("--small", action="store_true", help="a reduced size for smoke tests")
    parser.add_argument("--steps", type=int, help="training steps (default 3; --small 2)")
    parser.add_argument("--rollouts", type=int, help="rollouts per step (default 8; --small 2)")
    parser.add_argument("--max-tokens", type=int, help="tokens per rollout (default 48; --small 16)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine (default 512)")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all three; --small: swap restart")
    parser.add_argument("--json", help="write the results to this JSON file")
    _demo.add_output_args(parser)
    parser.add_argument("--phase", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    parser.add_argument("--trained-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.small else 3)
    args.rollouts = args.rollouts or (2 if args.small else 8)
    args.max_tokens = args.max_tokens or (16 if args.small else 48)
    args.modes = args.modes or (["swap", "restart"] if args.small else list(MODES))
    if args.phase:
        args.trained = json.loads(Path(args.trained_json).read_text())
        _demo.write_json(args.phase_out, run_mode(args))
        return

    log = _demo.quiet_engine_logs("rl-policy-loop", args.verbose)
    _demo.intro(
        [
            f"[bold]RL policy loop[/bold]: {args.steps} steps of train -> freeze -> new weights into the "
            f"rollout engine -> fork the trunk -> {args.rollouts} rollouts,",
            "ways: " + ", ".join(args.modes) + " (swap_weights into a running engine, a new engine per step, "
            "vLLM's reload_weights).",
        ]
    )
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="thaw-policy-", dir=shm) as tmp:
        folder = Path(tmp)
        with _demo.step("freeze the base policy (the model's weights)"):
            from thaw_agents.models import resolve_model
            from thaw_agents.weights import freeze_model

            model = str(resolve_model(args.model))
            freeze_model(model, folder / "base.thaw")
        with _demo.step(f"train {args.steps} steps (toy: seeded nudges) and freeze each"):
            trained = train(folder / "base.thaw", folder, args.steps)
        (folder / "trained.json").write_text(json.dumps(trained))
        common = [
            f"--model={model}",
            f"--rollouts={args.rollouts}",
            f"--max-tokens={args.max_tokens}",
            f"--kv-cache-mib={args.kv_cache_mib}",
            f"--trained-json={folder / 'trained.json'}",
        ]
        results = {
            mode: _demo.run_phase(
                __file__, [f"--phase={mode}", *common], label=f"{mode}: a fresh process", log=log
            )
            for mode in args.modes
        }
    print_report(results)
    _demo.model_note(args.model)
    if args.json:
        _demo.write_json(args.json, {"args": vars(args), **results})


if __name__ == "__main__":
    main()
