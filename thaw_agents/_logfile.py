"""vLLM's log lines in a file instead of the terminal, for the CLI and the demos.

An engine start writes about 150 lines (platform, config, weights, KV cache sizes): useful when
something fails, noise when a person watches a demo. :func:`send_vllm_logs_to_file` writes a
logging configuration (Python's ``dictConfig`` schema, plain JSON) that sends the ``vllm`` and
``uvicorn`` loggers (and Python warnings) to one file, applies it in this process at once (vLLM
warns before it configures its own logging), and names it in ``VLLM_LOGGING_CONFIG_PATH``, which
vLLM applies in this process and in every process it or we start (engine cores, the API server,
a demo's phases), so they all append there. The library itself never calls it: an application
keeps its own logging.

Example:
    >>> from thaw_agents._logfile import send_vllm_logs_to_file
    >>> path = send_vllm_logs_to_file("demo")   # doctest: +SKIP
    >>> print(f"vLLM's log: {path}")            # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging.config
import os
import time
from pathlib import Path
from typing import Any

from .models import cache_dir

__all__ = ["logging_config", "send_vllm_logs_to_file"]

# Loggers a vLLM engine or server writes to: vLLM's own, uvicorn's under `thaw-agents serve`, and
# the warnings of the libraries under them (logging.captureWarnings).
_LOGGERS = ("vllm", "uvicorn", "uvicorn.error", "uvicorn.access", "py.warnings")


def logging_config(path: str | os.PathLike[str], level: str = "INFO") -> dict[str, Any]:
    """A ``dictConfig`` that appends the engine's loggers to ``path`` (no vLLM import needed)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "file": {
                "format": "%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s",
                "datefmt": "%H:%M:%S",
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(path),
                "mode": "a",  # several processes append to the same file
                "formatter": "file",
                "level": level,
            }
        },
        "loggers": {name: {"handlers": ["file"], "level": level, "propagate": False} for name in _LOGGERS},
    }


def send_vllm_logs_to_file(name: str, folder: str | os.PathLike[str] | None = None) -> Path:
    """Send vLLM's logs, here and in the processes started from here, to a new file; return it.

    Args:
        name: what runs (``"demo"``, ``"serve"``): the file is ``NAME-TIME-PID.log``.
        folder: where the file goes (default: ``THAW_AGENTS_LOGS``, else ``logs`` under the
            thaw-agents cache folder).
    """
    folder = Path(folder or os.environ.get("THAW_AGENTS_LOGS") or cache_dir() / "logs")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log = folder / f"{stem}.log"
    # Owner-only: engine logs name model paths, ports and request ids.
    os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()
    config = logging_config(log, level)
    config_path = folder / f"{stem}.logging.json"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(config, handle, indent=1)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config_path)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    # Loading bars of the processes started from here (tqdm reads this when it is imported).
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.config.dictConfig(config)  # replaces handlers vLLM may have set up already
    logging.captureWarnings(True)
    return log
