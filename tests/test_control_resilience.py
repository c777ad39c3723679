"""The control process keeps doing its job under pressure (issue 11, item 8): the snapshot
publisher outlives failed writes, and the admin server bounds its connections."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MeshFactory

from meshd.control.admin import HEAD_TIMEOUT, MAX_CONNECTIONS
from meshd.testing.harness import Backend, Meshd, http_get, immutable, wait_for

root_only = pytest.mark.usefixtures("needs_root")   # chattr +i


def _file_discovery(mesh: MeshFactory, path: Path, web: Backend) -> tuple[str, dict[str, int]]:
    path.write_text(f'web = ["{web.address}"]\n')
    text, ports = mesh.config({})
    text = text.replace('plugin = "static"\n[discovery.services]\n',
                        f'plugin = "static"\nfile = "{path}"\ninterval = "100ms"\n')
    return text, ports


def _served_by(m: Meshd) -> str:
    status, headers, _ = http_get("127.0.0.1", m.ports["outbound"], "/",  # type: ignore[attr-defined]
                                  {"Host": "web"})
    return headers.get("x-backend", "") if status == 200 else f"status {status}"


@root_only
def test_publisher_retries_after_write_errors(mesh: MeshFactory, backends: Callable[..., Backend],
                                              tmp_path: Path) -> None:
    """Snapshot writes fail for real (EPERM: the shm_dir is made immutable) while discovery
    changes: workers keep routing with what they have, the failures are counted and shown,
    and once writes work again the workers see the change. The old publisher died on its
    first error, so workers never saw a discovery change again."""
    a, b = backends("a"), backends("b")
    services = tmp_path / "services.toml"
    text, ports = _file_discovery(mesh, services, a)
    m = mesh.start(text, ports)
    assert _served_by(m) == "a"

    admin = int(m.admin.rpartition(":")[2])  # type: ignore[union-attr]
    with immutable(mesh.shm_dir):
        services.write_text(f'web = ["{b.address}"]\n')
        wait_for(lambda: m.metric("meshd_snapshot_publish_failures_total") >= 2, timeout=20,
                 what="failed publishes counted")
        assert m.metric("meshd_snapshot_publish_failing") == 1
        endpoints = http_get("127.0.0.1", admin, "/endpoints")[2].decode()
        assert b.address in endpoints and "Operation not permitted" in endpoints
        assert _served_by(m) == "a"                       # fail static: the last snapshot
        assert "cannot publish the endpoint snapshot" in m.log()

    wait_for(lambda: _served_by(m) == "b", timeout=20, what="workers on the new endpoints")
    wait_for(lambda: m.metric("meshd_snapshot_publish_failing") == 0, timeout=10,
             what="publishing recovered")
    assert "published again" in m.log()
    # And later changes still reach the workers.
    services.write_text(f'web = ["{a.address}"]\n')
    wait_for(lambda: _served_by(m) == "a", timeout=20, what="the next change")


def test_admin_bounds_idle_connections(mesh: MeshFactory) -> None:
    """300 idle connections cannot deny the admin API: at MAX_CONNECTIONS a new connection
    takes the place of the oldest idle one, so /live answers; the idle ones and a client
    trickling its head a byte at a time are closed after HEAD_TIMEOUT."""
    m = mesh.run({"web": ["127.0.0.1:1"]})
    host, _, port = m.admin.rpartition(":")  # type: ignore[union-attr]
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        status, _, body = http_get(host, int(port), "/live", timeout=5)
        assert (status, body) == (200, b"live\n")
        evicted = m.metric("meshd_admin_connections_closed_total", 'reason="evicted"')
        assert evicted >= 300 - MAX_CONNECTIONS

        # A slow client: one byte of a head every 0.5 s, never a whole head.
        trickler = socket.create_connection((host, int(port)), timeout=5)
        stop = threading.Event()

        def trickle() -> None:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                if stop.wait(0.5):
                    return
                try:
                    trickler.sendall(bytes([byte]))
                except OSError:
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        started = time.monotonic()
        for s in [*idle, trickler]:
            s.settimeout(HEAD_TIMEOUT + 20)
            try:
                assert s.recv(1024) == b""                 # closed by meshd
            except ConnectionResetError:
                pass
        stop.set()
        t.join(5)
        assert time.monotonic() - started < HEAD_TIMEOUT + 20
        assert m.metric("meshd_admin_connections_closed_total", 'reason="head_timeout"') >= 1
        # A kept-alive client that keeps asking is never idle for long: still served.
        assert http_get(host, int(port), "/live")[0] == 200
    finally:
        for s in idle:
            s.close()
