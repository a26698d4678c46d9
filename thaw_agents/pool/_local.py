"""The parent's side of a local worker process: spawn it, talk JSON lines, watch it die.

Each worker is its own OS process (vLLM keeps one worker-side KV connector per process)
in its own session, so a kill takes everything it started. A reader thread matches
replies to requests by id; when the pipe closes, every waiting call fails at once with
:class:`WorkerDiedError` carrying the exit status and the tail of the worker's log.

Example:
    >>> worker = LocalWorker("local-0", env=dict(os.environ), log_path=Path("w0.log"))  # doctest: +SKIP
    >>> worker.spawn()                                                                  # doctest: +SKIP
    >>> boot = {"op": "boot", "model": None, "overrides": {}}                           # doctest: +SKIP
    >>> worker.call(boot, timeout_s=300, stage="boot")["spec"]                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from .._errors import PoolTimeoutError, WorkerDiedError
from ._protocol import decode_line, encode_line

__all__ = ["LocalWorker", "log_tail"]

logger = logging.getLogger(__name__)


def log_tail(path: Path | None, num_lines: int = 25, max_chars: int = 4000) -> str:
    """The last lines of a worker's log (empty when there is none)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-num_lines:])[-max_chars:]


class LocalWorker:
    """One worker process on this host."""

    kind = "local"

    def __init__(self, name: str, *, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self._env = env
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._outbox: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Future[dict[str, Any]], str]] = {}
        self._lock = threading.Lock()
        self._dead = threading.Event()
        self._exit_code: int | None = None
        self.spec_json: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._dead.is_set() and self._proc.poll() is None

    def spawn(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        command = [
            sys.executable,
            "-m",
            "thaw_agents.pool._worker",
            str(to_child_r),
            str(from_child_w),
            self.name,
        ]
        with open(self.log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    command,
                    pass_fds=(to_child_r, from_child_w),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._env,
                    start_new_session=True,  # a kill reaches whatever the engine started
                )
            finally:
                os.close(to_child_r)
                os.close(from_child_w)
        self._outbox = os.fdopen(to_child_w, "wb", buffering=0)
        inbox = os.fdopen(from_child_r, "rb")
        threading.Thread(
            target=self._read, args=(inbox,), name=f"thaw-{self.name}-reader", daemon=True
        ).start()
        logger.debug("pool worker %s: process %d started (log %s)", self.name, self._proc.pid, self.log_path)

    def _read(self, inbox: Any) -> None:
        with inbox:
            for line in inbox:
                try:
                    message = decode_line(line)
                except ValueError:
                    logger.warning("pool worker %s: unreadable reply dropped", self.name)
                    continue
                with self._lock:
                    waiting = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
                if waiting is not None:
                    waiting[0].set_result(message)
        self._on_exit()

    def _on_exit(self) -> None:
        assert self._proc is not None
        try:
            self._exit_code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # closed its pipe but lives on: finish it
            self.kill()
            self._exit_code = self._proc.returncode
        self._dead.set()
        with self._lock:
            pending, self._pending = self._pending, {}
        tail = log_tail(self.log_path)
        for future, stage in pending.values():
            future.set_exception(self._died_error(stage, tail))
        if pending:
            logger.warning(
                "pool worker %s died (exit status %s) during %d call(s)",
                self.name,
                self._exit_code,
                len(pending),
            )

    def _died_error(self, stage: str, tail: str | None = None) -> WorkerDiedError:
        code = self._exit_code
        if code is None and self._proc is not None:
            code = self._proc.poll()
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        return WorkerDiedError(
            f"the worker process {self.pid} {how} during {stage}; see its log {self.log_path}",
            exit_code=code,
            log_tail=log_tail(self.log_path) if tail is None else tail,
            worker=self.name,
            stage=stage,
        )

    def call(self, message: dict[str, Any], *, timeout_s: float, stage: str) -> dict[str, Any]:
        """Send one request and wait for its reply.

        Raises:
            WorkerDiedError: the process is gone or went away while this call waited.
            PoolTimeoutError: no reply within ``timeout_s`` (the worker is left running).
        """
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            if self._dead.is_set() or self._outbox is None:
                raise self._died_error(stage)
            request_id = next(self._ids)
            self._pending[request_id] = (future, stage)
            try:
                self._outbox.write(encode_line({**message, "id": request_id}))
            except OSError:
                self._pending.pop(request_id, None)
                raise self._died_error(stage) from None
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(request_id, None)
            raise PoolTimeoutError(
                f"{stage} took longer than {timeout_s:.0f} s",
                timeout_s=timeout_s,
                worker=self.name,
                stage=stage,
            ) from None

    def kill(self) -> None:
        """SIGKILL the worker's process group (the worker and anything it started)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def close(self, timeout_s: float = 15.0) -> None:
        """Ask the worker to exit; kill it if it does not within ``timeout_s``."""
        if self.alive:
            with contextlib.suppress(WorkerDiedError, PoolTimeoutError):
                self.call({"op": "shutdown"}, timeout_s=timeout_s, stage="shutdown")
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.kill()
        else:
            self.kill()
        if self._outbox is not None:
            with contextlib.suppress(OSError):
                self._outbox.close()
