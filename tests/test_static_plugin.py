"""The static plugin's endpoints file: reloaded on change (TOML and JSON), fail static on
an invalid or missing file with the file and key path in the error, and a real meshd
whose traffic follows an edit of the file."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from meshd_static import StaticBackend, StaticFileError
from meshd_static.endpoints_file import EndpointsFile

from meshd.discovery import Endpoint, NoSuchService, Reset
from meshd.errors import ConfigError
from meshd.testing.harness import http_get, wait_for
from meshd.testing.watch import WatchRecorder

FAST = "50ms"


def write(path: Path, text: str) -> None:
    """As a careful operator does: a temporary file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def addrs(eps: tuple[Endpoint, ...]) -> list[str]:
    return [str(e) for e in eps]


def wait_polls(path: Path, n: int = 3, timeout: float = 10.0) -> None:
    """Wait until the file's poller has looked at ``path`` ``n`` more times (each look is
    an os.stat, ``interval`` apart): whatever the last change made the watches yield is
    yielded by then. The barrier before asserting that nothing more came."""
    looks: list[float] = []
    real_stat = os.stat

    def counting_stat(p, *a, **kw):
        if str(p) == str(path):
            looks.append(time.monotonic())
        return real_stat(p, *a, **kw)

    os.stat = counting_stat  # type: ignore[assignment]
    try:
        wait_for(lambda: len(looks) >= n, timeout, what=f"{n} looks at {path}")
    finally:
        os.stat = real_stat


@pytest.fixture
def recorders():
    started: list[WatchRecorder] = []

    def start(backend: StaticBackend, service: str) -> WatchRecorder:
        rec = WatchRecorder(backend, service)
        started.append(rec)
        return rec

    yield start
    for rec in started:
        rec.close(timeout=2)


def test_toml_file_edits_are_followed(tmp_path, recorders) -> None:
    path = tmp_path / "endpoints.toml"
    write(path, 'web = ["10.0.0.1:80"]\napi = ["10.0.1.1:80"]\n')
    backend = StaticBackend("local", {"file": str(path), "interval": FAST,
                                      "services": {"db": ["10.0.2.1:5432"]}})
    assert tuple(backend.services()) == ("db", "web", "api")
    web, api, db = recorders(backend, "web"), recorders(backend, "api"), recorders(backend, "db")
    assert web.next() == Reset((Endpoint("10.0.0.1", 80),))
    assert db.next() == Reset((Endpoint("10.0.2.1", 5432),))
    api.next()

    write(path, 'web = ["10.0.0.1:80", { address = "10.0.0.2:80", weight = 3, zone = "b" }]\n'
                'api = ["10.0.1.1:80"]\n')
    assert web.next(2) == Reset((Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80, 3, "b")))
    write(path, 'web = []\n')                          # api removed from the file
    assert web.next(2) == Reset(())
    assert api.next(2) == NoSuchService()
    write(path, 'web = []\napi = ["10.0.1.9:80"]\n')   # and back
    assert api.next(2) == Reset((Endpoint("10.0.1.9", 80),))
    wait_polls(path)
    # Only changes are yielded: web's entries did not change, db is inline.
    assert [len(web.updates), len(api.updates), len(db.updates)] == [3, 3, 1]


def test_json_file_with_every_entry_form(tmp_path, recorders) -> None:
    path = tmp_path / "endpoints.json"
    write(path, json.dumps({"web": ["[::1]:8080", {"address": "10.0.0.5:80", "weight": 0,
                                                   "zone": "a", "meshed": True}]}))
    backend = StaticBackend("local", {"file": str(path), "interval": FAST})
    rec = recorders(backend, "web")
    assert rec.next() == Reset((Endpoint("::1", 8080), Endpoint("10.0.0.5", 80, 0, "a", True)))
    write(path, json.dumps({"web": ["10.0.0.6:80"]}))
    assert addrs(rec.wait_for(lambda eps: len(eps) == 1 and eps[0].port == 80, 2)) == ["10.0.0.6:80"]
    assert recorders(backend, "nope").next() == NoSuchService()


