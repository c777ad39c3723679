"""What a client may claim and what meshd says of itself (issue 11, items 10-12), through
a real meshd: ``[[listener]] forwarded`` (a spoofed X-Forwarded-For / Forwarded replaced
on inbound listeners, appended or kept when asked, kept on outbound ones), for HTTP/1.1
(curl), HTTP/2 (curl with prior knowledge) and gRPC (grpcio, HTTP/2 end to end); an
upstream's own ``meshd-error`` removed from heads and trailers; meshd's inbound error
answers naming no internal address while the log keeps it; and the log lines a client
triggers at will rate-limited per listener."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from meshd.config import parse
from meshd.errors import ConfigError
from meshd.proto.forwarded import apply
from meshd.ratelog import BURST, INTERVAL
from meshd.testing.harness import free_port, read_head, wait_for
from meshd.testing.tcp_server import TcpServer

LISTENER = """
[[listener]]
name = "{name}"
listen = "{listen}"
direction = "inbound"
protocol = "http"
forward = "{app}"
{extra}
"""
SPOOF = {"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6;proto=https"}


def _curl(url: str, *args: str, h2: bool = False) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "-m", "10", *(["--http2-prior-knowledge"] if h2 else []),
                           *args, url], capture_output=True, timeout=30)


def _seen(url: str, h2: bool = False, headers: dict[str, str] | None = None) -> dict[str, str]:
    """The request headers the backend saw (its /headers route), sent with ``headers``."""
    args = [a for k, v in (SPOOF if headers is None else headers).items() for a in ("-H", f"{k}: {v}")]
    r = _curl(url + "/headers", *args, h2=h2)
    assert r.returncode == 0, r.stderr
    seen: dict[str, str] = json.loads(r.stdout)
    return seen


# -- sans-IO and config -------------------------------------------------------------------

def test_apply_modes() -> None:
    head = [(b"Host", b"a"), (b"X-Forwarded-For", b"1.1.1.1"), (b"Accept", b"*/*"),
            (b"x-forwarded-for", b"2.2.2.2"), (b"FORWARDED", b"for=1.1.1.1")]
    assert apply(head, "keep", b"10.0.0.1") == head
    assert apply(head, "replace", b"10.0.0.1") == [
        (b"Host", b"a"), (b"Accept", b"*/*"), (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Forwarded", b"for=10.0.0.1")]
    assert apply(head, "append", b"10.0.0.1") == [
        (b"Host", b"a"), (b"Accept", b"*/*"), (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2, 10.0.0.1"),
        (b"Forwarded", b"for=1.1.1.1, for=10.0.0.1")]
    # RFC 7239 §6: an IPv6 node is quoted and bracketed; HTTP/2 names are lower-case
    assert apply([(b":path", b"/")], "append", b"::1", h2=True) == [
        (b":path", b"/"), (b"x-forwarded-for", b"::1"), (b"forwarded", b'for="[::1]"')]
    # the peer unknown (the client left): replace still drops the client's claims
    assert apply(head, "replace", b"") == [(b"Host", b"a"), (b"Accept", b"*/*")]
    assert apply(head, "append", b"") == head


def test_config_default_by_direction_and_bad_value() -> None:
    inbound = {"name": "in", "listen": "127.0.0.1:4143", "direction": "inbound",
               "forward": "127.0.0.1:8080"}
    out = {"name": "out", "listen": "127.0.0.1:4140"}
    config = parse({"listener": [out, inbound, dict(inbound, name="in2", forwarded="append",
                                                    listen="127.0.0.1:4144")]})
    assert [lst.forwarded for lst in config.listeners] == ["keep", "replace", "append"]
    with pytest.raises(ConfigError) as info:
        parse({"listener": [out, dict(inbound, forwarded="strip")]})
    assert info.value.problems == [
        ("listener[1].forwarded", 'expected one of "replace", "append", "keep", got \'strip\'')]


# -- item 10: X-Forwarded-For / Forwarded ---------------------------------------------------

@pytest.fixture
def listeners(mesh, backends) -> Iterator[dict[str, str]]:
    """One meshd with an outbound listener to service web, and inbound listeners to the
    same backend: "in" (default), "in6" on [::1] (default), "append", "keep".
    Yields their base URLs."""
    app = backends("app").address
    ports = {name: free_port("::1" if name == "in6" else "127.0.0.1")
             for name in ("in", "in6", "append", "keep")}
    extra = {"append": 'forwarded = "append"', "keep": 'forwarded = "keep"'}
    text = "".join(LISTENER.format(name=name, app=app, extra=extra.get(name, ""),
                                   listen=f"[::1]:{port}" if name == "in6" else f"127.0.0.1:{port}")
                   for name, port in ports.items())
    m = mesh.run({"web": [app]}, workers=1, listeners=text)
    urls = {name: (f"http://[::1]:{port}" if name == "in6" else f"http://127.0.0.1:{port}")
            for name, port in ports.items()}
    urls["outbound"] = f"http://127.0.0.1:{m.ports['outbound']}"
    yield urls


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "h2"])
def test_spoofed_forwarded_fields_are_replaced_on_inbound(listeners, h2) -> None:
    seen = _seen(listeners["in"], h2)
    assert (seen["x-forwarded-for"], seen["forwarded"]) == ("127.0.0.1", "for=127.0.0.1"), seen
    seen = _seen(listeners["in6"], h2)
    assert (seen["x-forwarded-for"], seen["forwarded"]) == ("::1", 'for="[::1]"'), seen
    # none sent: the peer's address is added all the same
    seen = _seen(listeners["in"], h2, headers={})
    assert (seen["x-forwarded-for"], seen["forwarded"]) == ("127.0.0.1", "for=127.0.0.1"), seen


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "h2"])
def test_append_and_keep(listeners, h2) -> None:
    seen = _seen(listeners["append"], h2)
    assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.1", seen
    assert seen["forwarded"] == "for=6.6.6.6;proto=https, for=127.0.0.1", seen
    seen = _seen(listeners["keep"], h2)
    assert (seen["x-forwarded-for"], seen["forwarded"]) == ("6.6.6.6", "for=6.6.6.6;proto=https")
    # outbound listeners keep them by default (the client is the local application)
    seen = _seen(listeners["outbound"], h2, headers={**SPOOF, "Host": "web"})
    assert (seen["x-forwarded-for"], seen["forwarded"]) == ("6.6.6.6", "for=6.6.6.6;proto=https")


class _Metadata:
    """A gRPC service answering with the request's x-forwarded-for / forwarded."""

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = dict(context.invocation_metadata())
        return json.dumps({k: md.get(k) for k in ("x-forwarded-for", "forwarded")}).encode()


