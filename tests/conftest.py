"""Shared fixtures: one real vLLM engine per test session (the default model, in-process)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MAX_MODEL_LEN = 4096


@pytest.fixture(scope="session", autouse=True)
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private snapshot store for the session (never the user's), chosen before any engine
    starts: an engine's connector keeps the store it was built with."""
    path = tmp_path_factory.mktemp("store")
    os.environ["THAW_AGENTS_STORE"] = str(path)
    # The CLI's and demos' vLLM log files, too, stay out of the user's cache folder.
    os.environ.setdefault("THAW_AGENTS_LOGS", str(tmp_path_factory.mktemp("logs")))
    return path


@pytest.fixture(scope="session")
def llm(store: Path):
    """The default model in a real vLLM engine with thaw enabled, shared by every test."""
    import thaw_agents

    engine = thaw_agents.make_llm(max_model_len=MAX_MODEL_LEN, seed=0)
    yield engine
    with contextlib.suppress(Exception):
        engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_chat_engines():
    """Shut ChatThaw's shared engines down while pytest's output streams are still open."""
    yield
    runtime = sys.modules.get("thaw_agents.integrations._runtime")
    if runtime is not None:
        runtime.shutdown_all()


@pytest.fixture(scope="session")
def trunk_text() -> str:
    """About 1,200 tokens of shared context that a person could read."""
    from helpers.texts import long_trunk

    return long_trunk()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One real ``thaw-agents serve`` (default model, loopback, API key) for the test session."""
    from helpers.server import start_server

    folder = tmp_path_factory.mktemp("serve")
    srv = start_server(folder / "store", folder / "server.log")
    yield srv
    srv.stop()
