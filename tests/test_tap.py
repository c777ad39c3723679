"""Tap (admin /tap, `meshd tap`) through a real meshd: filters see only what they match
(HTTP/1.1 via curl, HTTP/2 via nghttp, gRPC), the CONTRACT's fields, two taps with
their own filters, a tap reader that never reads loses lines (counted) while traffic goes
on, the cap on taps, nothing sent by a worker when nobody taps, the CLI end to end.

One meshd (one worker: its records reach the control process in the order its requests
finished, so a last "sentinel" request proves the ones before it were all seen) serves
every test of the module."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from conftest import MeshFactory
from test_grpc import SERVICE, EchoServicer, _raw

from meshd import tap as core
from meshd.cli.tap import human, lines, open_tap, safe
from meshd.testing.harness import (
    Backend,
    KeepAliveLoad,
    Meshd,
    free_port,
    http_get,
    wait_for,
)

CONTRACT_FIELDS = {"ts", "direction", "listener", "service", "authority", "method", "path",
                   "status", "grpc_status", "latency_ms", "endpoint", "tls", "client_id",
                   "attempts"}
MESHD = [sys.executable, "-m", "meshd"]


class Env:
    def __init__(self, meshd: Meshd, backend: Backend, grpc_port: int) -> None:
        self.meshd = meshd
        self.backend = backend
        self.grpc_port = grpc_port
        self.port: int = meshd.ports["outbound"]  # type: ignore[attr-defined]
        self.admin = meshd.admin or ""


@pytest.fixture(scope="module")
def grpc_module() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(EchoServicer().unary, **_raw)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, grpc_module: int) -> Iterator[Env]:
    backend = Backend("a").start()
    factory = MeshFactory(tmp_path_factory.mktemp("tap"))
    try:
        inbound = free_port()
        m = factory.run({"web": [backend.address], "api": [backend.address],
                         "echo": [f"127.0.0.1:{grpc_module}"]}, workers=1, listeners=f"""