@pytest.fixture
def grpc_app() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(_Metadata().unary)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("meshd.test.Md", {"Unary": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_grpc_on_inbound_gets_the_peer_address(mesh, grpc_app) -> None:
    port = free_port()
    m = mesh.run({}, workers=1, listeners=LISTENER.format(
        name="in", listen=f"127.0.0.1:{port}", app=f"127.0.0.1:{grpc_app}", extra=""))
    assert m
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/meshd.test.Md/Unary")
        answer = json.loads(call(b"", timeout=10, metadata=(("x-forwarded-for", "6.6.6.6"),
                                                            ("forwarded", "for=6.6.6.6"))))
    assert answer == {"x-forwarded-for": "127.0.0.1", "forwarded": "for=127.0.0.1"}


# -- item 11: meshd-error ----------------------------------------------------------------

def _forging_upstream(conn: socket.socket) -> None:
    """An HTTP/1.1 upstream that claims meshd's error header in its head and trailers."""
    with conn:
        conn.settimeout(10)
        try:
            while read_head(conn):
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nmeshd-error: forged\r\n"
                             b"Transfer-Encoding: chunked\r\nTrailer: meshd-error\r\n\r\n"
                             b"3\r\nbad\r\n0\r\nmeshd-error: forged-trailer\r\nx-t: kept\r\n\r\n")
        except OSError:
            pass


@pytest.fixture
def forging(mesh) -> Iterator[str]:
    with TcpServer(_forging_upstream) as up:
        m = mesh.run({"web": [up.address]}, workers=1,
                     extra='[service.web]\nretries = 0\nfailure_accrual = 0')
        yield f"127.0.0.1:{m.ports['outbound']}"


def test_upstream_meshd_error_is_removed_http1(forging) -> None:
    host, port = forging.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\nTE: trailers\r\n\r\n")
        data = read_head(s, b"\r\n0\r\n")
        data += read_head(s, b"\r\n\r\n") if not data.endswith(b"\r\n\r\n") else b""
    assert data.startswith(b"HTTP/1.1 502"), data
    assert b"x-t: kept" in data, data  # the trailers arrived, without the forged one
    assert b"forged" not in data, data


def test_upstream_meshd_error_is_removed_h2(forging) -> None:
    r = _curl(f"http://{forging}/", "-D", "-", "-H", "Host: web", h2=True)
    assert r.stdout.startswith(b"HTTP/2 502"), r.stdout
    assert b"x-t: kept" in r.stdout, r.stdout  # curl shows the trailers after the body
    assert b"forged" not in r.stdout, r.stdout


class _Forger:
    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.send_initial_metadata((("meshd-error", "forged"),))
        context.set_trailing_metadata((("meshd-error", "forged-trailer"), ("x-t", "kept")))
        return b"ok"


def test_upstream_meshd_error_is_removed_grpc(mesh) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(_Forger().unary)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("meshd.test.F", {"Unary": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        m = mesh.run({"f": [f"127.0.0.1:{port}"]}, workers=1)
        with grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",
                                   options=[("grpc.default_authority", "f")]) as ch:
            _, call = ch.unary_unary("/meshd.test.F/Unary").with_call(b"", timeout=10)
            initial, trailing = dict(call.initial_metadata()), dict(call.trailing_metadata())
    finally:
        server.stop(0)
    assert trailing.get("x-t") == "kept", trailing
    assert "meshd-error" not in initial and "meshd-error" not in trailing, (initial, trailing)


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "h2"])
def test_inbound_error_names_no_internal_address(mesh, h2) -> None:
    port, dead = free_port(), free_port()  # nothing listens on the application's port
    m = mesh.run({}, workers=1, listeners=LISTENER.format(
        name="in", listen=f"127.0.0.1:{port}", app=f"127.0.0.1:{dead}", extra=""))
    r = _curl(f"http://127.0.0.1:{port}/", "-D", "-", h2=h2)
    assert re.match(rb"HTTP/[12.]+ 502", r.stdout), r.stdout
    assert re.search(rb"(?i)meshd-error: upstream failure\r\n", r.stdout), r.stdout
    assert b"127.0.0.1" not in r.stdout and str(dead).encode() not in r.stdout, r.stdout
    # the log has the detail
    wait_for(lambda: f"127.0.0.1:{dead}" in m.log(), what="the detail in the log")


