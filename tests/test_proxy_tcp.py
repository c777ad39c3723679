"""Opaque TCP listeners: bytes pass through both ways, half-close is carried, the byte
counters move, and a tunnel holds no descriptors beyond its two sockets."""

from __future__ import annotations

import hashlib
import os
import socket
import socketserver
import threading

from meshd.shm import STATE_SERVING
from meshd.testing.harness import free_port, http_get


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


def test_tcp_listener_passes_bytes_both_ways(mesh):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    tcp_port = free_port()
    m = mesh.run({"db": [f"127.0.0.1:{port}"]}, listeners=f"""
[[listener]]
name = "db"
listen = "127.0.0.1:{tcp_port}"
protocol = "tcp"
service = "db"
""")
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB
    try:
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as s:
            sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = bytearray()
            while data := s.recv(1 << 16):
                got += data
            sender.join()
    finally:
        server.shutdown()
        server.server_close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    _, _, metrics = http_get("127.0.0.1", m.ports["admin"], "/metrics")
    lines = metrics.decode().splitlines()
    read = [ln for ln in lines if ln.startswith('tcp_read_bytes_total{direction="outbound",listener="db",service="db"}')]
    written = [ln for ln in lines if ln.startswith('tcp_write_bytes_total{direction="outbound",listener="db",service="db"}')]
    assert read and int(read[0].split()[-1]) == len(payload)
    assert written and int(written[0].split()[-1]) == len(payload)


def test_tcp_listener_with_upstream_down_closes_the_connection(mesh):
    tcp_port = free_port()
    mesh.run({"db": [f"127.0.0.1:{free_port()}"]}, listeners=f"""
[[listener]]
name = "db"
listen = "127.0.0.1:{tcp_port}"
protocol = "tcp"
service = "db"
""")
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=5) as s:
        assert s.recv(10) == b""


def test_open_tunnels_hold_no_descriptors_beyond_their_two_sockets(mesh):
    """A tunnel carrying messages holds its two sockets and nothing else (no pipe per
    direction: meshd.worker.relay makes one only for bulk)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tcp_port = free_port()
    m = mesh.run({"db": [f"127.0.0.1:{server.server_address[1]}"]}, workers=1, listeners=f"""
[[listener]]
name = "db"
listen = "127.0.0.1:{tcp_port}"
protocol = "tcp"
service = "db"
""")
    worker = m.worker_pids(STATE_SERVING)[0]

    def fds() -> int:
        return len(os.listdir(f"/proc/{worker}/fd"))
    n = 10
    clients = []
    try:
        before = fds()
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", tcp_port), timeout=10)
            clients.append(s)
            s.sendall(b"ping %d" % i)  # echoed: both directions of the tunnel have run
            got = b""
            while len(got) < 6:
                data = s.recv(16)
                assert data, "the tunnel closed"
                got += data
            assert got == b"ping %d" % i
        added = fds() - before
    finally:
        for s in clients:
            s.close()
        server.shutdown()
        server.server_close()
    assert 2 * n <= added < 3 * n, f"{added} descriptors for {n} tunnels"