def test_invalid_file_keeps_last_good_and_names_file_and_key(tmp_path, recorders) -> None:
    path = tmp_path / "endpoints.toml"
    write(path, 'web = ["10.0.0.1:80"]\n')
    backend = StaticBackend("local", {"file": str(path), "interval": FAST})
    rec = recorders(backend, "web")
    rec.next()
    write(path, 'web = ["10.0.0.1:80", "nohost", { address = "10.0.0.2:80", port = 1 }]\n')
    err = rec.wait_error(2)
    assert isinstance(err, StaticFileError)
    assert str(err) == (f'{path}: web[1]: expected "host:port" (IPv6 as "[::1]:port"), got '
                        f"'nohost'; web[2]: unknown key 'port' (keeping the last good endpoints)")
    assert addrs(rec.endpoints) == ["10.0.0.1:80"]   # what meshd keeps using

    # meshd restarts the watch after a backoff: it waits quietly for the next change
    # (no error storm) and yields the first good content at once.
    again = recorders(backend, "web")
    wait_polls(path)
    assert again.updates == [] and again.error is None
    write(path, "web = [")                           # still broken, differently: raised
    assert "invalid TOML" in str(again.wait_error(2))
    third = recorders(backend, "web")
    write(path, 'web = ["10.0.0.3:80"]\n')
    assert third.next(2) == Reset((Endpoint("10.0.0.3", 80),))


def test_file_that_disappears_and_returns(tmp_path, recorders) -> None:
    path = tmp_path / "endpoints.toml"
    write(path, 'web = ["10.0.0.1:80"]\n')
    backend = StaticBackend("local", {"file": str(path), "interval": FAST})
    rec = recorders(backend, "web")
    rec.next()
    path.unlink()
    assert str(rec.wait_error(2)) == (f"{path}: cannot read: No such file or directory "
                                      f"(keeping the last good endpoints)")
    again = recorders(backend, "web")
    write(path, 'web = ["10.0.0.1:80"]\n')            # the same content: yielded, error cleared
    assert again.next(2) == Reset((Endpoint("10.0.0.1", 80),))


def test_missing_file_at_start(tmp_path, recorders) -> None:
    path = tmp_path / "later.toml"
    backend = StaticBackend("local", {"file": str(path), "interval": FAST,
                                      "services": {"db": ["10.0.2.1:5432"]}})
    assert tuple(backend.services()) == ("db",)       # logged; the inline services still run
    assert "cannot read" in str(recorders(backend, "web").wait_error(1))
    rec = recorders(backend, "web")
    write(path, 'web = ["10.0.0.1:80"]\n')
    assert rec.next(2) == Reset((Endpoint("10.0.0.1", 80),))


def test_a_service_inline_and_in_the_file_is_refused(tmp_path, recorders) -> None:
    path = tmp_path / "endpoints.json"
    write(path, '{"db": ["10.0.0.1:80"], "web": "10.0.0.1:80", "x": [1]}')
    backend = StaticBackend("local", {"file": str(path), "services": {"db": []}})
    err = str(recorders(backend, "web").wait_error(1))
    assert err.startswith(f"{path}: web: expected a list of endpoints; x[0]: expected ")
    assert "db: also given inline under services" in err
    write(path, "[1, 2]")
    assert "(top level): expected a table" in str(recorders(backend, "web").wait_error(1))


