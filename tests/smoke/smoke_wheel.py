"""Smoke test of an installed wheel: import, the default model, one fork, one ChatThaw call.

``make smoke`` builds the wheel, installs ``thaw-agents[cpu,langgraph]`` from it into a fresh
virtualenv and runs this file with that virtualenv's Python, from outside the source tree. It is
not a pytest file: it checks what a user gets from ``pip install``, and prints a short result.

Run by hand::

    python tests/smoke/smoke_wheel.py     # with the Python of the environment to check
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

TRUNK = [
    ("system", "You are a careful code reviewer. Answer in one short sentence."),
    ("human", "The file under review:\n" + "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(99))),
]


def main() -> int:
    started = time.perf_counter()
    import thaw_agents
    from thaw_agents import ChatThaw

    where = Path(thaw_agents.__file__).resolve()
    if "site-packages" not in where.parts:
        raise SystemExit(f"thaw_agents was imported from {where}, not from an installed wheel")
    model = thaw_agents.default_model()
    print(f"thaw-agents {thaw_agents.__version__} from {where.parent}")
    print(f"default model: {model}")

    llm = ChatThaw(temperature=0, max_tokens=16, engine_kwargs={"max_model_len": 2048})
    try:
        handle = thaw_agents.fork(llm, TRUNK)
        reply = llm.invoke([*TRUNK, ("human", "Name one function.")], fork=handle)
        cache_read = reply.usage_metadata["input_token_details"]["cache_read"]
        handle.delete()
    finally:
        llm.close()
    if handle.num_snapshot_tokens <= 0 or cache_read < handle.num_snapshot_tokens:
        raise SystemExit(
            f"the branch read {cache_read} prompt tokens from the fork's {handle.num_snapshot_tokens}"
        )
    print(
        f"fork: {handle.num_snapshot_tokens} of {handle.num_tokens} trunk tokens snapshotted; "
        f"the ChatThaw branch read {cache_read} from it and said {reply.content.strip()[:80]!r}"
    )
    print(f"smoke test passed in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    # A private snapshot store: the smoke test leaves the user's store alone.
    with tempfile.TemporaryDirectory(prefix="thaw-smoke-") as store:
        os.environ.setdefault("THAW_AGENTS_STORE", store)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the result, not the engine's start-up
        sys.exit(main())
