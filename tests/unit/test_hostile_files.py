"""Hostile files against every reader: each case is a typed refusal or the original result.

Real files are mutated (bit flips, truncations, appended bytes, header edits that keep the JSON
valid, hostile lengths, special files) and every reader runs on each: the container reader and
verifier, the KV manifest reader (with and without ``expect_id``), ``ForkHandle.load``,
``thaw-agents info --verify``, the weights reader, ``restore_tensors`` and ``HostWeights`` on
the CPU. For every case and reader the outcome must be a typed ``ThawError``, or a result equal
to the original one, within a deadline and a memory bound. A result may differ from the
original only in a descriptive field the format leaves unbound (a model name, ``created_by``,
region and layer names, the parent's id, which the chain load checks): those are counted apart.

The KV files come from the real engine (``pytest.mark.e2e``); set ``THAW_HOSTILE_KV`` to a
child snapshot saved with ``ForkHandle.save`` (its parent beside it) to reuse files instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import snapfiles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thaw_agents
from thaw_agents import ForkHandle, SnapshotError, ThawError, cli
from thaw_agents._container_reader import read_container, verify_regions
from thaw_agents._manifest import read_kv_manifest
from thaw_agents.weights import HostWeights, freeze_tensors, read_weights_manifest, restore_tensors

# Per call: a hang detector in wall time (a FIFO or a blocked read uses no CPU), generous
# because a loaded 2-core machine can stall a thread for seconds; and a bound on the CPU time
# the calling thread spends (runaway work on a hostile header), which load does not inflate.
DEADLINE_S = 30.0
CPU_LIMIT_S = 2.0
MEMORY_LIMIT = 64 << 20
KV_CASES = 450
WEIGHTS_CASES = 600
ROOT_TEXT = (
    "A keeper climbed the lighthouse stairs at dusk with a lantern and a notebook. "
    "She wrote down the wind, the swell, the ships that passed and the birds on the rail, "
    "then trimmed the wick and watched the beam sweep the dark water until morning. "
    "In winter the glass froze at the edges and she scraped it clear with a knife."
)
CHILD_TEXT = (
    " One night a storm rolled in from the west: rain hammered the glass, the tower hummed, "
    "and a small boat fought the waves below, its single light rising and falling."
)
OTHER_ID = "thaw-" + "0123456789abcdef" * 2
TALLY: Counter[str] = Counter()


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang


@pytest.fixture(scope="module", autouse=True)
def _watch(request: pytest.FixtureRequest) -> Iterator[None]:
    """Deadline per call (SIGALRM) and memory accounting (tracemalloc) for the whole module;
    the outcome counts are printed at the end (past pytest's output capture)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    start = time.monotonic()
    yield
    tracemalloc.stop()
    signal.signal(signal.SIGALRM, previous)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if TALLY and capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\nhostile files ({time.monotonic() - start:.0f} s), outcomes per reader call:")
            for key, value in sorted(TALLY.items()):
                print(f"  {key}: {value}")


def _call(name: str, fn: Callable[[], Any], deadline_s: float = DEADLINE_S) -> tuple[bool, Any]:
    """(True, result) or (False, the typed error); anything else fails the case."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start, cpu_start = time.monotonic(), time.thread_time()
    signal.setitimer(signal.ITIMER_REAL, deadline_s)
    try:
        outcome: tuple[bool, Any] = (True, fn())
    except _Hang:
        pytest.fail(f"{name} ran past {deadline_s} s")
    except ThawError as exc:
        outcome = (False, exc)
    except Exception as exc:
        raise AssertionError(f"{name}: untyped {type(exc).__name__}: {exc}") from exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    elapsed, cpu = time.monotonic() - start, time.thread_time() - cpu_start
    peak = tracemalloc.get_traced_memory()[1] - base
    assert elapsed < deadline_s, f"{name} took {elapsed:.2f} s"
    assert cpu < CPU_LIMIT_S or deadline_s > DEADLINE_S, f"{name} used {cpu:.2f} s of CPU"
    assert peak < MEMORY_LIMIT, f"{name} peaked at {peak:,} bytes"
    TALLY["typed refusal" if not outcome[0] else "accepted"] += 1
    return outcome


def _same(name: str, got: Any, want: Any, loose: Callable[[Any], Any] | None = None) -> bool:
    """An accepted result equals the original (True), or differs only in fields the format
    leaves unbound: names, created_by, vLLM version, the parent's id (False)."""
    if got == want:
        TALLY["identical"] += 1
        return True
    assert loose is not None and loose(got) == loose(want), f"{name} accepted a changed file: {got!r:.300}"
    TALLY["identical but for a descriptive field"] += 1
    return False


# -- observations: what a reader's result means, as comparable plain data ----------------------
def _container_view(c: Any) -> tuple[Any, ...]:
    """What the container reader answers for (the kind readers check the kind's object)."""
    fields = ("format", "format_version", "kind", "checksum_algorithm")
    return (c.regions, c.payload_offset, c.payload_nbytes, [c.header[k] for k in fields])


def _container_loose(view: tuple[Any, ...]) -> tuple[Any, ...]:
    # Region names are labels; where the payload starts follows the header's length.
    regions, _, *rest = view
    return ([(r.offset, r.nbytes, r.checksum) for r in regions], *rest)


def _kv_view(m: Any) -> tuple[Any, ...]:
    return (
        m.snapshot_id,
        m.spec,
        m.first_block,
        m.token_ids,
        m.tail_token_ids,
        m.keys,
        m.parent,
        m.created_by,
        _container_view(m.container),
    )


def _kv_loose(view: tuple[Any, ...]) -> tuple[Any, ...]:
    sid, spec, first, tokens, tail, keys, parent, _, container = view
    layout = spec.to_json()
    del layout["model_name"], layout["vllm_version"]
    if parent is not None:  # a child's keys start at its parent's: the chain load binds it
        del layout["model_fingerprint"]
    layout["layers"] = [(lyr["block_shape"], lyr["block_nbytes"]) for lyr in layout["layers"]]
    parent_ref = parent and (parent.num_blocks, parent.last_key)
    return (sid, layout, first, tokens, tail, keys, parent_ref, _container_loose(container))


def _handle_view(handle: ForkHandle) -> tuple[Any, ...]:
    specs = [
        (m.spec.model_fingerprint, m.spec.layout_material(), m.spec.block_size) for m in handle.manifests
    ]
    return (handle.id, handle.token_ids, [m.snapshot_id for m in handle.manifests], specs)


def _weights_view(m: Any) -> tuple[Any, ...]:
    return (m.model_name, m.model_fingerprint, m.tensors, m.created_by, _container_view(m.container))


def _weights_loose(view: tuple[Any, ...]) -> tuple[Any, ...]:
    # The model name and fingerprint are claims (header_checksum refuses an edited header, but
    # anyone may write a consistent one; a restore compares the fingerprint with
    # expect_fingerprint): the tensors must be the same.
    return (view[2], _container_loose(view[4]))


def _cli(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["info", str(path), "--verify"])
    return code, out.getvalue(), err.getvalue()


def _check_cli(path: Path, accepted: bool, original: tuple[int, str, str] | None, same: bool = False) -> None:
    """``info --verify`` shows the file iff the readers accept it (exactly as before when the
    file is unchanged in substance), else prints one escaped line and exits 1."""
    code, out, err = _call("thaw-agents info", lambda: _cli(path))[1]
    assert (code == 0) == accepted, (code, out, err)
    if code == 0:
        assert original is not None and out.count("\n") == original[1].count("\n")
        assert all(c.isprintable() for line in out.splitlines() for c in line)
        assert not same or out.replace(str(path), "<p>") == original[1].replace(original[3], "<p>")
        TALLY["cli shown"] += 1
    else:
        assert code == 1 and not out, (code, out)
        assert err.count("\n") == 1 and err.startswith("thaw-agents: error: "), err
        assert "Traceback" not in err and all(c.isprintable() for c in err.rstrip("\n"))
        TALLY["cli one-line error"] += 1


# -- the real files ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kv_chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real two-file chain (root of 2 blocks, child of 1 more) and the readers' results on it."""
    folder = tmp_path_factory.mktemp("kv-originals")
    saved = os.environ.get("THAW_HOSTILE_KV")
    if saved:
        child = read_kv_manifest(saved)
        assert child.parent is not None
        shutil.copyfile(saved, folder / "child.thaw")
        name = child.parent.snapshot_id + ".thaw"
        shutil.copyfile(Path(saved).parent / name, folder / name)
    else:
        llm = request.getfixturevalue("llm")
        root = thaw_agents.fork(llm, ROOT_TEXT)
        assert root.num_blocks >= 2
        root.fork(llm, CHILD_TEXT).save(folder / "child.thaw")
    child_path = folder / "child.thaw"
    child = read_kv_manifest(child_path)
    assert child.parent is not None and child.num_blocks >= 1
    root_path = folder / (child.parent.snapshot_id + ".thaw")
    handle = ForkHandle.load(child_path)
    return Originals(
        {
            "child": child_path,
            "root": root_path,
            "bytes": {"child": child_path.read_bytes(), "root": root_path.read_bytes()},
            "ids": {"child": child.snapshot_id, "root": child.parent.snapshot_id},
            "container": {
                "child": _container_view(read_container(child_path, expect_kind="kv")),
                "root": _container_view(read_container(root_path, expect_kind="kv")),
            },
            "kv": {"child": _kv_view(child), "root": _kv_view(read_kv_manifest(root_path))},
            "handle": _handle_view(handle),
            "cli": (*_cli(child_path), str(child_path)),
            "cases": tmp_path_factory.mktemp("kv-cases"),
        }
    )


def _real_tensors() -> dict[str, torch.Tensor]:
    """A few real tensors of the default model (its norms and one layer's attention)."""
    from safetensors import safe_open

    from thaw_agents.models import default_model

    files = sorted(Path(default_model(progress=False)).glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(files[0]), framework="pt") as weights:
        names = [n for n in weights.keys() if n.startswith("model.layers.0.") or n == "model.norm.weight"]  # noqa: SIM118
        for name in sorted(names):
            tensor = weights.get_tensor(name)
            if tensor.numel() <= 1 << 17:  # norms, k and v: ~0.5 MB, so a case takes milliseconds
                out[name] = tensor.contiguous()
    assert len(out) >= 4
    return out


class Originals(dict):  # type: ignore[type-arg]
    """The real files and the readers' answers on them; a short repr for failure reports."""

    def __repr__(self) -> str:
        return f"<originals of {sorted(self)}>"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("weights-originals")
    tensors = _real_tensors()
    path = folder / "w.thaw"
    freeze_tensors(path, tensors, model_name="SmolLM2 slice", model_fingerprint="sha256:slice")
    return Originals(
        {
            "path": path,
            "bytes": path.read_bytes(),
            "tensors": tensors,
            "container": _container_view(read_container(path, expect_kind="weights")),
            "manifest": _weights_view(read_weights_manifest(path)),
            "cases": tmp_path_factory.mktemp("weights-cases"),
        }
    )


# -- mutations ---------------------------------------------------------------------------------
_HOSTILE_LEAVES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**48, 2**63, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "../escaped/p",
            OTHER_ID,
            "thaw-" + "A" * 32,
            "\ud800",
            "x\udfff",
            "\x1b[2J\x1b[H",
            "a\nchecksums  verified",
            "",
            "0" * 64,
            "float16",
            "uint8",
            "bfloat16",
            "A" * 5000,
        ]
    ),
    st.lists(st.sampled_from([0, 1, 7, -1, 2**32, 2**64, 1.5]), max_size=3),
)
_HOSTILE = st.recursive(
    _HOSTILE_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_RAW_WORDS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"1.0", b"9" * 5000, b"true", b'"\\ud800"']