def test_options_are_validated_without_io(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        StaticBackend("local", {"file": 3, "interval": "1", "servicez": {}})
    assert info.value.problems == [
        ("servicez", "unknown key"),
        ("interval", 'expected a duration with a unit (ms, s, m, h) like "10s", got \'1\''),
        ("file", "expected a file path, got 3"),
    ]
    with pytest.raises(ConfigError, match="interval: only used with file"):
        StaticBackend("local", {"interval": "1s"})
    with pytest.raises(ConfigError, match="interval: must be between"):
        StaticBackend("local", {"file": "x.toml", "interval": "2h"})
    StaticBackend("local", {"file": str(tmp_path / "does-not-exist-yet.toml")})


def test_an_edit_parses_only_the_services_that_changed(tmp_path) -> None:
    path = tmp_path / "endpoints.toml"
    write(path, 's0 = ["10.0.0.1:80"]\ns1 = ["10.0.0.2:80"]\n')
    file = EndpointsFile(str(path), 1.0, threading.Event())
    before = file.check().services
    write(path, 's0 = ["10.0.0.1:80"]\ns1 = ["10.0.0.3:80"]\ns2 = []\n')
    after = file.check().services
    assert before is not None and after is not None
    assert after["s0"] is before["s0"]                 # kept, not parsed again
    assert list(after) == ["s0", "s1", "s2"] and addrs(after["s1"]) == ["10.0.0.3:80"]


def test_many_watches_share_one_poller_and_close_promptly(tmp_path) -> None:
    path = tmp_path / "endpoints.toml"
    write(path, "".join(f's{i} = ["10.0.0.1:{1000 + i}"]\n' for i in range(100)))
    backend = StaticBackend("local", {"file": str(path), "interval": FAST})
    recs = [WatchRecorder(backend, f"s{i}") for i in range(100)]
    for rec in recs:
        rec.next()
    stats = []
    real_stat = os.stat

    def counting_stat(p, *a, **kw):
        if str(p) == str(path):
            stats.append(time.monotonic())
        return real_stat(p, *a, **kw)

    os.stat = counting_stat  # type: ignore[assignment]
    try:
        time.sleep(0.5)
    finally:
        os.stat = real_stat
    assert len(stats) <= 12, len(stats)               # ~ one per 50 ms, not 100 per 50 ms
    write(path, "".join(f's{i} = ["10.0.0.2:{1000 + i}"]\n' for i in range(100)))
    for rec in recs:
        rec.wait_for(lambda eps: addrs(eps)[0].startswith("10.0.0.2:"), 2)
    started = time.monotonic()
    backend.close()
    for rec in recs:
        rec._thread.join(5)
        assert not rec._thread.is_alive()
    assert time.monotonic() - started < 5.0  # promptly: no watch waits out a poll or a join
    assert threading.active_count() < 20


def test_meshd_follows_an_edit_of_the_file_within_seconds(mesh, backends, tmp_path) -> None:
    a, b = backends("a"), backends("b")
    path = tmp_path / "endpoints.toml"
    write(path, f'web = ["{a.address}"]\n')
    text, ports = mesh.config({}, workers=1)
    text = text.replace('plugin = "static"\n', f'plugin = "static"\nfile = "{path}"\n')
    m = mesh.start(text, ports)

    def who(host: str = "web") -> str:
        status, headers, _ = http_get("127.0.0.1", ports["outbound"], "/", {"Host": host})
        return headers.get("x-backend", f"status {status}")

    assert {who() for _ in range(5)} == {"a"}
    started = time.monotonic()
    write(path, f'web = ["{b.address}"]\napi = ["{a.address}"]\n')   # default interval: 1s
    wait_for(lambda: {who() for _ in range(5)} == {"b"}, timeout=5, interval=0.02,
             what="traffic to move to b")
    assert time.monotonic() - started < 5.0  # the 1 s interval, a publish, a worker poll
    assert who("api") == "a"                           # a new service: watched on demand

    write(path, "web = [")                             # broken: traffic stays on b
    wait_for(lambda: "invalid TOML" in m.log(), timeout=3, what="the error in the log")
    m.wait_snapshot_loaded()  # whatever the control process published since, workers have
    assert {who() for _ in range(5)} == {"b"}
    _, _, raw = http_get("127.0.0.1", ports["admin"], "/endpoints")
    assert "invalid TOML" in json.loads(raw)["services"]["web"]["sources"]["local"]["error"]
    write(path, f'web = ["{a.address}"]\n')            # fixed: followed again
    wait_for(lambda: {who() for _ in range(5)} == {"a"}, timeout=3, interval=0.02,
             what="traffic to move back to a")


def test_knows_answers_from_memory(tmp_path) -> None:
    path = tmp_path / "endpoints.toml"
    path.write_text('api = ["127.0.0.1:9000"]\n')
    backend = StaticBackend("local", {"services": {"web": ["127.0.0.1:8080"]},
                                      "file": str(path)})
    try:
        assert backend.knows("web") is True
        assert backend.knows("api") is None               # the file is not read yet
        assert set(backend.services()) == {"web", "api"}  # meshd reads it at start
        assert (backend.knows("api"), backend.knows("junk")) == (True, False)
        inline_only = StaticBackend("x", {"services": {"web": ["127.0.0.1:8080"]}})
        assert (inline_only.knows("web"), inline_only.knows("junk")) == (True, False)
    finally:
        backend.close()
