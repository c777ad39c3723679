"""HTTP/1.1 Upgrade (WebSocket) and CONNECT through a real meshd: tunneled after the
101/200, h2c never passed upstream, an unsolicited 101 refused."""

from __future__ import annotations

import json
import os
import socket
import threading

from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve as ws_serve

from meshd.testing.harness import free_port, read_head, wait_for
from meshd.testing.tcp_server import TcpServer, echo

WS_LISTENER = """
[[listener]]
name = "ws"
listen = "127.0.0.1:{port}"
protocol = "http"
service = "ws"
"""


def _ws_echo_server() -> tuple[object, int, threading.Thread]:
    def echo(ws) -> None:
        for message in ws:
            ws.send(message)
    server = ws_serve(echo, "127.0.0.1", 0)
    port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, port, thread


def test_websocket_echo_through_meshd(mesh):
    server, port, _ = _ws_echo_server()
    try:
        ws_port = free_port()
        m = mesh.run({"ws": [f"127.0.0.1:{port}"]}, listeners=WS_LISTENER.format(port=ws_port))
        with ws_connect(f"ws://127.0.0.1:{ws_port}/chat", open_timeout=10) as ws:
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
            blob = os.urandom(200_000)
            ws.send(blob)
            assert ws.recv(timeout=10) == blob
            for i in range(50):
                ws.send(f"m{i}")
            assert [ws.recv(timeout=10) for _ in range(50)] == [f"m{i}" for i in range(50)]
        # the close handshake went through both ways (no exception on exit), and the
        # tunnel's bytes were counted on the listener's row once it ended
        wait_for(lambda: m.metric("tcp_read_bytes_total", 'listener="ws"') >= 200_000
                 and m.metric("tcp_write_bytes_total", 'listener="ws"') >= 200_000, timeout=10,
                 what="the tunnel's bytes in /metrics")
    finally:
        server.shutdown()


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return read_head(s)


def test_h2c_upgrade_is_not_passed_upstream(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    request = (b"GET /headers HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Keep: 1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10) as s:
        s.sendall(request)
        raw = b""
        while True:
            data = s.recv(65536)
            raw += data
            head, _, body = raw.partition(b"\r\n\r\n")
            if body.endswith(b"}"):
                break
            assert data, raw
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = json.loads(body)
    assert seen.get("x-keep") == "1"
    assert "upgrade" not in seen and "http2-settings" not in seen, seen


def test_connect_tunnels_to_an_endpoint_of_the_named_service(mesh):
    with TcpServer(echo) as srv:
        m = mesh.run({"echo": [srv.address]})
        with socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10) as s:
            s.sendall(b"CONNECT echo:80 HTTP/1.1\r\nHost: echo:80\r\n\r\nearly bytes|")
            head, marker, got = read_head(s).partition(b"\r\n\r\n")
            head += marker  # bytes past the head are the tunnel's: kept in got
            assert head.startswith(b"HTTP/1.1 200") and marker, head
            payload = os.urandom(300_000)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # half-close: the echo still comes back
            while data := s.recv(65536):
                got += data
        assert got == b"early bytes|" + payload
        # a service nobody knows: 503 with the reason, no tunnel
        reply = _exchange(m.ports["outbound"], b"CONNECT nowhere:80 HTTP/1.1\r\nHost: nowhere:80\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503"), reply


def test_an_unsolicited_101_is_a_502(mesh):
    def rogue(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
            conn.recv(65536)
    with TcpServer(rogue, limit=1) as srv:
        m = mesh.run({"web": [srv.address]}, extra='[service.web]\nretries = 0\n')
        reply = _exchange(m.ports["outbound"], b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 502"), reply
        assert b"switched protocols without being asked" in reply


def test_h2c_upgrade_passes_where_the_listener_allows_it(mesh):
    """A listener with h2c_upgrade = true passes Upgrade: h2c and HTTP2-Settings on, and
    after the upstream's 101 the bytes are tunneled (the upstream speaks h2 on them)."""
    seen: list[bytes] = []

    def upstream(conn: socket.socket) -> None:
        with conn:
            seen.append(read_head(conn))
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                         b"after-101")
            conn.sendall(conn.recv(65536))  # echo what the client sends next
    with TcpServer(upstream, limit=1) as srv:
        port = free_port()
        listener = f'\n[[listener]]\nname = "h2c"\nlisten = "127.0.0.1:{port}"\nprotocol = "http"\nh2c_upgrade = true\n'
        mesh.run({"web": [srv.address]}, listeners=listener)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                      b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            got = read_head(s, b"after-101")
            assert got.startswith(b"HTTP/1.1 101"), got
            s.sendall(b"ping")
            assert s.recv(64) == b"ping"
        head = seen[0].lower()
        assert b"upgrade: h2c" in head and b"http2-settings: aamaaabkaaqaap__" in head, head
