"""[access_log] through a real meshd: a line per HTTP/1.1 and HTTP/2 request with its
fields, client input that cannot forge a line, JSON that parses, the file reopened by a
new generation after a logrotate-style rename and HUP, and config errors by key path."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from test_grpc import SERVICE, grpc_backend  # noqa: F401  (a fixture)

from meshd import config as config_mod
from meshd.errors import ConfigError
from meshd.testing.harness import http_get, wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in _lines(path)]


def _wait_line(path: Path, match, timeout: float = 20.0):
    found: list = []

    def seen() -> bool:
        for entry in _json_lines(path):
            if match(entry):
                found.append(entry)
                return True
        return False
    assert wait_for(seen, timeout=timeout), _lines(path)
    return found[0]


def _run(mesh, backends, tmp_path, fmt="json", workers=1):
    a = backends("a")
    log = tmp_path / "access.log"
    m = mesh.run({"web": [a.address]}, workers=workers,
                 extra=f'[access_log]\npath = "{log}"\nformat = "{fmt}"\n')
    return m, a, log


def test_http1_request_line_has_its_fields(mesh, backends, tmp_path):
    m, a, log = _run(mesh, backends, tmp_path)
    status, _, _ = http_get("127.0.0.1", m.ports["outbound"], "/hello?x=1",
                            {"Host": "web", "traceparent": TRACEPARENT})
    assert status == 200
    e = _wait_line(log, lambda e: e["path"] == "/hello?x=1")
    assert e["direction"] == "outbound" and e["listener"] == "outbound"
    assert e["method"] == "GET" and e["authority"] == "web" and e["status"] == 200
    assert e["endpoint"] == a.address and e["attempts"] == 1
    assert e["trace_id"] == TRACE and e["client_id"] == ""
    assert e["client"].startswith("127.0.0.1")
    assert e["duration_ms"] >= 0 and e["time"].endswith("Z")
    # an unknown service: no attempt, no endpoint, its status logged all the same
    status, _, _ = http_get("127.0.0.1", m.ports["outbound"], "/nope", {"Host": "nope"})
    assert status == 503
    e = _wait_line(log, lambda e: e["path"] == "/nope")
    assert e["status"] == 503 and e["endpoint"] == "" and e["attempts"] == 0
    assert e["trace_id"] == ""


def test_http2_request_line(mesh, backends, tmp_path):
    m, a, log = _run(mesh, backends, tmp_path)
    url = f"http://127.0.0.1:{m.ports['outbound']}/h2path"
    r = subprocess.run(["nghttp", "-H", ":authority: web", "-H", f"traceparent: {TRACEPARENT}",
                        url], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    e = _wait_line(log, lambda e: e["path"] == "/h2path")
    assert e["method"] == "GET" and e["authority"] == "web" and e["status"] == 200
    assert e["endpoint"] == a.address and e["attempts"] == 1 and e["trace_id"] == TRACE


def _raw_request(port: int, target: bytes, host: bytes = b"web") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_client_input_cannot_forge_a_line(mesh, backends, tmp_path, fmt):
    m, _, log = _run(mesh, backends, tmp_path, fmt=fmt)
    port = m.ports["outbound"]
    # What the parser lets through to the upstream: quotes, backslash, %-escaped CR/LF.
    evil = b'/x"\\%0d%0a{"status":200}"'
    assert _raw_request(port, evil).startswith(b"HTTP/1.1 200")
    # Refused ones are logged too (400), with what their request line held: DEL, high
    # bytes; a Host with a quote and a control character; a raw CR in the target.
    assert _raw_request(port, b"/bad\x7f\xff\"x").startswith(b"HTTP/1.1 400")
    assert _raw_request(port, b"/h", host=b'web"\x01 fake').startswith(b"HTTP/1.1 400")
    assert _raw_request(port, b"/cr\r" + b'{"status":200}').startswith(b"HTTP/1.1 400")
    assert _raw_request(port, b"/" + b"a" * 4000).startswith(b"HTTP/1.1 200")  # cut
    _raw_request(port, b"/last")

    def done() -> bool:
        return any("/last" in line for line in _lines(log))
    assert wait_for(done, timeout=20), _lines(log)
    lines = _lines(log)
    assert len(lines) == 6, lines
    for line in lines:
        assert all(0x20 <= ord(c) < 0x7f for c in line), line
        assert len(line) < 3000
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        assert entries[0]["path"] == evil.decode() and entries[0]["status"] == 200
        assert entries[1]["path"] == '/bad\x7f\xff"x' and entries[1]["status"] == 400
        assert entries[2]["status"] == 400 and entries[3]["status"] == 400
        assert "/cr" in entries[3]["path"]
        assert entries[4]["path"].endswith("...") and len(entries[4]["path"]) == 2048 + 3
        assert all(set(e) == set(entries[0]) for e in entries)
    else:
        assert '"/x\\"\\\\%0d%0a{\\"status\\":200}\\""' in lines[0], lines[0]
        assert '"/bad\\x7f\\xff\\"x"' in lines[1], lines[1]
        assert all(len(line.split(" ")) == 16 for line in lines if "/cr" not in line), lines


def test_text_format_line(mesh, backends, tmp_path):
    m, a, log = _run(mesh, backends, tmp_path, fmt="text")
    http_get("127.0.0.1", m.ports["outbound"], "/t", {"Host": "web"})
    assert wait_for(lambda: any('"/t"' in line for line in _lines(log)), timeout=20)
    line = next(line for line in _lines(log) if '"/t"' in line)
    parts = line.split(" ")
    assert parts[1:3] == ["outbound", "outbound"] and parts[5:8] == ['"GET"', '"web"', '"/t"']
    assert parts[8] == "200" and parts[10] == a.address and parts[12] == "1"


def test_reopened_after_rename_and_hup(mesh, backends, tmp_path):
    m, _, log = _run(mesh, backends, tmp_path, workers=2)
    http_get("127.0.0.1", m.ports["outbound"], "/before", {"Host": "web"})
    _wait_line(log, lambda e: e["path"] == "/before")
    rotated = tmp_path / "access.log.1"
    log.rename(rotated)
    m.signal(signal.SIGHUP)

    def in_new_file() -> bool:  # the old generation drains; the new one writes the new file
        http_get("127.0.0.1", m.ports["outbound"], "/after", {"Host": "web"})
        return any(e["path"] == "/after" for e in _json_lines(log))
    assert wait_for(in_new_file, timeout=30, interval=0.2), m.log()
    assert all(e["path"] != "/before" for e in _json_lines(log))
    assert any(e["path"] == "/before" for e in _json_lines(rotated))


def test_stdout(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1, extra='[access_log]\nformat = "json"\n')
    http_get("127.0.0.1", m.ports["outbound"], "/to-stdout", {"Host": "web"})
    assert wait_for(lambda: '"path":"/to-stdout"' in m.log(), timeout=20), m.log()


def _problems(tmp_path: Path, table: str) -> list[tuple[str, str]]:
    text = (f'workers = 1\nshm_dir = "{tmp_path}"\n[[listener]]\nname = "o"\n'
            f'listen = "127.0.0.1:1"\n{table}')
    with pytest.raises(ConfigError) as info:
        config_mod.parse(__import__("tomllib").loads(text))
    return info.value.problems


def test_config_errors_by_key_path(tmp_path):
    probs = dict(_problems(tmp_path, '[access_log]\nformat = "xml"\n'))
    assert "access_log.format" in probs
    probs = dict(_problems(tmp_path, f'[access_log]\npath = "{tmp_path}/no/such/a.log"\n'))
    assert "does not exist" in probs["access_log.path"]
    probs = dict(_problems(tmp_path, '[access_log]\nbogus = 1\n'))
    assert "access_log.bogus" in probs
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if not __import__("os").access(ro, __import__("os").W_OK):  # root writes anywhere
        probs = dict(_problems(tmp_path, f'[access_log]\npath = "{ro}/a.log"\n'))
        assert "not writable" in probs["access_log.path"]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'workers = 1\nshm_dir = "{tmp_path}"\n[[listener]]\nname = "o"\n'
                   f'listen = "127.0.0.1:1"\n[access_log]\npath = "{tmp_path}/x/y.log"\n')
    r = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(cfg)],
                       capture_output=True, timeout=60)
    assert r.returncode != 0 and b"access_log.path" in r.stdout + r.stderr


def test_grpc_status_from_the_response(mesh, tmp_path, grpc_backend):  # noqa: F811
    _, port = grpc_backend
    log = tmp_path / "access.log"
    m = mesh.run({"echo": [f"127.0.0.1:{port}"]}, workers=1,
                 extra=f'[access_log]\npath = "{log}"\nformat = "json"\n')
    with grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",
                               options=[("grpc.default_authority", "echo")]) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"hi", timeout=10) == b"hi"
        with pytest.raises(grpc.RpcError):
            unary(b"status:NOT_FOUND:gone", timeout=10)
    lines: list[dict] = []

    def both() -> bool:
        lines[:] = [e for e in _json_lines(log) if e["path"] == f"/{SERVICE}/Unary"]
        return len(lines) == 2
    assert wait_for(both, timeout=20), _lines(log)
    assert [(e["status"], e["grpc_status"]) for e in lines] == [(200, "0"), (200, "5")]
