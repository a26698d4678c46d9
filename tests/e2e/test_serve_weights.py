"""``thaw-agents serve --weights``: named weights snapshots behind one real server.

The server runs tiny model A (float32) with ``--weights a=A.thaw --weights b=B.thaw``; the
two files and each model's greedy output on a fresh engine come from tests/helpers/swap_models
(the same engine settings). Prompts go one request at a time where output is compared.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers.server import start_server
from helpers.swap_child import PROMPTS
from helpers.swap_models import SETTINGS_ARGV, swap_models

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    _folder, made = swap_models(tmp_path_factory)
    serve = tmp_path_factory.mktemp("serve-weights")
    extra_dir = serve / "more"
    extra_dir.mkdir()
    srv = start_server(
        serve / "store",
        serve / "server.log",
        model=made["a"]["model"],
        extra=[
            *SETTINGS_ARGV,
            "--weights",
            f"a={made['a']['file']}",
            "--weights",
            f"b={made['b']['file']}",
            "--weights-dir",
            str(extra_dir),
        ],
    )
    yield srv, made, extra_dir
    srv.stop()


def _complete(server, model: str, prompt: list[int]) -> tuple[int, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    return server.request("POST", "/v1/completions", body)


def _tokens(server, model: str, prompt: list[int]) -> list[int]:
    status, reply = _complete(server, model, prompt)
    assert status == 200, reply
    return list(reply["choices"][0]["token_ids"])


def test_alternating_names_get_their_own_models_output(setup) -> None:
    server, made, _ = setup
    for _round in range(2):
        for name in ("a", "b", "a", "b"):
            assert [_tokens(server, name, p) for p in PROMPTS] == made[name]["greedy"], name


def test_concurrent_requests_for_both_complete(setup) -> None:
    server, made, _ = setup
    results: dict[tuple[str, int], list[int]] = {}

    def one(name: str, i: int) -> None:
        results[(name, i)] = _tokens(server, name, PROMPTS[0])

    threads = [threading.Thread(target=one, args=(n, i)) for i in range(3) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 6
    # Each ran on its own weights (alone or batched with requests for the same weights).
    for (name, _), tokens in results.items():
        assert tokens[:1] == made[name]["greedy"][0][:1], name


def test_models_lists_them_and_marks_the_loaded_one(setup) -> None:
    server, _, _ = setup
    _tokens(server, "b", PROMPTS[0])
    status, listed = server.request("GET", "/v1/models")
    assert status == 200
    ours = {m["id"]: m for m in listed["data"] if m.get("owned_by") == "thaw-agents"}
    assert set(ours) >= {"a", "b"}
    assert ours["b"]["loaded"] and not ours["a"]["loaded"]
    assert ours["a"]["fingerprint"] != ours["b"]["fingerprint"]


def test_register_at_run_time(setup) -> None:
    server, made, extra_dir = setup
    copy = extra_dir / "b-copy.thaw"
    shutil.copy(made["b"]["file"], copy)
    body = {"name": "b2", "path": str(copy)}
    status, _ = server.request("POST", "/v1/thaw/weights", body, key=None)
    assert status == 401
    status, _ = server.request("POST", "/v1/thaw/weights", body, key="wrong")
    assert status == 401
    status, reply = server.request("POST", "/v1/thaw/weights", body)
    assert status == 200, reply
    assert reply["id"] == "b2" and reply["loaded"] is False
    assert [_tokens(server, "b2", p) for p in PROMPTS] == made["b"]["greedy"]
    # Outside the allowed folders, and a file that is not weights: refused, nothing listed.
    status, reply = server.request("POST", "/v1/thaw/weights", {"name": "x", "path": "/etc/passwd"})
    assert status == 400, reply
    junk = extra_dir / "junk.thaw"
    junk.write_bytes(b"not a weights file" * 10)
    status, reply = server.request("POST", "/v1/thaw/weights", {"name": "y", "path": str(junk)})
    assert status == 422, reply
    status, listed = server.request("GET", "/v1/thaw/weights")
    assert {m["id"] for m in listed["data"]} == {"a", "b", "b2"}


def test_a_snapshot_is_checked_against_the_weights_it_runs_on(setup) -> None:
    server, _, _ = setup
    _tokens(server, "a", PROMPTS[0])
    prompt = list(range(100, 200))
    status, snap = server.request("POST", "/v1/thaw/snapshots", {"prompt_token_ids": prompt})
    assert status == 200, snap
    body = {
        "prompt": [*prompt, 7],
        "max_tokens": 2,
        "temperature": 0,
        "kv_transfer_params": {"thaw": {"snapshot_id": snap["id"]}},
    }
    status, reply = server.request("POST", "/v1/completions", {**body, "model": "a"})
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    status, reply = server.request("POST", "/v1/completions", {**body, "model": "b"})
    assert status == 409, reply  # taken under a's weights; the engine now runs b's
    assert "model_fingerprint" in reply["error"]["message"]


def test_unknown_snapshot_folder_is_not_touched(setup, tmp_path: Path) -> None:
    server, _, _ = setup
    status, reply = server.request("POST", "/v1/thaw/weights", {"name": "../x", "path": str(tmp_path)})
    assert status == 400, reply
