"""protocol = "auto" listeners against real meshd processes: HTTP/1 goes through the HTTP
proxy, TLS and unknown bytes are tunneled opaque with the bytes read for detection sent
first, a silent client (server-speaks-first protocol) is tunneled once detect_timeout
passes, opaque_ports skip detection, HTTP/2 prior knowledge reaches the HTTP/2 server,
and meshd_protocol_detect_total counts each result."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from meshd.testing.certs import TestCA
from meshd.testing.harness import free_port, http_get, wait_for
from meshd.testing.tcp_server import TcpServer

RESULTS = ("http1", "h2", "tls", "opaque", "timeout", "skipped", "tunnel", "tunnel_refused")
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BANNER = b"220 banner.test ESMTP ready\r\n"


# -- backends -----------------------------------------------------------------------------

def _closing(handle: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    """``handle``, then the connection closed (TcpServer leaves that to its handler)."""
    def run(sock: socket.socket) -> None:
        with sock:
            handle(sock)
    return run


def _echo(sock: socket.socket) -> None:
    try:
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _banner_then_echo(sock: socket.socket) -> None:
    sock.sendall(BANNER)
    _echo(sock)


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[socket.socket], None]], TcpServer]]:
    started: list[TcpServer] = []

    def start(handle: Callable[[socket.socket], None]) -> TcpServer:
        s = TcpServer(_closing(handle))
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


class _TlsEcho:
    """A TLS echo server; records the SNI each handshake carried."""

    def __init__(self, cert: str, key: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.sni: list[str | None] = []
        self.ctx.sni_callback = self._sni
        self.tcp = TcpServer(_closing(self._handle))
        self.address = self.tcp.address

    def _sni(self, _sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    def _handle(self, raw: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                while data := tls.recv(65536):
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass

    def stop(self) -> None:
        self.tcp.close()


# -- helpers ------------------------------------------------------------------------------

def _listener(name: str, port: int, *, direction: str = "inbound", forward: str | None = None,
              service: str | None = None, extra: str = "") -> str:
    lines = ["", "[[listener]]", f'name = "{name}"', f'listen = "127.0.0.1:{port}"',
             f'direction = "{direction}"', 'protocol = "auto"']
    if forward:
        lines.append(f'forward = "{forward}"')
    if service:
        lines.append(f'service = "{service}"')
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def _limits(detect_timeout: str = "300ms") -> str:
    return f'[limits]\ndetect_timeout = "{detect_timeout}"\n'


def detect_counts(m: object, listener: str) -> dict[str, int]:
    """meshd_protocol_detect_total of one listener, result -> value (missing: 0)."""
    _, _, body = http_get("127.0.0.1", m.ports["admin"], "/metrics")  # type: ignore[attr-defined]
    counts = dict.fromkeys(RESULTS, 0)
    prefix = f'meshd_protocol_detect_total{{listener="{listener}",result="'
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            counts[line[len(prefix):].split('"')[0]] = int(line.split()[-1])
    return counts


def expect_counts(m: object, listener: str, **expected: int) -> None:
    want = dict.fromkeys(RESULTS, 0) | expected
    wait_for(lambda: detect_counts(m, listener) == want, timeout=5,
             what=f"detect counters {want}")


def recv_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    got = bytearray()
    while len(got) < limit and (data := sock.recv(65536)):
        got += data
    return bytes(got)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = sock.recv(n - len(got))
        if not data:
            break
        got += data
    return bytes(got)


# -- HTTP/1 -------------------------------------------------------------------------------

def test_auto_listener_carries_http1(mesh, backends) -> None:
    b = backends("a")
    inbound, outbound = free_port(), free_port()
    m = mesh.run({"web": [b.address]},
                 listeners=_listener("in", inbound, forward=b.address)
                 + _listener("out", outbound, direction="outbound"),
                 extra=_limits())
    # curl through the inbound (forward) and the outbound (by Host) auto listeners
    out = subprocess.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{inbound}/curl"],
                         capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"a /curl\n"
    out = subprocess.run(["curl", "-sS", "-m", "5", "-H", "Host: web",
                          f"http://127.0.0.1:{outbound}/routed"], capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"a /routed\n"
    # a raw client whose request line arrives in pieces (detection needs more bytes twice),
    # then a second request on the same keep-alive connection
    with socket.create_connection(("127.0.0.1", inbound), timeout=5) as s:
        for piece in (b"GE", b"T /raw HT", b"TP/1.1\r\nHost: x\r\n\r\n"):
            s.sendall(piece)
            time.sleep(0.05)
        f = s.makefile("rb")
        assert f.readline() == b"HTTP/1.1 200 OK\r\n"
        length = 0
        while (line := f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        assert f.read(length) == b"a /raw\n"
        s.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert f.read().endswith(b"a /again\n")
    expect_counts(m, "in", http1=2)
    expect_counts(m, "out", http1=1)
    _, _, metrics = http_get("127.0.0.1", m.ports["admin"], "/metrics")
    assert b"# TYPE meshd_protocol_detect_total counter" in metrics
    assert b'meshd_protocol_detect_total{listener="outbound"' not in metrics  # protocol = "http"


def test_request_line_slower_than_detect_timeout_is_still_http(mesh, backends) -> None:
    b = backends("a")
    port = free_port()
    m = mesh.run({}, listeners=_listener("in", port, forward=b.address), extra=_limits("200ms"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /sl")
        time.sleep(0.5)  # past detect_timeout: a method, a space and a target are HTTP/1
        s.sendall(b"ow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = recv_all(s)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"a /slow\n"), reply
    expect_counts(m, "in", http1=1)


# -- opaque: server speaks first, unknown bytes, TLS --------------------------------------

def test_server_speaks_first_gets_its_banner_after_detect_timeout(mesh, servers) -> None:
    backend = servers(_banner_then_echo)
    port = free_port()
    m = mesh.run({}, listeners=_listener("in", port, forward=backend.address),
                 extra=_limits("300ms"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        start = time.monotonic()
        banner = recv_exactly(s, len(BANNER))
        elapsed = time.monotonic() - start
        assert banner == BANNER
        assert 0.25 <= elapsed < 0.3 + 4, elapsed  # detection waited, then tunneled
        s.sendall(b"EHLO client\r\n")
        assert recv_exactly(s, 13) == b"EHLO client\r\n"
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
    expect_counts(m, "in", timeout=1)


def test_unknown_bytes_are_tunneled_with_the_detected_prefix(mesh, servers) -> None:
    backend = servers(_echo)
    inbound, outbound = free_port(), free_port()
    m = mesh.run({"db": [backend.address]},
                 listeners=_listener("in", inbound, forward=backend.address)
                 + _listener("out", outbound, direction="outbound", service="db"),
                 extra=_limits())
    payload = b"\x00\x01binary protocol\xff" + bytes(range(256)) * 64  # past the 1 KiB peek
    for port in (inbound, outbound):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == payload
    expect_counts(m, "in", opaque=1)
    expect_counts(m, "out", opaque=1)
    _, _, metrics = http_get("127.0.0.1", m.ports["admin"], "/metrics")
    lines = metrics.decode().splitlines()
    read = [ln for ln in lines if ln.startswith('tcp_read_bytes_total{direction="outbound",'
                                                'listener="out",service="db"}')]
    assert read and int(read[0].split()[-1]) == len(payload)


def test_outbound_opaque_without_a_destination_is_closed(mesh) -> None:
    port = free_port()
    m = mesh.run({}, listeners=_listener("out", port, direction="outbound"), extra=_limits())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x00not http\r\n")
        assert recv_all(s) == b""
    expect_counts(m, "out", opaque=1)
    wait_for(lambda: "no destination for an opaque connection" in m.log(), timeout=5,
             what="the no-destination log line")


def test_tls_is_tunneled_and_the_handshake_completes(mesh, tmp_path) -> None:
    ca = TestCA.create(tmp_path)
    issued = ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"])
    backend = _TlsEcho(issued.cert, issued.key)
    try:
        port = free_port()
        m = mesh.run({}, listeners=_listener("in", port, forward=backend.address),
                     extra=_limits())
        ctx = ssl.create_default_context(cafile=ca.cert_file)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == "http/1.1"
                tls.sendall(b"hello through the tunnel")
                assert recv_exactly(tls, 24) == b"hello through the tunnel"
                peer = tls.getpeercert()
                assert peer is not None and ("DNS", "localhost") in peer["subjectAltName"]
        assert backend.sni == ["localhost"]
        expect_counts(m, "in", tls=1)
    finally:
        backend.stop()


# -- opaque ports -------------------------------------------------------------------------

def test_opaque_port_skips_detection(mesh, servers) -> None:
    backend = servers(_echo)
    port = free_port()
    m = mesh.run({}, listeners=_listener("in", port, forward=backend.address,
                                         extra=f"opaque_ports = [{port}]"),
                 extra=_limits("5s"))
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)  # would be HTTP if detected: the echo proves it was not
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == request
    # server speaks first on an opaque port: no detect_timeout (5 s) to wait for
    banner = servers(_banner_then_echo)
    port2 = free_port()
    m2 = mesh.run({}, listeners=_listener("in", port2, forward=banner.address,
                                          extra=f"opaque_ports = [{port2}, 3306]"),
                  extra=_limits("5s"))
    with socket.create_connection(("127.0.0.1", port2), timeout=5) as s:
        start = time.monotonic()
        assert recv_exactly(s, len(BANNER)) == BANNER
        assert time.monotonic() - start < 4.0  # not detect_timeout (5 s)
    expect_counts(m, "in", skipped=1)
    expect_counts(m2, "in", skipped=1)


# -- HTTP/2 -------------------------------------------------------------------------------

def test_h2_prior_knowledge_goes_to_the_h2_server(mesh, backends) -> None:
    b = backends("a")
    port = free_port()
    m = mesh.run({}, listeners=_listener("in", port, forward=b.address), extra=_limits())
    out = subprocess.run(["curl", "-sS", "-m", "5", "--http2-prior-knowledge",
                          f"http://127.0.0.1:{port}/h2"], capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"a /h2\n"
    # a raw client: the server's preface (a SETTINGS frame) answers the client's
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # preface + SETTINGS
        head = recv_exactly(s, 9)
        assert head[3] == 0x4 and head[4] == 0 and head[5:9] == b"\x00\x00\x00\x00", head
    expect_counts(m, "in", h2=2)


# -- all results on one listener ----------------------------------------------------------

def test_counters_sum_over_workers_per_result(mesh, servers, backends) -> None:
    b = backends("a")
    echo = servers(_echo)
    port = free_port()
    m = mesh.run({}, workers=2, listeners=_listener("in", port, forward=b.address)
                 + _listener("raw", free_port(), forward=echo.address), extra=_limits("200ms"))
    for _ in range(3):
        assert http_get("127.0.0.1", port, "/x")[2] == b"a /x\n"
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            assert recv_exactly(s, 9)[3] == 0x4  # the server's SETTINGS
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x00\x05\x01")  # a ClientHello's first bytes: TLS
        s.shutdown(socket.SHUT_WR)
        recv_all(s)  # the HTTP backend gets garbage and closes
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        time.sleep(0.6)  # silent past detect_timeout
    expect_counts(m, "in", http1=3, h2=2, tls=1, timeout=1)
    expect_counts(m, "raw")  # no connection yet: no line at all
    _, _, metrics = http_get("127.0.0.1", m.ports["admin"], "/metrics")
    assert b'listener="raw",result=' not in metrics
