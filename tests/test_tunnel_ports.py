"""meshd tunnels (``MESHD-TUNNEL <port>``) on an inbound auto listener, against a real
meshd: only ports in the listener's ``tunnel_ports`` are reached, never meshd's own
ports; a refused tunnel is closed without connecting anywhere, counted as
``meshd_protocol_detect_total{result="tunnel_refused"}`` and logged, throttled."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from conftest import MeshFactory

from meshd.ratelog import BURST
from meshd.testing.harness import Meshd, free_port, tcp_sockets, wait_for
from meshd.testing.tcp_server import TcpServer, echo


def _inbound(port: int, forward: str, tunnel_ports: list[int]) -> str:
    return (f'\n[[listener]]\nname = "inbound"\nlisten = "127.0.0.1:{port}"\n'
            f'direction = "inbound"\nprotocol = "auto"\nforward = "{forward}"\n'
            f'tunnel_ports = {tunnel_ports}\n')


def _start(mesh: MeshFactory, tunnel_ports: list[int], listeners: str = "",
           workers: int = 1) -> tuple[Meshd, int]:
    """meshd whose inbound listener forwards to a port nobody listens on (the tunnels
    name their own); returns it and the inbound port."""
    port = free_port()
    text, ports = mesh.config({}, workers=workers,
                              listeners=_inbound(port, f"127.0.0.1:{free_port()}",
                                                 tunnel_ports) + listeners)
    return mesh.start(text, ports), port


def _tunnel(port: int, target: int, payload: bytes) -> bytes:
    """Open a tunnel to ``target`` through the inbound ``port``, send ``payload``, and
    read until meshd closes (or as many bytes as were sent came back)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"MESHD-TUNNEL %d\r\n" % target + payload)
        got = b""
        try:
            while len(got) < len(payload) and (data := s.recv(65536)):
                got += data
        except ConnectionResetError:
            pass
        return got


def _refused(m: Meshd) -> float:
    return m.metric("meshd_protocol_detect_total", 'listener="inbound",result="tunnel_refused"')


def test_tunnel_reaches_a_listed_port_and_never_an_unlisted_one(mesh):
    with TcpServer(echo) as listed, TcpServer(echo) as database:
        m, port = _start(mesh, [listed.port])
        # a database bound to 127.0.0.1: not listed, so not reachable through the tunnel
        assert _tunnel(port, database.port, b"SELECT 1;") == b""
        wait_for(lambda: _refused(m) == 1, what="the refused tunnel counted")
        assert database.accepted == 0  # closed without connecting anywhere
        assert "refused a meshd tunnel" in m.log()
        assert f"port {database.port} is not in the listener's tunnel_ports" in m.log()
        # the listed port is: meshd-to-meshd opaque TCP keeps working
        assert _tunnel(port, listed.port, b"hello" * 1000) == b"hello" * 1000
        assert listed.accepted == 1
        assert m.metric("meshd_protocol_detect_total", 'listener="inbound",result="tunnel"') == 1
        assert _refused(m) == 1 and database.accepted == 0


def test_tunnel_to_meshd_own_listener_picked_by_the_kernel_is_refused(mesh, tmp_path):
    """A listener on port 0 cannot be checked when the config is read: the port the
    kernel gave it is refused when a tunnel names it (here after a reload lists it)."""
    own = '\n[[listener]]\nname = "own"\nlisten = "127.0.0.1:0"\nprotocol = "http"\n'
    m, port = _start(mesh, [], own)
    (own_port,) = _listening_ports(m.pid) - {port, m.ports["outbound"], m.ports["admin"]}
    path = m.config_path
    path.write_text(path.read_text().replace("tunnel_ports = []",
                                             f"tunnel_ports = [{own_port}]"))
    m.signal(signal.SIGHUP)
    wait_for(lambda: "generation 2 serving" in m.log(), timeout=30,
             what="the reload listing meshd's own port")
    assert own_port in _listening_ports(m.pid)  # the same socket, kept over the reload
    assert _tunnel(port, own_port, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n") == b""
    wait_for(lambda: _refused(m) == 1, what="the refused tunnel counted")
    assert f"port {own_port} is meshd's own listener 'own'" in m.log()
    # nothing reached the listener: it never accepted a connection
    assert m.metric("tcp_open_total", 'listener="own"') == 0


def test_tunnel_ports_naming_meshd_own_ports_are_a_config_error(mesh, tmp_path):
    """The admin port and the outbound listener's port are meshd's own: listing them is
    refused by `meshd check` and by `meshd run`, with the key path."""
    port = free_port()
    text, ports = mesh.config({}, listeners=_inbound(port, "127.0.0.1:8080", [5432]))
    text = text.replace("tunnel_ports = [5432]",
                        f"tunnel_ports = [5432, {ports['admin']}, {ports['outbound']}]")
    path = tmp_path / "own-ports.toml"
    path.write_text(text)
    for command in ("check", "run"):
        done = subprocess.run([sys.executable, "-m", "meshd", command, "-c", str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        out = done.stdout + done.stderr
        assert (f"listener[1].tunnel_ports: port {ports['admin']} is meshd's own admin "
                f"address") in out
        assert (f"listener[1].tunnel_ports: port {ports['outbound']} is meshd's own "
                f"listener 'outbound'") in out


def test_refused_tunnels_do_not_flood_the_log(mesh):
    with TcpServer(echo) as database:
        m, port = _start(mesh, [])
        for _ in range(1000):
            with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                s.sendall(b"MESHD-TUNNEL %d\r\n" % database.port)
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
        wait_for(lambda: _refused(m) == 1000, timeout=30, what="1000 refused tunnels counted")
        assert database.accepted == 0
        lines = [ln for ln in m.log().splitlines() if "tunnel" in ln]
        refused = [ln for ln in lines if "refused a meshd tunnel" in ln]
        suppressed = [ln for ln in lines if "more similar lines suppressed" in ln]
        # one worker: a burst per 10 s window, and one "suppressed" line per later window
        assert 1 <= len(refused) <= BURST * 4, len(refused)
        assert len(lines) == len(refused) + len(suppressed)
        assert len(suppressed) <= 3


def _listening_ports(pid: int) -> set[int]:
    """Ports of the TCP sockets process ``pid`` listens on (IPv4)."""
    return {local for local, _, state in tcp_sockets(pid) if state == "0A"}