def _walk(data: st.DataObject, header: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """A random (container, key) in ``header`` and the path to it."""
    node: Any = header
    path: list[Any] = []
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return node, None, path
        key = data.draw(st.sampled_from(keys))
        path.append(key)
        child = node[key]
        if not isinstance(child, (dict, list)) or not child or data.draw(st.booleans()):
            return node, key, path
        node = child


def _tweak(data: st.DataObject, value: Any) -> Any:
    """A plausible edit of ``value`` (same type, nearby) or a hostile replacement."""
    if data.draw(st.booleans()):
        return data.draw(_HOSTILE)
    if type(value) is int:
        return value + data.draw(st.sampled_from([1, -1, 2**32, -(2**32), 2**64, 4096]))
    if isinstance(value, str) and value:
        i = data.draw(st.integers(0, len(value) - 1))
        return (
            value[:i] + data.draw(st.sampled_from(["0", "f", "/", "..", "\ud800", "\n", ""])) + value[i + 1 :]
        )
    if isinstance(value, list) and value:
        return data.draw(st.sampled_from([value[:-1], [*value, value[-1]], value[::-1], [value]]))
    return data.draw(_HOSTILE)


def mutate(data: st.DataObject, original: bytes) -> tuple[str, bytes]:
    """One hostile variant of ``original`` and what was done (for the failure report)."""
    header, offset = snapfiles.split(original)
    size = len(original)
    kind = data.draw(
        st.sampled_from(
            [
                "flip",
                "flip",
                "truncate",
                "append",
                "edit",
                "edit",
                "edit",
                "drop",
                "raw",
                "unpadded",
                "length",
            ]
        )
    )
    if kind == "flip":
        where = data.draw(st.sampled_from(["prefix", "header", "payload"]))
        lo, hi = {"prefix": (0, 15), "header": (16, offset - 1), "payload": (offset, size - 1)}[where]
        pos, bit = data.draw(st.integers(lo, hi)), data.draw(st.integers(0, 7))
        out = bytearray(original)
        out[pos] ^= 1 << bit
        return f"flip bit {bit} of byte {pos} ({where})", bytes(out)
    if kind == "truncate":
        n = data.draw(
            st.one_of(st.integers(0, 64), st.integers(0, size - 1), st.integers(offset - 8, offset + 8))
        )
        return f"truncate to {n}", original[: max(0, n)]
    if kind == "append":
        extra = data.draw(st.binary(min_size=1, max_size=64))
        return f"append {len(extra)} bytes", original + extra
    if kind == "length":
        n = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(offset - 32, offset + 32).map(abs)))
        return f"header length {n}", original[:8] + n.to_bytes(8, "little") + original[16:]
    if kind == "raw":
        word = data.draw(st.sampled_from(_RAW_WORDS))
        text = snapfiles.encode_header(header, pad=False)
        digits = [
            i for i in range(1, len(text)) if text[i : i + 1].isdigit() and not text[i - 1 : i].isdigit()
        ]
        i = data.draw(st.sampled_from(digits))
        j = i
        while j < len(text) and text[j : j + 1].isdigit():
            j += 1
        raw = text[:i] + word + text[j:]
        raw += b" " * (-(16 + len(raw)) % 4096)
        return f"raw {word[:12]!r} at {i}", snapfiles.assemble(raw, original[offset:])
    if kind == "unpadded":
        return "unpadded header", snapfiles.assemble(
            snapfiles.encode_header(header, pad=False), original[offset:]
        )
    node, key, path = _walk(data, header)
    if key is None:
        what = f"empty container at {path}"
    elif kind == "drop":
        if isinstance(node, dict):
            del node[key]
        else:
            node.pop(key)
        what = f"drop {path}"
    else:
        node[key] = _tweak(data, node[key])
        what = f"edit {path} = {node[key]!r:.80}"
    return what, snapfiles.assemble(snapfiles.encode_header(header), original[offset:])


