"""The .thaw container reader against hostile files: each defect has its own error."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from pathlib import Path

import pytest

from thaw_agents import (
    SnapshotChecksumError,
    SnapshotFormatError,
    SnapshotNotFoundError,
    SnapshotTruncatedError,
    SnapshotVersionError,
    SnapshotWriteError,
)
from thaw_agents._container import FORMAT_VERSION, MAGIC
from thaw_agents._container_reader import read_container, verify_regions
from thaw_agents._container_writer import write_container


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.thaw"
    write_container(path, "test", {"note": "hello"}, [("a", os.urandom(5000)), ("b", os.urandom(3))])
    return path


def _raw(path: Path, header: bytes, payload: bytes = b"", magic: bytes = MAGIC) -> Path:
    """A container with this header, space-padded so the payload starts 4096-aligned (as the
    reader requires) unless the test is about something before the alignment check."""
    header += b" " * (-(16 + len(header)) % 4096)
    path.write_bytes(struct.pack("<8sQ", magic, len(header)) + header + payload)
    return path


def test_round_trip_and_owner_only(good: Path) -> None:
    container = read_container(good)
    assert container.kind == "test"
    assert [r.name for r in container.regions] == ["a", "b"]
    assert container.payload_offset % 4096 == 0
    verify_regions(container)
    assert (good.stat().st_mode & 0o777) == 0o600


def test_writer_is_deterministic(tmp_path: Path) -> None:
    data = [("x", b"\x01" * 100)]
    write_container(tmp_path / "1.thaw", "test", {"k": 1}, data)
    write_container(tmp_path / "2.thaw", "test", {"k": 1}, data)
    assert (tmp_path / "1.thaw").read_bytes() == (tmp_path / "2.thaw").read_bytes()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotNotFoundError):
        read_container(tmp_path / "nope.thaw")


def test_bad_magic(tmp_path: Path) -> None:
    with pytest.raises(SnapshotFormatError, match="magic"):
        read_container(_raw(tmp_path / "f", b"{}", magic=b"NOTTHAW!"))


def test_pickle_file_is_refused_without_unpickling(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    path = tmp_path / "model.thaw"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(SnapshotFormatError):
        read_container(path)
    assert not sentinel.exists()


def test_payload_replaced_by_pickle_fails_checksum(good: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    container = read_container(good)
    blob = pickle.dumps(Exploit()).ljust(5003, b"\0")[:5003]
    with open(good, "r+b") as handle:
        handle.seek(container.payload_offset)
        handle.write(blob)
    with pytest.raises(SnapshotChecksumError) as info:
        verify_regions(read_container(good))
    assert info.value.region == 0
    assert not sentinel.exists()


def test_header_size_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(struct.pack("<8sQ", MAGIC, 1 << 40) + b"{}")
    with pytest.raises(SnapshotFormatError, match="header size"):
        read_container(path)


def test_header_longer_than_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(struct.pack("<8sQ", MAGIC, 1000) + b"{}")
    with pytest.raises(SnapshotTruncatedError):
        read_container(path)


def test_header_not_json(tmp_path: Path) -> None:
    with pytest.raises(SnapshotFormatError, match="JSON"):
        read_container(_raw(tmp_path / "f", b"\xff\xfe not json"))


def test_header_schema(tmp_path: Path) -> None:
    header = json.dumps({"format": "thaw", "format_version": FORMAT_VERSION}).encode()
    with pytest.raises(SnapshotFormatError, match="lacks"):
        read_container(_raw(tmp_path / "f", header))


def _header(**overrides) -> bytes:
    base = {
        "format": "thaw",
        "format_version": FORMAT_VERSION,
        "kind": "test",
        "checksum_algorithm": "blake3",
        "created_by": "thaw-agents test",
        "payload_nbytes": 4,
        "regions": [{"name": "a", "offset": 0, "nbytes": 4, "checksum": "0" * 64}],
        "test": {},
    }
    base.update(overrides)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_unknown_version(tmp_path: Path) -> None:
    with pytest.raises(SnapshotVersionError, match=r"version 99; .* reads version 2 only: upgrade"):
        read_container(_raw(tmp_path / "f", _header(format_version=99), b"abcd"))


@pytest.mark.parametrize(
    ("kind", "remedy"), [("kv", "fork the prefix again"), ("weights", "freeze the model")]
)
def test_version_1_files_are_refused_with_what_to_do(tmp_path: Path, kind: str, remedy: str) -> None:
    """Version 1 kept the kind's fields beside the container's; those files are refused, named
    as such (never misread as a malformed version 2 file), with the way to re-create them."""
    old = {"format": "thaw", "format_version": 1, "kind": kind, "checksum_algorithm": "blake3",
           "payload_nbytes": 0, "regions": [], "created_by": "thaw-agents 0.1.0", "kv_spec": {}}  # fmt: skip
    with pytest.raises(
        SnapshotVersionError, match=f"version 1; this thaw-agents reads version 2 only: .*{remedy}"
    ):
        read_container(_raw(tmp_path / "f", json.dumps(old).encode()))


def test_kind_fields_cannot_stand_in_for_container_fields(tmp_path: Path) -> None:
    """A kind's fields live under its own key: a ``format_version`` or ``regions`` among them is
    the kind's business, and the container's own fields are the ones read."""
    meta = {"format_version": 99, "regions": [], "payload_nbytes": 0, "kind": "weights"}
    written = write_container(tmp_path / "k.thaw", "test", meta, [("a", b"abcd")])
    container = read_container(written.path)
    assert container.header["format_version"] == FORMAT_VERSION and container.kind == "test"
    assert container.payload_nbytes == 4 and container.meta == meta
    with pytest.raises(ValueError, match="kind"):
        write_container(tmp_path / "r.thaw", "regions", {}, [])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"note": "beside the container"}, "outside the container"),
        ({"test": None}, "lacks the 'test' object"),
        ({"test": [1]}, "must be an object"),
        ({"kind": "regions", "test": None}, "not a kind name"),
        ({"kind": "Kind/../x", "test": None}, "not a kind name"),
        ({"created_by": None}, "lacks the field 'created_by'"),
    ],
)
def test_header_holds_the_container_and_one_kind_object(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(SnapshotFormatError, match=message):
        read_container(_raw(tmp_path / "f", _header(**overrides), b"abcd"))


def test_regions_must_cover_payload(tmp_path: Path) -> None:
    with pytest.raises(SnapshotFormatError, match="cover"):
        read_container(_raw(tmp_path / "f", _header(payload_nbytes=8), b"abcdabcd"))
    gap = [{"name": "a", "offset": 4, "nbytes": 0, "checksum": "0" * 64}]
    with pytest.raises(SnapshotFormatError, match="contiguous"):
        read_container(_raw(tmp_path / "g", _header(regions=gap, payload_nbytes=0)))


def test_truncated_payload(good: Path) -> None:
    size = good.stat().st_size
    with open(good, "r+b") as handle:
        handle.truncate(size - 10)
    with pytest.raises(SnapshotTruncatedError, match="cut short"):
        read_container(good)


def test_trailing_bytes(good: Path) -> None:
    with open(good, "ab") as handle:
        handle.write(b"extra")
    with pytest.raises(SnapshotFormatError, match="unexpected bytes"):
        read_container(good)


def test_flipped_byte(good: Path) -> None:
    container = read_container(good)
    with open(good, "r+b") as handle:
        handle.seek(container.payload_offset + 5001)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    with pytest.raises(SnapshotChecksumError, match="region 1"):
        verify_regions(read_container(good))


def test_wrong_kind(good: Path) -> None:
    with pytest.raises(SnapshotFormatError, match="expected 'kv'"):
        read_container(good, expect_kind="kv")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills up at flush time leaves neither the file nor a temporary."""

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SnapshotWriteError, match="no space left on the device") as caught:
        write_container(tmp_path / "x.thaw", "test", {}, [("a", b"ok" * 100)])
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert "THAW_AGENTS_STORE" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
