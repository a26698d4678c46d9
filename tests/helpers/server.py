"""A real ``thaw-agents serve`` on loopback for the tests: started in its own process group,
waited for on ``/health``, and stopped with its engine (SIGTERM, then SIGKILL to the group)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY = "test-key-" + "0" * 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    api_key: str
    store: Path
    model: str
    process: subprocess.Popen
    log: Path

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = "default",
        raw: bytes | None = None,
    ):
        """(status, parsed JSON or bytes) of one HTTP request; never raises on an HTTP error."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"content-type": "application/json" if raw is None else "application/octet-stream"}
        if key is not None:
            headers["Authorization"] = f"Bearer {self.api_key if key == 'default' else key}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                status, payload, kind = resp.status, resp.read(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            status, payload, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
        return status, (json.loads(payload) if "json" in kind else payload)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        # The engine core is in the same process group; make sure nothing is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def start_server(
    store: Path, log: Path, *, model: str | None = None, extra: list[str] | None = None
) -> Server:
    from thaw_agents.models import default_model

    model_path = str(model or default_model(progress=False))
    port = free_port()
    env = {**os.environ, "THAW_AGENTS_STORE": str(store), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    argv = [
        sys.executable, "-m", "thaw_agents.cli", "serve", model_path,
        "--port", str(port), "--api-key", API_KEY,
        "--max-model-len", "4096", "--seed", "0", *(extra or []),
    ]  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", API_KEY, store, model_path, process, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"the server did not start in 300 s: {log.read_text()[-3000:]}")
