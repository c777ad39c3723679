"""Two meshd instances in one test, outbound -> inbound -> application: HTTP/1.1 requests
from many client connections cross between the two over one multiplexed HTTP/2
connection, and the application sees HTTP/1.1 with its headers intact."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections import Counter

from conftest import MeshFactory

from meshd.testing.harness import Meshd, free_port, tcp_sockets
from meshd.testing.tcp_server import TcpServer

INBOUND = """
[[listener]]
name = "inbound"
listen = "127.0.0.1:{port}"
direction = "inbound"
protocol = "auto"
forward = "{app}"
tunnel_ports = [{tunnel_ports}]
"""


def _peer_connections(pid: int, port: int) -> int:
    """Established TCP connections from process ``pid`` to 127.0.0.1:``port``."""
    return sum(1 for _, remote, state in tcp_sockets(pid) if state == "01" and remote == port)


def _two_meshds(mesh: MeshFactory, service: str, app: str, *, forward: str | None = None,
                listeners_a: str | None = None, tunnel_ports: tuple[int, ...] = ()
                ) -> tuple[Meshd, int]:
    """Outbound meshd A -> inbound meshd B -> the application at ``app``: B's inbound
    listener forwards to ``forward`` (``app`` unless given), A's discovery lists
    ``service`` at ``app`` as meshed behind B's inbound port; A also has ``listeners_a``.
    B's inbound listener accepts meshd tunnels to ``tunnel_ports``. Both have one worker.
    Returns A (started after B) and B's inbound port."""
    inbound_port = free_port()
    # meshd B fronts the application: its inbound listener forwards to it
    inbound = INBOUND.format(port=inbound_port, app=forward or app,
                             tunnel_ports=", ".join(map(str, tunnel_ports)))
    text_b, ports_b = mesh.config({}, workers=1, listeners=inbound)
    mesh.start(text_b, ports_b)
    # meshd A routes the service to the application, which discovery says is meshed
    meshed = f'{{ address = "{app}", meshed = true, inbound_port = {inbound_port} }}'
    text_a, ports_a = mesh.config({}, workers=1, listeners=listeners_a)
    text_a = text_a.replace("[discovery.services]\n",
                            f"[discovery.services]\n{service} = [{meshed}]\n")
    return mesh.start(text_a, ports_a), inbound_port


def test_http1_between_two_meshds_rides_one_h2_connection(mesh, backends):
    a, inbound_port = _two_meshds(mesh, "web", backends("app").address)

    seen: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[str] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", a.ports["outbound"], timeout=10)
        try:
            for j in range(20):
                conn.request("GET", f"/headers?c={i}&r={j}",
                             headers={"Host": "web", "X-Client": str(i), "Cookie": "a=1; b=2"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    errors.append(f"{resp.status} {body[:200]!r}")
                    continue
                headers = json.loads(body)
                with lock:
                    seen[headers.get("x-client", "?")] += 1
                    if headers.get("cookie") != "a=1; b=2":
                        errors.append(f"cookie {headers.get('cookie')!r}")
                    if "meshd-orig-proto" in headers:
                        errors.append("the marker header reached the application")
        finally:
            conn.close()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # all that traffic crossed between the two over one connection: A holds a single
    # connection to B's inbound port
    assert errors == [], errors[:5]
    assert seen == {str(i): 20 for i in range(12)}
    (worker_a,) = a.worker_pids()
    assert _peer_connections(worker_a, inbound_port) == 1
    # the application saw HTTP/1.1 requests (pywsgi's own view of the protocol)
    conn = http.client.HTTPConnection("127.0.0.1", a.ports["outbound"], timeout=10)
    conn.request("POST", "/echo", body=b"x" * 100_000, headers={"Host": "web"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"x" * 100_000
    conn.close()


def test_chunked_body_and_trailers_cross_two_meshds(mesh, backends):
    a, _ = _two_meshds(mesh, "web", backends("app").address)
    with socket.create_connection(("127.0.0.1", a.ports["outbound"]), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n")
        data = b""
        while not data.endswith(b"}") and not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    assert b'"bytes": 11' in data, data


def test_opaque_tcp_to_a_meshed_endpoint_is_tunneled_through_the_peer(mesh):
    """An outbound tcp listener's service is meshed: the bytes go to the peer meshd's
    inbound port with a header naming the target port, and the peer delivers them."""
    seen_first: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            first = True
            while data := conn.recv(65536):
                if first:
                    seen_first.append(data[:40])
                    first = False
                conn.sendall(data)
    with TcpServer(serve, limit=1) as echo:
        tcp_port = free_port()
        tcp = f'\n[[listener]]\nname = "db"\nlisten = "127.0.0.1:{tcp_port}"\nprotocol = "tcp"\nservice = "db"\n'
        _two_meshds(mesh, "db", echo.address, listeners_a=tcp,
                    forward=f"127.0.0.1:{free_port()}",  # forward: another port
                    tunnel_ports=(echo.port,))
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as s:
            payload = b"SELECT 1;" + bytes(range(256)) * 400
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                data = s.recv(65536)
                assert data, got[:100]
                got += data
        assert got == payload
        # the application saw the client's bytes only: the header stopped at the peer
        assert seen_first and seen_first[0].startswith(b"SELECT 1;")