def test_peer_meshd_error_passes_and_names_no_address(mesh) -> None:
    """meshd-to-meshd: B's own (generic) error reaches A's client; A keeps a peer
    meshd's meshd-error (B removed its application's)."""
    dead = free_port()
    a, b = _two_meshds(mesh, f"127.0.0.1:{dead}")
    r = _curl(f"http://127.0.0.1:{a.ports['outbound']}/", "-D", "-", "-H", "Host: web")
    assert r.stdout.startswith(b"HTTP/1.1 502"), r.stdout
    assert re.search(rb"(?i)meshd-error: upstream failure\r\n", r.stdout), r.stdout
    assert str(dead).encode() not in r.stdout, r.stdout
    wait_for(lambda: f"127.0.0.1:{dead}" in b.log(), what="the detail in B's log")


def _two_meshds(mesh, app: str) -> tuple[Any, Any]:
    """(A, B): A's outbound routes service web to ``app``, meshed behind B's inbound
    listener, which forwards to ``app`` (as tests/test_meshd_to_meshd.py)."""
    inbound = free_port()
    text_b, ports_b = mesh.config({}, workers=1, listeners=LISTENER.format(
        name="in", listen=f"127.0.0.1:{inbound}", app=app, extra=""))
    b = mesh.start(text_b, ports_b)
    meshed = f'{{ address = "{app}", meshed = true, inbound_port = {inbound} }}'
    text_a, ports_a = mesh.config({}, workers=1, extra="[service.web]\nretries = 0")
    text_a = text_a.replace("[discovery.services]\n", f"[discovery.services]\nweb = [{meshed}]\n")
    return mesh.start(text_a, ports_a), b


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "h2"])
def test_meshd_to_meshd_app_sees_the_calling_meshd(mesh, backends, h2) -> None:
    """Through A (outbound, keep) and B (inbound, replace) the application sees the
    address B accepted the connection from: A's host (here 127.0.0.1), never the
    client's claim."""
    a, _ = _two_meshds(mesh, backends("app").address)
    seen = _seen(f"http://127.0.0.1:{a.ports['outbound']}", h2, headers={**SPOOF, "Host": "web"})
    assert (seen["x-forwarded-for"], seen["forwarded"]) == ("127.0.0.1", "for=127.0.0.1"), seen


