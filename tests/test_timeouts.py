"""Connections meshd no longer holds forever, against a real meshd with small limits
(``[limits] tcp_idle_timeout`` and ``write_timeout``): a silent opaque connection is
closed both ways; one whose upstream closed while the client keeps its side open is
closed; an HTTP/1.1 or HTTP/2 client that stops reading a large response is dropped, and
its upstream connection released (a service with max_connections = 1 serves again)."""

from __future__ import annotations

import socket
import threading

import h2.config
import h2.connection
import h2.settings
from conftest import MeshFactory

from meshd.testing.harness import Backend, Meshd, free_port, http_get, wait_for
from meshd.testing.tcp_server import TcpServer

LIMITS = '[limits]\ntcp_idle_timeout = "1s"\nwrite_timeout = "1s"\n'
BIG = 50_000_000


def _tcp_listener(port: int) -> str:
    return (f'\n[[listener]]\nname = "db"\nlisten = "127.0.0.1:{port}"\nprotocol = "tcp"\n'
            f'service = "db"\n')


def _closed(m: Meshd) -> float:
    return m.metric("tcp_close_total", 'listener="db"')


def test_a_silent_opaque_connection_is_closed_both_ways(mesh: MeshFactory):
    upstream_ended = threading.Event()

    def echo_until_eof(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass
            upstream_ended.set()

    with TcpServer(echo_until_eof) as db:
        port = free_port()
        m = mesh.run({"db": [db.address]}, listeners=_tcp_listener(port), extra=LIMITS)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"hello")
            assert s.recv(5) == b"hello"
            # then silence both ways: meshd closes the client's side ...
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        # ... and the upstream's
        assert upstream_ended.wait(20)
        wait_for(lambda: _closed(m) == 1, what="the connection counted closed")


def test_a_client_that_keeps_its_side_open_after_the_upstream_closed_is_closed(
        mesh: MeshFactory):
    def answer_and_close(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"bye\n")

    with TcpServer(answer_and_close) as db:
        port = free_port()
        m = mesh.run({"db": [db.address]}, listeners=_tcp_listener(port), extra=LIMITS)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            got = b""
            while data := s.recv(100):  # the upstream's bytes, then its end passed on
                got += data
            assert got == b"bye\n"
            # the client keeps its side open (it never closes nor sends): meshd, which
            # half-closed toward it, must close its side for good
            wait_for(lambda: _closed(m) == 1, timeout=20, what="meshd closing the connection")
            assert m.metric("tcp_open_connections", 'listener="db"') == 0


def test_an_opaque_client_that_stops_reading_is_dropped_both_ways(mesh: MeshFactory):
    """write_timeout holds for opaque TCP too (splice): the upstream keeps sending, the
    client reads nothing; meshd drops both long before tcp_idle_timeout."""
    upstream_ended = threading.Event()

    def send_forever(conn: socket.socket) -> None:
        with conn:
            try:
                for _ in range(10_000):  # 640 MB at most: bounded, far more than buffers
                    conn.sendall(b"x" * 65536)
            except OSError:
                upstream_ended.set()

    with TcpServer(send_forever) as db:
        port = free_port()
        limits = '[limits]\ntcp_idle_timeout = "1h"\nwrite_timeout = "1s"\n'
        m = mesh.run({"db": [db.address]}, listeners=_tcp_listener(port), extra=limits)
        with _stuck_client(port) as stuck:
            assert upstream_ended.wait(30)  # meshd closed the upstream side
            wait_for(lambda: _closed(m) == 1, timeout=20, what="meshd closing the client")
            assert _read_to_end(stuck) < 10_000 * 65536


