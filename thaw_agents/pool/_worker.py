"""A local pool worker process: one vLLM engine, JSON lines over two inherited pipes.

Started by the pool as ``python -m thaw_agents.pool._worker READ_FD WRITE_FD NAME``; its
stdout and stderr go to a log file (vLLM logs there), the protocol uses only the pipes,
so nothing the engine prints can corrupt a message. The worker exits when the pool asks
(``shutdown``), when the pipe closes, or when its parent process is gone.

Example (what the pool does)::

    r, w = os.pipe(), os.pipe()
    subprocess.Popen([sys.executable, "-m", "thaw_agents.pool._worker", str(r[0]), str(w[1]),
                      "local-0"], pass_fds=(r[0], w[1]))
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from ._protocol import decode_line, encode_line

__all__ = ["CPUS_ENV", "main", "pin_process"]

logger = logging.getLogger("thaw_agents.pool.worker")
CPUS_ENV = "THAW_AGENTS_POOL_CPUS"


def pin_process() -> None:
    """Keep this whole process on the cores the pool gave it (``THAW_AGENTS_POOL_CPUS``).

    ``VLLM_CPU_OMP_THREADS_BIND`` pins vLLM's OpenMP threads only; torch starts other busy
    threads before that, free to run on every core. Two engines then spin against each other
    at OpenMP barriers: decode ran 20-40x slower with two workers on two cores. Called first
    thing, before torch is imported, so every thread inherits the mask.
    """
    cpus = os.environ.get(CPUS_ENV)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def _watch_parent(parent_pid: int) -> None:
    """Exit when the pool's process is gone (re-parented), even in the middle of a step."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)


def main(argv: list[str] | None = None) -> int:
    pin_process()
    args = sys.argv[1:] if argv is None else argv
    read_fd, write_fd, name = int(args[0]), int(args[1]), args[2]
    logging.basicConfig(
        level=os.environ.get("THAW_AGENTS_POOL_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    from ._service import EngineService

    service = EngineService(name)
    with os.fdopen(read_fd, "rb") as inbox, os.fdopen(write_fd, "wb", buffering=0) as outbox:
        for line in inbox:
            if not line.strip():
                continue
            try:
                message = decode_line(line)
            except ValueError as exc:
                logger.error("unreadable message dropped: %s", exc)
                continue
            if message.get("op") == "shutdown":
                outbox.write(encode_line({"id": message.get("id"), "ok": True}))
                break
            outbox.write(encode_line(service.handle(message)))
    service.close()
    logger.info("worker %s exits", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
