"""Run in a fresh process beside a tensor-parallel parent: restore weights, hydrate, generate.

Usage: python tp_child.py JOB.json OUT.json

Steps, each reported in OUT.json as it completes (a later step's failure keeps the earlier ones):

1. ``restored``: a TP engine whose weights come from the parent's per-rank files
   (``load_format="thaw"``): greedy tokens of a plain prompt, then the snapshot hydrated and the
   parent's prompt continued (cached tokens, greedy tokens).
2. ``corrupt``: a TP engine from weights files where one rank's file is corrupt: the start must
   fail (the exception vLLM raises; the workers' typed errors are in this process's stderr).
3. ``single``: a TP=1 engine of the same model: hydrating the snapshot is refused (the error's
   class and field), and a request naming the snapshot prefills instead (the connector's report).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any


def _shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    from vllm import SamplingParams, TokensPrompt

    import thaw_agents

    report: dict[str, Any] = {"seconds": {}}
    start = time.perf_counter()

    def save(step: str) -> None:
        nonlocal start
        report["seconds"][step] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        out_path.write_text(json.dumps(report))

    greedy = SamplingParams(max_tokens=job["max_tokens"], temperature=0)
    handle = thaw_agents.ForkHandle.from_id(job["snapshot_id"])
    continued = TokensPrompt(prompt_token_ids=list(handle.token_ids) + job["suffix"])
    plain = TokensPrompt(prompt_token_ids=job["plain"])
    tp = job["engine"]

    def weights(template: str) -> dict[str, Any]:
        return {"load_format": "thaw", "model_loader_extra_config": {"snapshot": template}}

    llm = thaw_agents.make_llm(job["model"], **tp, **weights(job["weights"]))
    plain_out = llm.generate([plain], greedy, use_tqdm=False)[0]
    hydrated = handle.hydrate(llm)
    out = llm.generate([continued], greedy, use_tqdm=False)[0]
    report["restored"] = {
        "plain_tokens": list(plain_out.outputs[0].token_ids),
        "hydrated": hydrated,
        "cached": out.num_cached_tokens,
        "tokens": list(out.outputs[0].token_ids),
    }
    save("restored")
    _shutdown(llm)

    try:
        broken = thaw_agents.make_llm(job["model"], **tp, **weights(job["corrupt_weights"]))
    except Exception as exc:
        report["corrupt"] = {"started": False, "error": f"{type(exc).__name__}: {exc}"}
    else:
        report["corrupt"] = {"started": True}
        _shutdown(broken)
    save("corrupt")

    single = thaw_agents.make_llm(job["model"], **job["single_engine"])
    try:
        handle.hydrate(single)
    except thaw_agents.ThawError as exc:
        report["single"] = {"error": type(exc).__name__, "field": getattr(exc, "field", None)}
    else:
        report["single"] = {"error": None}
    named = thaw_agents.with_fork(greedy, handle)  # no engine: the connector must refuse it
    out = single.generate([continued], named, use_tqdm=False)[0]
    report["single"]["cached"] = out.num_cached_tokens
    report["single"]["report"] = (out.kv_transfer_params or {}).get("thaw")
    save("single")
    _shutdown(single)


if __name__ == "__main__":
    main()