def test_a_silent_connect_tunnel_is_closed_after_tcp_idle_timeout(mesh: MeshFactory):
    """A CONNECT tunnel shares the opaque code: tcp_idle_timeout bounds it even when the
    service's own idle_timeout is longer."""
    upstream_ended = threading.Event()

    def wait_for_eof(conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
            upstream_ended.set()

    with TcpServer(wait_for_eof) as srv:
        m = mesh.run({"echo": [srv.address]},
                     extra=LIMITS + '\n[service.echo]\nidle_timeout = "5m"\n')
        with socket.create_connection(("127.0.0.1", m.ports["outbound"]),  # type: ignore[attr-defined]
                                      timeout=20) as s:
            s.sendall(b"CONNECT echo:80 HTTP/1.1\r\nHost: echo:80\r\n\r\n")
            head = s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert _read_to_end(s) == 0  # closed by meshd, silent both ways
        assert upstream_ended.wait(20)


def _big_response_service(mesh: MeshFactory, backend: Backend) -> Meshd:
    """One endpoint, one upstream connection at most; its pooled connections idle for
    long (so that only write_timeout can free a stuck one quickly)."""
    extra = LIMITS + '\n[service.web]\nmax_connections = 1\nidle_timeout = "5m"\nretries = 0\n'
    return mesh.run({"web": [backend.address]}, extra=extra)


def _served_again(m: Meshd) -> bool:
    status, _, body = http_get("127.0.0.1", m.ports["outbound"], "/hello",  # type: ignore[attr-defined]
                               headers={"Host": "web"}, timeout=10)
    return status == 200 and body == b"big /hello\n"


def _stuck_client(port: int) -> socket.socket:
    """A client socket that will not take much before it stops reading."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    return s


def test_an_http1_client_that_stops_reading_is_dropped_and_its_upstream_freed(
        mesh: MeshFactory, backends):
    m = _big_response_service(mesh, backends("big"))
    port = m.ports["outbound"]  # type: ignore[attr-defined]
    with _stuck_client(port) as stuck:
        stuck.sendall(f"GET /bytes?n={BIG}&cl=1 HTTP/1.1\r\nHost: web\r\n\r\n".encode())
        assert stuck.recv(12) == b"HTTP/1.1 200"
        # it reads nothing more: meshd drops it after write_timeout, and the upstream
        # connection it held (max_connections = 1) serves the next request
        wait_for(lambda: _served_again(m), timeout=30, what="the service serving again")
        # what it gets now is what the kernel buffers held, then the end, short of 50 MB
        assert 12 + _read_to_end(stuck) < BIG
        assert "dropped a client that accepted no bytes for 1s" in m.log()


def test_an_h2_client_that_stops_reading_is_dropped_and_its_upstream_freed(
        mesh: MeshFactory, backends):
    backend = backends("big")
    m = _big_response_service(mesh, backend)
    port = m.ports["outbound"]  # type: ignore[attr-defined]
    with _stuck_client(port) as stuck:
        # a raw HTTP/2 client with the largest windows, which then never reads: only
        # the socket, not flow control, holds meshd back
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        conn.initiate_connection()
        conn.increment_flow_control_window(2**31 - 1 - 65535)
        conn.send_headers(1, [(":method", "GET"), (":path", f"/bytes?n={BIG}&cl=1"),
                              (":scheme", "http"), (":authority", "web")], end_stream=True)
        stuck.sendall(conn.data_to_send())
        # the request reached the upstream: its one connection is in use
        wait_for(lambda: b'"GET /bytes": 1' in http_get(backend.host, backend.port, "/_counts")[2],
                 what="the big request at the upstream")
        wait_for(lambda: _served_again(m), timeout=30, what="the service serving again")
        # dropped, not served from memory: meshd never buffers the whole response
        assert _read_to_end(stuck) < BIG
        assert "dropped an HTTP/2 client that accepted no bytes for 1s" in m.log()


def _read_to_end(sock: socket.socket) -> int:
    """Bytes read until meshd's end of the connection (a socket timeout fails the test:
    the connection was not closed)."""
    got = 0
    try:
        while data := sock.recv(1 << 20):
            got += len(data)
    except ConnectionResetError:
        pass
    return got
