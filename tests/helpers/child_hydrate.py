"""Run in a fresh process: load saved snapshots, hydrate them, generate, report JSON.

Usage: python child_hydrate.py JOBS.json OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    from vllm import SamplingParams, TokensPrompt

    import thaw_agents

    llm = thaw_agents.make_llm(max_model_len=jobs["max_model_len"], seed=0)
    results = {}
    for job in jobs["jobs"]:
        handle = thaw_agents.ForkHandle.load(job["uri"])
        prompt = TokensPrompt(prompt_token_ids=list(handle.token_ids) + job["suffix"])
        entry = {"id": handle.id, "files": len(handle.paths)}
        if job.get("direct"):
            # One request that loads the prefix from the snapshot itself (no separate hydrate).
            params = thaw_agents.with_fork(
                SamplingParams(max_tokens=job["max_tokens"], temperature=0), handle
            )
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            entry["direct_cached"] = out.num_cached_tokens
            entry["direct_tokens"] = list(out.outputs[0].token_ids)
        else:
            entry["hydrated"] = handle.hydrate(llm)
        for name, params in (
            ("greedy", SamplingParams(max_tokens=job["max_tokens"], temperature=0)),
            ("sampled", SamplingParams(max_tokens=job["max_tokens"], temperature=0.8, seed=1234)),
        ):
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            entry[name + "_cached"] = out.num_cached_tokens
            entry[name + "_tokens"] = list(out.outputs[0].token_ids)
        results[job["name"]] = entry
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
