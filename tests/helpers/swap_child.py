"""The engine side of tests/e2e/test_swap.py, run in its own process (an in-process vLLM engine
owns process-wide state; the test session may hold one already).

Usage: python swap_child.py models FOLDER  (the two models, their weights files and greedy
output: FOLDER/models.json), then python swap_child.py swap FOLDER (-> one JSON object on the
last line of stdout).

Two tiny Llamas of the same shapes and other weights (seeds 0 and 1), float32 so greedy
output is exact; every output is one request at a time, on both sides of a comparison.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

PROMPTS = [
    [1, 500, 600, 700, 800, 900, 1000, 1100],
    [1, 42, 4242, 77, 3000, 12, 9000, 31000, 15, 16],
]
SETTINGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 512,
    "block_size": 32,
    "seed": 0,
    "kv_cache_memory_bytes": 64 << 20,
}


def greedy(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=12, temperature=0.0)
    return [
        list(llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0].outputs[0].token_ids)
        for p in PROMPTS
    ]


def shutdown(llm: Any) -> None:
    import contextlib
    import gc

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def error_of(call: Any) -> dict[str, Any] | None:
    try:
        call()
    except Exception as exc:
        return {"type": type(exc).__name__, "field": getattr(exc, "field", None), "message": str(exc)}
    return None


def models(folder: Path) -> None:
    """Two tiny Llamas (seeds 0 and 1), each frozen by a fresh engine that then gives the
    reference greedy output: ``models.json`` beside them."""
    import thaw_agents
    from helpers.tiny_model import build_tiny_model

    out: dict[str, Any] = {}
    for label, seed in (("a", 0), ("b", 1)):
        model = build_tiny_model(folder / f"tiny-{label}", seed=seed)
        path = folder / f"{label}.thaw"
        llm = thaw_agents.make_llm(
            str(model), load_format="thaw", model_loader_extra_config={"freeze_to": str(path)}, **SETTINGS
        )
        out[label] = {"model": str(model), "file": str(path), "greedy": greedy(llm)}
        shutdown(llm)
    (folder / "models.json").write_text(json.dumps(out))


def swap(folder: Path) -> None:
    import os

    import torch

    import thaw_agents
    from thaw_agents.weights import HostWeights, freeze_tensors, read_weights_manifest

    made = json.loads((folder / "models.json").read_text())
    file_a, file_b = Path(made["a"]["file"]), Path(made["b"]["file"])
    out: dict[str, Any] = {"fresh_a": made["a"]["greedy"], "fresh_b": made["b"]["greedy"]}
    llm = thaw_agents.make_llm(made["a"]["model"], **SETTINGS)
    out["start"] = greedy(llm)
    prompt = list(range(100, 200))  # 3 full blocks
    before = thaw_agents.fork(llm, prompt)
    before_path = before.save(folder / "before.thaw")
    out["fingerprint_start"] = thaw_agents.front.front_for(llm).kv_spec().model_fingerprint
    # Bad files first, while A is served: each is a typed error and A stays.
    corrupt = folder / "corrupt.thaw"
    shutil.copy(file_b, corrupt)
    with open(corrupt, "r+b") as handle:
        handle.seek(os.path.getsize(corrupt) - 100)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    truncated = folder / "truncated.thaw"
    shutil.copy(file_b, truncated)
    os.truncate(truncated, os.path.getsize(truncated) - 4096)
    foreign = folder / "foreign.thaw"
    manifest = read_weights_manifest(file_b)
    tensors = {e.name: torch.zeros(e.shape, dtype=torch.float32) for e in manifest.tensors}
    name = next(n for n in tensors if n.endswith("down_proj.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] * 2)
    freeze_tensors(foreign, tensors, model_name="other", model_fingerprint=manifest.model_fingerprint)
    out["bad"] = {}
    for label, path in (
        ("corrupt", corrupt),
        ("truncated", truncated),
        ("foreign", foreign),
        ("missing", folder / "no.thaw"),
    ):
        out["bad"][label] = error_of(lambda p=path: thaw_agents.swap_weights(llm, p))
    out["after_bad"] = greedy(llm)
    out["fingerprint_after_bad"] = thaw_agents.front.front_for(llm).kv_spec().model_fingerprint

    result = thaw_agents.swap_weights(llm, file_b)
    out["swap_b"] = {
        "fingerprint": result.fingerprint,
        "restore_s": result.restore_s,
        "total_s": result.total_s,
    }
    out["swapped_b"] = greedy(llm)
    out["fingerprint_b"] = thaw_agents.front.front_for(llm).kv_spec().model_fingerprint

    # A KV snapshot of the old weights: refused by with_fork, hydrate and raw params alike.
    from vllm import SamplingParams, TokensPrompt

    stale = thaw_agents.ForkHandle.load(before_path)
    out["stale_with_fork"] = error_of(lambda: thaw_agents.with_fork(SamplingParams(max_tokens=2), stale, llm))
    out["stale_hydrate"] = error_of(lambda: stale.hydrate(llm))
    raw = llm.generate(
        [TokensPrompt(prompt_token_ids=[*prompt, 5])],
        SamplingParams(max_tokens=2, extra_args={"kv_transfer_params": stale.kv_transfer_params()}),
        use_tqdm=False,
    )[0]
    out["stale_raw"] = {
        "num_cached_tokens": raw.num_cached_tokens,
        "report": (raw.kv_transfer_params or {}).get("thaw"),
    }
    # A snapshot of the new weights is served (the scheduler knows the new fingerprint).
    after = thaw_agents.fork(llm, prompt)
    llm.reset_prefix_cache()
    assert after.hydrate(llm) == after.num_snapshot_tokens
    served = llm.generate(
        [TokensPrompt(prompt_token_ids=[*prompt, 5])], SamplingParams(max_tokens=1), use_tqdm=False
    )[0]
    out["fresh_snapshot_served"] = served.num_cached_tokens  # loaded by this request

    result = thaw_agents.swap_weights(llm, file_a)
    out["swapped_back"] = greedy(llm)
    out["fingerprint_back"] = result.fingerprint
    host = HostWeights.load(file_b)
    result = thaw_agents.swap_weights(llm, host)
    out["host_b"] = greedy(llm)
    out["host_route"] = result.route
    shutdown(llm)
    print(json.dumps(out))


def main() -> None:
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    stage, folder = sys.argv[1], Path(sys.argv[2])
    os.environ["THAW_AGENTS_STORE"] = str(folder / "store")  # before any engine: its connector keeps it
    {"models": models, "swap": swap}[stage](folder)


if __name__ == "__main__":
    main()