def _put(path: Path, data: bytes) -> None:
    """A new file (new inode) under ``path``: never written through a hard link that a load
    may have made into the store."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the fuzz ----------------------------------------------------------------------------------
_FUZZ = settings(
    max_examples=KV_CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.mark.e2e
@_FUZZ
@given(data=st.data())
def test_kv_files(kv_chain: dict[str, Any], data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["child", "child", "root"]))
    what, blob = mutate(data, kv_chain["bytes"][which])
    note = f"{which}: {what}"
    TALLY["kv cases"] += 1
    folder = kv_chain["cases"]
    paths = {"child": folder / "child.thaw", "root": folder / kv_chain["root"].name}
    for name, path in paths.items():
        _put(path, blob if name == which else kv_chain["bytes"][name])
    target = paths[which]

    same = False
    ok, got = _call("read_container", lambda: read_container(target, expect_kind="kv"))
    ok_v = ok and _call("verify_regions", lambda: verify_regions(got))[0]
    if ok_v:
        _same(note, _container_view(got), kv_chain["container"][which], _container_loose)
    ok_c = ok
    ok, got = _call("read_kv_manifest", lambda: read_kv_manifest(target))
    assert ok_c or not ok, f"{note}: the manifest reader accepts what the container reader refuses"
    if ok and ok_v:
        same = _same(note, _kv_view(got), kv_chain["kv"][which], _kv_loose)
    ok_id, _ = _call(
        "read_kv_manifest(expect_id)", lambda: read_kv_manifest(target, expect_id=kv_chain["ids"][which])
    )
    assert ok_id == ok, note
    ok_other, _ = _call("read_kv_manifest(other id)", lambda: read_kv_manifest(target, expect_id=OTHER_ID))
    assert not ok_other, f"{note}: a file was accepted under another snapshot's name"
    ok_load, handle = _call("ForkHandle.load", lambda: ForkHandle.load(paths["child"]))
    if ok_load:
        assert _handle_view(handle) == kv_chain["handle"], note
        TALLY["identical"] += 1
    if which == "root":  # info reads the child alone: untouched, shown as before
        _check_cli(paths["child"], True, kv_chain["cli"], same=True)
    else:
        _check_cli(paths["child"], ok and ok_v, kv_chain["cli"], same=same)


@settings(_FUZZ, max_examples=WEIGHTS_CASES)
@given(data=st.data())
def test_weights_files(weights_file: dict[str, Any], data: st.DataObject) -> None:
    what, blob = mutate(data, weights_file["bytes"])
    TALLY["weights cases"] += 1
    path = weights_file["cases"] / "w.thaw"
    _put(path, blob)
    originals = weights_file["tensors"]

    # Readers check headers, verify_regions the bytes: an accepted and verified file must be
    # the original; one accepted but not verified was refused, by verify_regions.
    ok, got = _call("read_container", lambda: read_container(path, expect_kind="weights"))
    verified = ok and _call("verify_regions", lambda: verify_regions(got))[0]
    if verified:
        _same(what, _container_view(got), weights_file["container"], _container_loose)
    ok_m, got = _call("read_weights_manifest", lambda: read_weights_manifest(path))
    assert ok or not ok_m, f"{what}: the manifest reader accepts what the container reader refuses"
    if ok_m and verified:
        _same(what, _weights_view(got), weights_file["manifest"], _weights_loose)
    for name, restore in (
        ("restore_tensors", lambda t: restore_tensors(path, t)),
        ("HostWeights.load", lambda t: _held(HostWeights.load(path), t)),
        ("HostWeights.map", lambda t: _held(HostWeights.map(path), t)),
    ):
        targets = {k: torch.zeros_like(v) for k, v in originals.items()}
        ok_r, _ = _call(name, lambda restore=restore, targets=targets: restore(targets))
        if ok_r:
            assert ok_m and verified, f"{what}: {name} restored from a file the readers refuse"
            assert all(torch.equal(targets[k], v) for k, v in originals.items()), f"{what}: {name} differs"
            TALLY["identical"] += 1
        else:  # all or nothing: a refused restore wrote no target byte
            assert all(not t.any() for t in targets.values()), f"{what}: {name} wrote before refusing"


def _held(cached: HostWeights, targets: dict[str, torch.Tensor]) -> Any:
    try:
        return cached.restore(targets)
    finally:
        cached.close()


# -- special files and hostile sizes -----------------------------------------------------------
def _special(kind: str, folder: Path, sample: bytes) -> Path:
    path = folder / f"{kind}.thaw"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink-loop":
        os.symlink(path, path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "unreadable":
        path.write_bytes(sample)
        path.chmod(0)
    elif kind == "name-too-long":
        path = folder / ("x" * 300 + ".thaw")
    elif kind == "not-a-folder":
        (folder / "plain").write_bytes(b"x")
        path = folder / "plain" / "child.thaw"
    elif kind == "empty":
        path.write_bytes(b"")
    return path


SPECIAL = [
    "fifo",
    "directory",
    "symlink-loop",
    "dev-zero",
    "socket",
    "unreadable",
    "name-too-long",
    "not-a-folder",
    "empty",
]


@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files(kind: str, tmp_path: Path, weights_file: dict[str, Any]) -> None:
    path = _special(kind, tmp_path, weights_file["bytes"])
    readable = kind == "unreadable" and os.geteuid() == 0  # root reads a mode-0 file anyway
    for name, fn in (
        ("read_container", lambda: read_container(path)),
        ("read_kv_manifest", lambda: read_kv_manifest(path, expect_id=OTHER_ID)),
        ("read_weights_manifest", lambda: read_weights_manifest(path)),
        ("ForkHandle.load", lambda: ForkHandle.load(path)),
        ("HostWeights.load", lambda: HostWeights.load(path)),
        ("HostWeights.map", lambda: HostWeights.map(path)),
        ("restore_tensors", lambda: restore_tensors(path, {})),
    ):
        ok, err = _call(name, fn, deadline_s=5.0)
        weights_readers = {"read_container", "read_weights_manifest", "HostWeights.load", "HostWeights.map"}
        assert not ok or (readable and name in weights_readers), f"{kind}: {name} accepted it"
        if not ok:
            assert isinstance(err, SnapshotError), err
    _check_cli(path, False, None)


def test_no_symlinks_inside_a_store(tmp_path: Path, weights_file: dict[str, Any]) -> None:
    link = tmp_path / "link.thaw"
    link.symlink_to(weights_file["path"])
    assert _call("follow", lambda: read_container(link))[0]
    ok, err = _call("nofollow", lambda: read_container(link, follow_symlinks=False))
    assert not ok and "symbolic link" in str(err)
    ok, err = _call("nofollow", lambda: read_weights_manifest(link, follow_symlinks=False))
    assert not ok and "symbolic link" in str(err)


def test_a_sparse_2_gib_region_is_verified_in_bounded_memory(
    tmp_path: Path, weights_file: dict[str, Any]
) -> None:
    """A header declaring a 2 GiB tensor over a sparse file: valid until the checksum, which is
    computed through a bounded buffer; the restore refuses the shape before allocating."""
    header, _ = snapfiles.split(weights_file["bytes"])
    huge = 2 << 30
    first = header["regions"][0]
    header["weights"]["tensors"] = header["weights"]["tensors"][:1]
    header["weights"]["tensors"][0]["shape"] = [huge // 2]
    header["weights"]["tensors"][0]["dtype"] = "bfloat16"
    header["regions"] = [{**first, "nbytes": huge}]
    header["payload_nbytes"] = huge
    snapfiles.reseal(header)  # a consistent header: the checksum is what refuses it
    path = tmp_path / "sparse.thaw"
    path.write_bytes(snapfiles.assemble(snapfiles.encode_header(header), b""))
    os.truncate(path, path.stat().st_size + huge)
    container = _call("read_container", lambda: read_container(path))[1]
    ok, err = _call("verify_regions", lambda: verify_regions(container), deadline_s=60.0)
    assert not ok and type(err).__name__ == "SnapshotChecksumError"
    ok, err = _call("restore_tensors", lambda: restore_tensors(path, {first["name"]: torch.zeros(4)}))
    assert not ok and type(err).__name__ == "SnapshotMismatchError"
    TALLY["sparse 2 GiB cases"] += 1


def test_a_mapped_file_that_shrinks_is_a_typed_error(tmp_path: Path, weights_file: dict[str, Any]) -> None:
    """Truncating a mapped file never raises SIGBUS: without CUDA, map holds a private copy and
    every restore first checks that the file is unchanged."""
    path = tmp_path / "m.thaw"
    path.write_bytes(weights_file["bytes"])
    mapped = HostWeights.map(path)
    os.truncate(path, 5000)
    targets = {k: torch.zeros_like(v) for k, v in weights_file["tensors"].items()}
    ok, err = _call("restore after truncation", lambda: mapped.restore(targets))
    assert not ok and type(err).__name__ == "SnapshotChangedError" and "map it again" in str(err)
    assert all(not t.any() for t in targets.values())
    path.write_bytes(weights_file["bytes"])  # a new file under the name: still refused
    ok, err = _call("restore after replacement", lambda: mapped.restore(targets))
    assert not ok and type(err).__name__ == "SnapshotChangedError"
    mapped.close()
    fresh = HostWeights.map(path)
    fresh.restore(targets)
    assert all(torch.equal(targets[k], v) for k, v in weights_file["tensors"].items())
    fresh.close()