# -- item 12: rate-limited log lines ---------------------------------------------------------

def _lines(text: str, needle: str) -> int:
    return sum(1 for line in text.splitlines() if needle in line)


def test_unknown_services_and_malformed_heads_log_a_burst(mesh) -> None:
    """2,000 requests for an unknown service log at most BURST lines, 200 malformed heads
    at most BURST more, 200 opaque connections to an unknown service BURST more; after
    the interval, the next line is preceded by the count of those suppressed."""
    tcp = free_port()
    m = mesh.run({}, workers=1, top='discovery_wait = "0s"', listeners=f"""
[[listener]]
name = "db"
listen = "127.0.0.1:{tcp}"
protocol = "tcp"
service = "nowhere"
""")
    port = m.ports["outbound"]
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        for _ in range(2000):
            s.sendall(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
            status = f.readline()
            assert status.startswith(b"HTTP/1.1 503"), status
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            assert read_head(s).startswith(b"HTTP/1.1 400")
    closed = m.metric("tcp_close_total", 'listener="db"')
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", tcp), timeout=10) as s:
            s.settimeout(10)
            assert s.recv(1) == b""  # closed: no destination
    wait_for(lambda: m.metric("tcp_close_total", 'listener="db"') >= closed + 200,
             what="the opaque connections counted closed")
    log = m.log()
    # a burst per interval (on a busy machine the loops may outlast one)
    burst = BURST * (1 + int((time.monotonic() - started) // INTERVAL))
    assert 1 <= _lines(log, "outbound 503: unknown service") <= burst, log[-3000:]
    assert 1 <= _lines(log, "outbound 400") <= burst, log[-3000:]
    assert 1 <= _lines(log, "db: unknown service") <= burst, log[-3000:]
    # once the interval has passed, the next line says how many were left out
    wait_for(lambda: _one_more(port) and "suppressed" in m.log(), timeout=INTERVAL + 20,
             interval=1.0, what="the suppression line")
    found = re.search(r"outbound: NoService: (\d+) more similar lines suppressed", m.log())
    assert found and int(found.group(1)) >= 2000 - BURST, m.log()[-3000:]


def _one_more(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
        read_head(s)
    return True
