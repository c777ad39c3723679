"""meshd.snapshot: the endpoint snapshot's encoding, its file and the file's name."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from meshd.discovery.api import Endpoint
from meshd.private_files import write_atomic
from meshd.snapshot import FORMAT, Snapshot, read, snapshot_path

SNAP = Snapshot(
    generation=3,
    seq=17,
    services={
        "web": (
            Endpoint("10.0.0.1", 8080, weight=3, zone="eu-1a", meshed=True),
            Endpoint("::1", 8081),
        ),
        "empty": (),
    },
    rows={"outbound": {"web": 2, "empty": 3}, "inbound": {"web": 4}},
    synced=False,
    errors={"db": "consul: connection refused"},
)


def test_round_trip_keeps_every_field() -> None:
    back = Snapshot.decode(SNAP.encode())
    assert back == SNAP
    web = back.services["web"]
    assert web[0] == Endpoint("10.0.0.1", 8080, 3, "eu-1a", True)
    assert web[1] == Endpoint("::1", 8081, 1, "", False)
    assert isinstance(web, tuple)
    assert back.services["empty"] == ()
    assert back.synced is False
    assert back.errors == {"db": "consul: connection refused"}


def test_row_lookup() -> None:
    back = Snapshot.decode(SNAP.encode())
    assert back.row("outbound", "web") == 2
    assert back.row("inbound", "web") == 4
    assert back.row("inbound", "empty") is None
    assert back.row("nope", "web") is None


def test_defaults_survive_a_round_trip() -> None:
    snap = Snapshot(generation=1, seq=0, services={}, rows={})
    back = Snapshot.decode(snap.encode())
    assert back == snap
    assert back.synced is True and back.errors == {}


def test_encoding_is_a_msgpack_map_with_its_format() -> None:
    data = msgpack.unpackb(SNAP.encode(), raw=False)
    assert data["format"] == FORMAT
    assert data["services"]["web"][0] == ["10.0.0.1", 8080, 3, "eu-1a", True, 0, "", []]
    assert data["rows"] == {"outbound": {"web": 2, "empty": 3}, "inbound": {"web": 4}}


@pytest.mark.parametrize("fmt", [FORMAT + 1, 0, None])
def test_other_format_is_refused(fmt: object) -> None:
    data = msgpack.unpackb(SNAP.encode(), raw=False)
    data["format"] = fmt
    with pytest.raises(ValueError, match=f"snapshot format {fmt!r}, expected {FORMAT}"):
        Snapshot.decode(msgpack.packb(data))


def test_missing_format_is_refused() -> None:
    with pytest.raises(ValueError, match="snapshot format None"):
        Snapshot.decode(msgpack.packb({"generation": 1}))


def test_truncated_bytes_raise_value_error() -> None:
    with pytest.raises(ValueError):
        Snapshot.decode(SNAP.encode()[:-3])


def test_write_atomic_then_read(tmp_path: Path) -> None:
    path = str(tmp_path / "meshd-demo-1-g3.snap")
    write_atomic(path, SNAP.encode())
    assert read(path) == SNAP
    assert os.listdir(tmp_path) == ["meshd-demo-1-g3.snap"]  # no temporary left behind

    newer = Snapshot(3, 18, {"web": (Endpoint("10.0.0.2", 80),)}, {"outbound": {"web": 2}})
    write_atomic(path, newer.encode())
    assert read(path) == newer
    assert os.listdir(tmp_path) == ["meshd-demo-1-g3.snap"]


def test_write_atomic_replaces_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "s.snap"
    write_atomic(str(path), SNAP.encode())
    before = path.stat().st_ino
    with open(path, "rb") as reader:  # a reader holding the old file keeps it whole
        write_atomic(str(path), b"replaced")
        assert Snapshot.decode(reader.read()) == SNAP
    assert path.read_bytes() == b"replaced"
    assert path.stat().st_ino != before


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read(str(tmp_path / "absent.snap"))


def test_snapshot_path() -> None:
    assert snapshot_path("/dev/shm", "demo", 1234, 7) == "/dev/shm/meshd-demo-1234-g7.snap"
    assert snapshot_path("/run/meshd/", "a.b", 1, 0) == "/run/meshd/meshd-a.b-1-g0.snap"
    assert snapshot_path("/d", "x", 9, 1) != snapshot_path("/d", "x", 9, 2)
    assert snapshot_path("/d", "x", 9, 1) != snapshot_path("/d", "x", 10, 1)


def test_meshed_endpoint_fields_round_trip() -> None:
    ep = Endpoint("10.0.0.9", 80, 2, "z", True, 4143, "spiffe://mesh/ns/default/sa/web",
                  (("app", "web"), ("version", "v2")))
    snap = Snapshot(generation=1, seq=1, services={"web": (ep,)}, rows={})
    assert Snapshot.decode(snap.encode()).services["web"] == (ep,)