[[listener]]
name = "inbound"
listen = "127.0.0.1:{inbound}"
direction = "inbound"
forward = "{backend.address}"
""")
        m.ports["inbound"] = inbound  # type: ignore[attr-defined]
        yield Env(m, backend, grpc_module)
    finally:
        for m in factory.started:
            m.stop()
        backend.stop()


@pytest.fixture
def mesh_env(env: Env) -> Iterator[Env]:
    """The shared meshd, with no tap left open by the test before."""
    wait_for(lambda: env.meshd.metric("meshd_tap_clients") == 0, what="no tap open")
    before = env.meshd.log().count("Traceback")
    yield env
    assert env.meshd.log().count("Traceback") == before, env.meshd.log()[-3000:]


class Tap:
    """An admin /tap stream read by the test (``meshd.cli.tap``'s reader)."""

    def __init__(self, env: Env, query: str = "") -> None:
        self.conn, self.resp = open_tap(env.admin, "/tap" + (f"?{query}" if query else ""))
        self.seen: list[dict[str, Any]] = []

    def until(self, path: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Records up to the one of ``path`` (the sentinel), which must come in time."""
        for rec in lines(self.conn, self.resp, time.monotonic() + timeout):
            self.seen.append(rec)
            if rec.get("path") == path:
                return self.seen
        raise AssertionError(f"no record of {path} within {timeout}s; seen {self.seen}")

    def close(self) -> None:
        self.resp.close()   # the socket closes with the last of its users
        self.conn.close()


def curl(env: Env, path: str, host: str = "web", method: str = "GET") -> None:
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "-X", method, "-H", f"Host: {host}",
                    f"http://127.0.0.1:{env.port}{path}"], check=True, timeout=30)


def nghttp(env: Env, path: str, host: str = "web") -> None:
    r = subprocess.run(["nghttp", "-H", f":authority: {host}",
                        f"http://127.0.0.1:{env.port}{path}"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


# -- filters and fields ---------------------------------------------------------------------

def test_filter_sees_only_matching_requests_http1_and_h2(mesh_env: Env) -> None:
    env = mesh_env
    tap = Tap(env, "service=web&path_prefix=/match")
    try:
        curl(env, "/other")                    # web, another path
        curl(env, "/match-api", host="api")    # the path, another service
        curl(env, "/match-h1?q=1")
        nghttp(env, "/match-h2")
        curl(env, "/match-end")
        seen = tap.until("/match-end")
    finally:
        tap.close()
    assert [r["path"] for r in seen] == ["/match-h1?q=1", "/match-h2", "/match-end"]
    h1, h2 = seen[0], seen[1]
    assert set(h1) == CONTRACT_FIELDS
    assert h1["direction"] == "outbound" and h1["listener"] == "outbound"
    assert h1["service"] == "web" and h1["authority"] == "web" and h1["method"] == "GET"
    assert h1["status"] == 200 and h1["grpc_status"] == "" and h1["attempts"] == 1
    assert h1["endpoint"] == env.backend.address and h1["tls"] is False
    assert h1["client_id"] == "" and h1["latency_ms"] > 0
    assert h1["ts"].endswith("Z") and h1["ts"][:2] == "20"
    assert h2["method"] == "GET" and h2["authority"] == "web" and h2["status"] == 200
    assert h2["endpoint"] == env.backend.address


def test_direction_filter_and_inbound_fields(mesh_env: Env) -> None:
    env = mesh_env
    inbound = env.meshd.ports["inbound"]  # type: ignore[attr-defined]
    tap = Tap(env, "direction=inbound")
    try:
        curl(env, "/dir/outbound")
        assert http_get("127.0.0.1", inbound, "/dir/in", {"Host": "anything"})[0] == 200
        assert http_get("127.0.0.1", inbound, "/dir/end", {"Host": "anything"})[0] == 200
        seen = tap.until("/dir/end")
    finally:
        tap.close()
    assert [r["path"] for r in seen] == ["/dir/in", "/dir/end"]
    rec = seen[0]
    assert rec["direction"] == "inbound" and rec["listener"] == "inbound"
    assert rec["service"] == env.backend.address and rec["authority"] == "anything"
    assert rec["endpoint"] == env.backend.address and rec["status"] == 200


def test_grpc_status_and_status_filter(mesh_env: Env) -> None:
    env = mesh_env
    tap = Tap(env, "service=echo&method=POST")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{env.port}",
                                   options=[("grpc.default_authority", "echo")]) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            assert unary(b"hi", timeout=10) == b"hi"
            with pytest.raises(grpc.RpcError) as err:
                unary(b"status:NOT_FOUND:gone", timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary(f"/{SERVICE}/End")(b"", timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        seen = tap.until(f"/{SERVICE}/End")
    finally:
        tap.close()
    ok, failed = seen[0], seen[1]
    assert ok["path"] == f"/{SERVICE}/Unary" and ok["status"] == 200
    assert ok["grpc_status"] == "0" and ok["service"] == "echo"
    assert failed["grpc_status"] == "5" and seen[2]["grpc_status"] == "12"
    assert len(seen) == 3


def test_two_taps_each_with_its_filter(mesh_env: Env) -> None:
    env = mesh_env
    posts = Tap(env, "method=POST&path_prefix=/two")
    missing = Tap(env, "status=4xx&path_prefix=/status")
    try:
        curl(env, "/two/get")                       # neither
        curl(env, "/two/post", method="POST")       # posts
        curl(env, "/two/missing", host="nope")      # 503 (an unknown service): neither
        curl(env, "/status?code=200")               # neither
        curl(env, "/status?code=404")               # the backend answers 404: missing
        curl(env, "/two/end", method="POST")
        curl(env, "/status?code=410")
        seen_posts = posts.until("/two/end")
        seen_missing = missing.until("/status?code=410")
        assert env.meshd.metric("meshd_tap_clients") == 2
    finally:
        posts.close()
        missing.close()
    assert [r["path"] for r in seen_posts] == ["/two/post", "/two/end"]
    assert [(r["path"], r["status"]) for r in seen_missing] == [
        ("/status?code=404", 404), ("/status?code=410", 410)]


# -- no cost, slow readers, the cap -----------------------------------------------------------

def _wait_workers_current(env: Env) -> None:
    wait_for(lambda: env.meshd.metric("meshd_tap_workers_current") == 1,
             what="the worker applied the current tap filters")


def test_no_tap_no_record_sent(mesh_env: Env) -> None:
    env = mesh_env
    m = env.meshd
    _wait_workers_current(env)   # the last test's taps are closed and the worker knows it
    received = m.metric("meshd_tap_records_received_total")
    dropped = m.metric("meshd_tap_dropped_total")
    requests = m.metric("response_total", 'service="web"')
    for i in range(20):
        assert http_get("127.0.0.1", env.port, f"/untapped/{i}", {"Host": "web"})[0] == 200
    m.wait_metric("response_total", 'service="web"', at_least=requests + 20)
    tap = Tap(env)   # everything: the requests above would be in it, had they been sent
    try:
        curl(env, "/tapped-end")
        seen = tap.until("/tapped-end")
    finally:
        tap.close()
    assert [r["path"] for r in seen] == ["/tapped-end"]
    assert m.metric("meshd_tap_records_received_total") == received + 1
    assert m.metric("meshd_tap_dropped_total") == dropped
    wait_for(lambda: m.metric("meshd_tap_records_sent_total") >= received + 1,
             what="the worker reported what it sent")


def test_slow_reader_drops_lines_not_traffic(mesh_env: Env) -> None:
    env = mesh_env
    m = env.meshd
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(tuple(env.admin.rsplit(":", 1)[0:1]) + (int(env.admin.rsplit(":", 1)[1]),))
    slow.settimeout(10)
    slow.sendall(b"GET /tap HTTP/1.1\r\nHost: admin\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:   # its head: the worker taps; then it never reads
        chunk = slow.recv(1)
        assert chunk, "the tap closed"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200")
    fast = Tap(env, "path_prefix=/fast")
    long_path = "/slow/" + "x" * 2000
    load = KeepAliveLoad("127.0.0.1", env.port, 4, long_path, {"Host": "web"}).start()
    try:
        m.wait_metric("meshd_tap_dropped_total", 'reason="client"', at_least=1, timeout=60)
    finally:
        load.stop()
    assert load.failures == [] and load.ok > 0
    # the slow reader held nobody up: another tap gets its lines
    try:
        curl(env, "/fast-end")
        fast.until("/fast-end")
    finally:
        fast.close()
        slow.close()
    wait_for(lambda: m.metric("meshd_tap_clients") == 0, what="the slow tap closed")


def test_tap_cap(mesh_env: Env) -> None:
    env = mesh_env
    refused = env.meshd.metric("meshd_tap_refused_total")
    taps = [Tap(env) for _ in range(16)]
    try:
        status, _, body = http_get(*_admin(env), "/tap")
        assert status == 503 and b"16 taps" in body
        assert env.meshd.metric("meshd_tap_refused_total") == refused + 1
        taps.pop().close()
        wait_for(lambda: env.meshd.metric("meshd_tap_clients") == 15, what="a tap closed")
        taps.append(Tap(env))   # room again
    finally:
        for t in taps:
            t.close()


def _admin(env: Env) -> tuple[str, int]:
    host, _, port = env.admin.rpartition(":")
    return host, int(port)


def test_bad_filters_are_400(mesh_env: Env) -> None:
    for query in ("status=99", "status=6xx", "direction=sideways", "colour=red",
                  "service=a&service=b", "method=G%20T", "path_prefix=" + "x" * 5000):
        status, _, body = http_get(*_admin(mesh_env), f"/tap?{query}")
        assert status == 400, (query, body)


# -- the CLI ----------------------------------------------------------------------------------

def _drive_until_exit(env: Env, proc: subprocess.Popen[str], path: str) -> str:
    """Requests until `meshd tap --max` had what it waited for (bounded)."""
    for i in range(100):
        if proc.poll() is not None:
            break
        curl(env, f"{path}/{i}")
        time.sleep(0.1)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return out


def test_cli_json_and_text(mesh_env: Env) -> None:
    env = mesh_env
    proc = subprocess.Popen([*MESHD, "tap", "--admin", env.admin, "--service", "web",
                             "--path-prefix", "/cli-json", "-o", "json", "--max", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = _drive_until_exit(env, proc, "/cli-json")
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == 2 and all(set(r) == CONTRACT_FIELDS for r in recs)
    assert all(r["path"].startswith("/cli-json/") and r["service"] == "web" for r in recs)
    proc = subprocess.Popen([*MESHD, "tap", "--admin", env.admin, "--path-prefix", "/cli-text",
                             "--max", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out = _drive_until_exit(env, proc, "/cli-text")
    line = out.strip()
    assert " outbound web GET web /cli-text/" in line and " -> 200 " in line, line
    assert env.backend.address in line


def test_cli_duration_refusal_and_interrupt(mesh_env: Env) -> None:
    env = mesh_env
    r = subprocess.run([*MESHD, "tap", "--admin", env.admin, "--path-prefix", "/never",
                        "--duration", "0.5"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    r = subprocess.run([*MESHD, "tap", "--admin", env.admin, "--status", "700"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "refused the tap (400)" in r.stderr, r.stderr
    proc = subprocess.Popen([*MESHD, "tap", "--admin", env.admin], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: env.meshd.metric("meshd_tap_clients") == 1, what="the CLI tapping")
    proc.send_signal(2)  # Ctrl-C
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err, err


# -- the core, no meshd -----------------------------------------------------------------------

def test_filter_parsing_and_matching() -> None:
    f = core.parse_query("service=web&method=GET&path_prefix=/a&status=5xx&direction=outbound")
    assert f.matches("web", b"GET", b"/a/b", 503, "outbound")
    assert not f.matches("web", b"GET", b"/a/b", 404, "outbound")
    assert not f.matches("web", b"POST", b"/a/b", 503, "outbound")
    assert not f.matches("web", b"GET", b"/b", 503, "outbound")
    assert not f.matches("api", b"GET", b"/a", 503, "outbound")
    assert not f.matches("web", b"GET", b"/a", 503, "inbound")
    assert core.parse_query("status=404").matches("x", "PUT", "/", 404, "inbound")
    assert core.parse_query("") == core.Filter()
    version, filters = core.decode_filters(core.encode_filters(3, [f, core.Filter()]))
    assert version == 3 and filters == (f, core.Filter())


def test_terminal_output_is_escaped() -> None:
    rec = {"ts": "t", "direction": "outbound", "service": "web", "method": "GET",
           "authority": "web\x1b]0;owned\x07", "path": "/\x1b[2J", "status": 200,
           "grpc_status": "", "latency_ms": 1.5, "endpoint": "", "tls": False}
    line = human(rec, wide=True)
    assert "\x1b" not in line and "\x07" not in line and "\\x1b[2J" in line
    assert safe("a\x9bb") == "a\\x9bb"


def test_lines_are_bounded() -> None:
    raw = [1.5, "outbound", "l", "s", "a", "GET", "/\x1b" + "x" * 10, 200, "", 1.0, "", False,
           "", 1]
    line = json.loads(core.to_line(raw))
    assert set(line) == CONTRACT_FIELDS and line["ts"] == "1970-01-01T00:00:01.500Z"
    assert line["path"] == "/\x1b" + "x" * 10 and line["tls"] is False
    with pytest.raises(ValueError):
        core.to_line(raw[:-1])
    with pytest.raises(TypeError):
        core.to_line([*raw[:2], 5, *raw[3:]])
    assert core.cut_path(b"/" + b"p" * 5000).endswith("...")
    assert len(core.cut_path(b"/" + b"p" * 5000)) == core.MAX_PATH + 3
