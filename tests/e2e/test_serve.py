"""``thaw-agents serve`` for real: vLLM's OpenAI server on loopback with the default model.

One server for the session (the ``server`` fixture); a second one, on a store of its own, for
export/import and for a restart on the same store.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from helpers import snapfiles
from helpers.server import start_server

from thaw_agents import cli
from thaw_agents._manifest import read_kv_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TRUNK = [
    {"role": "system", "content": "You are a terse assistant for an operations team."},
    {
        "role": "user",
        "content": "Here is our incident log. "
        + " ".join(
            f"At 10:{i:02d} the queue depth was {i * 37} and worker {i % 5} restarted." for i in range(30)
        ),
    },
]
QUESTION = {"role": "user", "content": "Which worker restarted most often?"}


def _chat(server, messages: list[dict], snapshot: str | None = None, **extra) -> tuple[int, dict]:
    body = {"model": server.model, "messages": messages, "max_tokens": 16, "temperature": 0, **extra}
    if snapshot is not None:
        body["kv_transfer_params"] = {"thaw": {"snapshot_id": snapshot}}
    return server.request("POST", "/v1/chat/completions", body)


@pytest.fixture(scope="module")
def trunk(server) -> dict:
    status, snap = server.request("POST", "/v1/thaw/snapshots", {"messages": TRUNK})
    assert status == 200, snap
    assert snap["num_snapshot_tokens"] >= 32 and snap["num_snapshot_tokens"] <= snap["num_tokens"]
    status, reply = _chat(server, [*TRUNK, QUESTION], snap["id"])
    assert status == 200, reply
    return {"snapshot": snap, "reply": reply["choices"][0]["message"]["content"]}


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("serve-b")
    srv = start_server(folder / "store", folder / "server.log")
    yield srv
    srv.stop()


def test_every_thaw_route_needs_the_key(server, trunk: dict) -> None:
    sid = trunk["snapshot"]["id"]
    routes = [
        ("GET", "/v1/thaw/snapshots", None),
        ("POST", "/v1/thaw/snapshots", {"prompt": "hello"}),
        ("GET", f"/v1/thaw/snapshots/{sid}", None),
        ("GET", f"/v1/thaw/snapshots/{sid}/content", None),
        ("DELETE", f"/v1/thaw/snapshots/{sid}", None),
        ("POST", "/v1/thaw/snapshots/import", None),
    ]
    for method, path, body in routes:
        for key in (None, "wrong-key"):
            status, _ = server.request(method, path, body, key=key)
            assert status == 401, (method, path, key)
    assert (server.store / f"{sid}.thaw").exists()  # nothing was deleted without the key


def test_a_chat_from_a_snapshot_reports_its_cached_tokens(server, trunk: dict) -> None:
    status, reply = _chat(server, [*TRUNK, QUESTION], trunk["snapshot"]["id"])
    assert status == 200
    assert (
        reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= trunk["snapshot"]["num_snapshot_tokens"]
    )
    assert reply["choices"][0]["message"]["content"] == trunk["reply"]


def _completion(server, thaw: dict) -> tuple[int, dict]:
    """A two-token completion of "hi" with these thaw params."""
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2, "kv_transfer_params": {"thaw": thaw}}
    return server.request("POST", "/v1/completions", body)


def test_bad_ids_get_clear_statuses_and_the_server_keeps_serving(server, trunk: dict, tmp_path: Path) -> None:
    missing = "thaw-" + "a" * 32
    status, error = _chat(server, [*TRUNK, QUESTION], missing)
    assert status == 404 and missing in error["error"]["message"]
    for bad in ("/etc/passwd", "../" + missing, "thaw-XYZ", ""):
        status, error = _chat(server, [*TRUNK, QUESTION], bad)
        assert status == 400 and error["error"]["type"] == "BadRequestError", bad
    outside = tmp_path / "outside.thaw"
    status, error = _completion(server, {"op": "save", "dest": str(outside), "num_tokens": 1})
    assert status == 400 and not outside.exists()
    # A hydrate is a local engine's operation: a client's would wait unscheduled and arm the
    # engine for other clients' requests.
    status, error = _completion(server, {"op": "hydrate", "snapshot_id": trunk["snapshot"]["id"]})
    assert status == 400 and "op 'hydrate' is for a local engine" in error["error"]["message"]
    # A snapshot of another KV spec in the store: 409 naming the field.
    source = server.store / f"{trunk['snapshot']['id']}.thaw"

    def to_fp16(header: dict) -> None:
        header["kv"]["kv_spec"]["dtype"] = snapfiles.other_dtype(header["kv"]["kv_spec"]["dtype"])

    staged = snapfiles.rewrite_header(source, tmp_path / "fp16.thaw", to_fp16, recompute_id=True)
    foreign_id = read_kv_manifest(staged).snapshot_id
    os.link(staged, server.store / f"{foreign_id}.thaw")
    status, error = _chat(server, [*TRUNK, QUESTION], foreign_id)
    assert status == 409 and "dtype" in error["error"]["message"]
    status, error = server.request("POST", "/v1/thaw/snapshots", {"prompt": "more", "parent": foreign_id})
    assert status == 409
    status, reply = _chat(server, [*TRUNK, QUESTION], trunk["snapshot"]["id"])
    assert status == 200 and reply["choices"][0]["message"]["content"] == trunk["reply"]


def test_snapshots_are_listed_described_fetched_and_deleted(server, trunk: dict) -> None:
    sid = trunk["snapshot"]["id"]
    status, listing = server.request("GET", "/v1/thaw/snapshots")
    assert status == 200 and sid in {s["id"] for s in listing["data"]}
    status, info = server.request("GET", f"/v1/thaw/snapshots/{sid}")
    assert status == 200 and info["manifest"]["kv"]["snapshot"]["id"] == sid
    status, content = server.request("GET", f"/v1/thaw/snapshots/{sid}/content")
    assert status == 200 and content == (server.store / f"{sid}.thaw").read_bytes()
    status, made = server.request("POST", "/v1/thaw/snapshots", {"prompt": "A throwaway prefix. " * 12})
    assert status == 200
    assert server.request("DELETE", f"/v1/thaw/snapshots/{made['id']}")[0] == 200
    assert server.request("GET", f"/v1/thaw/snapshots/{made['id']}")[0] == 404
    assert server.request("DELETE", f"/v1/thaw/snapshots/{made['id']}")[0] == 404


def test_a_child_snapshot_extends_its_parent(server, trunk: dict) -> None:
    status, child = server.request(
        "POST", "/v1/thaw/snapshots", {"messages": [*TRUNK, QUESTION], "parent": trunk["snapshot"]["id"]}
    )
    assert status == 200, child
    status, info = server.request("GET", f"/v1/thaw/snapshots/{child['id']}")
    assert info["parent"] == trunk["snapshot"]["id"]
    status, error = server.request(
        "POST", "/v1/thaw/snapshots", {"prompt": "unrelated", "parent": child["id"]}
    )
    assert status == 400 and "parent" in error["error"]["message"]


def test_sixteen_concurrent_requests_from_four_snapshots(server) -> None:
    trunks = [
        [{"role": "user", "content": f"Project {name}: " + " ".join(f"{name} note {i}." for i in range(40))}]
        for name in ("alpha", "bravo", "charlie", "delta")
    ]
    snaps = []
    for messages in trunks:
        status, snap = server.request("POST", "/v1/thaw/snapshots", {"messages": messages})
        assert status == 200
        snaps.append(snap)
    results: dict[int, tuple[int, dict]] = {}

    def ask(index: int) -> None:
        which = index % 4
        question = {"role": "user", "content": f"Question {index}: summarise."}
        results[index] = _chat(server, [*trunks[which], question], snaps[which]["id"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert sorted(results) == list(range(16))
    for index, (status, reply) in results.items():
        assert status == 200, reply
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= snaps[index % 4]["num_snapshot_tokens"]


def test_export_import_and_a_restart_on_the_same_store(server, trunk: dict, second, tmp_path: Path) -> None:
    sid = trunk["snapshot"]["id"]
    status, content = server.request("GET", f"/v1/thaw/snapshots/{sid}/content")
    assert status == 200
    corrupt = bytearray(content)
    corrupt[-100] ^= 0xFF
    status, error = second.request("POST", "/v1/thaw/snapshots/import", raw=bytes(corrupt))
    assert 400 <= status < 500 and "checksum" in error["error"]["message"]
    status, error = second.request("POST", "/v1/thaw/snapshots/import", raw=b"not a snapshot")
    assert 400 <= status < 500
    assert not list(second.store.glob("*.partial"))
    status, imported = second.request("POST", "/v1/thaw/snapshots/import", raw=content)
    assert status == 200 and imported["id"] == sid
    # A fresh engine process that never computed the trunk: served from the snapshot, same reply.
    status, reply = _chat(second, [*TRUNK, QUESTION], sid)
    assert status == 200
    assert (
        reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= trunk["snapshot"]["num_snapshot_tokens"]
    )
    assert reply["kv_transfer_params"]["thaw"]["loaded_tokens"] >= trunk["snapshot"]["num_snapshot_tokens"]
    assert reply["choices"][0]["message"]["content"] == trunk["reply"]
    second.stop()
    restarted = start_server(second.store, tmp_path / "restart.log")
    try:
        status, reply = _chat(restarted, [*TRUNK, QUESTION], sid)
        assert status == 200
        assert (
            reply["usage"]["prompt_tokens_details"]["cached_tokens"]
            >= trunk["snapshot"]["num_snapshot_tokens"]
        )
        assert reply["choices"][0]["message"]["content"] == trunk["reply"]
    finally:
        restarted.stop()


def test_serve_refuses_to_expose_the_routes_without_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key" in err
