"""`meshd top` in a real terminal (tmux): the table of the busiest paths fills from the
tap stream while traffic flows, is redrawn in place, and `q` ends it; the table itself
(success rate, quantiles, bounds) without a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import MeshFactory

from meshd.cli.tap import lines, open_tap
from meshd.cli.top import HEADER, MAX_ROWS, Paths, render
from meshd.testing.harness import Backend, Meshd, http_get, require_tool, wait_for


@pytest.fixture(scope="module")
def meshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshd]:
    backend = Backend("a").start()
    factory = MeshFactory(tmp_path_factory.mktemp("top"))
    try:
        yield factory.run({"web": [backend.address]}, workers=2)
    finally:
        for m in factory.started:
            m.stop()
        backend.stop()


class Tmux:
    """A tmux server of the test's own (its own socket name): nobody else's sessions."""

    def __init__(self) -> None:
        self.tmux = require_tool("tmux")
        self.name = f"meshd-top-{os.getpid()}"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.tmux, "-L", self.name, *args], capture_output=True,
                              text=True, timeout=20, check=check)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top").stdout

    def alive(self) -> bool:
        return self("has-session", "-t", "top", check=False).returncode == 0

    def kill(self) -> None:
        self("kill-server", check=False)


def test_top_shows_the_busiest_paths_and_q_quits(meshd: Meshd) -> None:
    tmux = Tmux()
    port = meshd.ports["outbound"]  # type: ignore[attr-defined]
    command = f"{sys.executable} -m meshd top --admin {meshd.admin} --service web"
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", command)
    try:
        wait_for(lambda: meshd.metric("meshd_tap_clients") == 1, timeout=30,
                 what="meshd top tapping")
        row = re.compile(r"GET\s+web\s+/top-path\s+(\d+)\s+100\.00%\s+[\d.]+\s+\S+ms\s+\S+ms")
        failing = re.compile(r"GET\s+web\s+/status\s+(\d+)\s+0\.00%")
        screen = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for i in range(3):
                assert http_get("127.0.0.1", port, f"/top-path?id={i}", {"Host": "web"})[0] == 200
            assert http_get("127.0.0.1", port, "/status?code=500", {"Host": "web"})[0] == 500
            screen = tmux.screen()
            m = row.search(screen)
            if m and int(m.group(1)) >= 3 and failing.search(screen):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no /top-path row on the screen:\n{screen}")
        assert "meshd top" in screen and "COUNT" in screen and "P99" in screen
        # redrawn in place: the count grows on the same row, the screen does not scroll
        seen = int(row.search(screen).group(1))  # type: ignore[union-attr]
        for i in range(5):
            http_get("127.0.0.1", port, f"/top-path?id={i}", {"Host": "web"})

        def grew() -> bool:
            m = row.search(tmux.screen())
            return m is not None and int(m.group(1)) > seen
        wait_for(grew, timeout=20, what="the row's count to grow")
        assert tmux.screen().count("/top-path") == 1
        tmux("send-keys", "-t", "top", "q")
        wait_for(lambda: not tmux.alive(), timeout=20, what="meshd top to end on q")
        wait_for(lambda: meshd.metric("meshd_tap_clients") == 0, what="its tap closed")
    finally:
        tmux.kill()


def test_every_worker_reaches_the_tap(meshd: Meshd) -> None:
    """Two workers: a tap's head comes once both apply its filter, and the requests of
    both reach it (each request on its own connection: either worker may take it)."""
    port = meshd.ports["outbound"]  # type: ignore[attr-defined]
    conn, resp = open_tap(meshd.admin or "", "/tap?path_prefix=/both")
    try:
        assert meshd.metric("meshd_tap_workers_current") == 2
        want = {f"/both/{i}" for i in range(20)}
        for path in sorted(want):
            assert http_get("127.0.0.1", port, path, {"Host": "web"})[0] == 200
        seen: set[str] = set()
        for rec in lines(conn, resp, time.monotonic() + 20):
            seen.add(rec["path"])
            if seen >= want:
                break
        assert seen == want
    finally:
        resp.close()
        conn.close()


def test_paths_table() -> None:
    paths = Paths()
    now = 100.0
    for i in range(10):
        paths.add({"method": "GET", "authority": "web", "path": f"/a?i={i}", "status": 200,
                   "grpc_status": "", "latency_ms": float(i + 1)}, now)
    paths.add({"method": "POST", "authority": "api", "path": "/rpc", "status": 200,
               "grpc_status": "14", "latency_ms": 1.0}, now)
    paths.add({"method": "POST", "authority": "api", "path": "/rpc", "status": 503,
               "grpc_status": "", "latency_ms": 1.0}, now)
    rows = paths.table(10, now)
    assert rows[0] == HEADER
    assert rows[1][:5] == ("GET", "web", "/a", "10", "100.00%")
    assert rows[1][6] == "6.00ms" and rows[1][7] == "10ms"   # p50, p99 of 1..10
    assert rows[2][:5] == ("POST", "api", "/rpc", "2", "0.00%")
    lines = render(rows, 60)
    assert all(len(line) <= 60 for line in lines)
    many = Paths()
    for i in range(MAX_ROWS + 10):
        many.add({"method": "GET", "authority": "w", "path": f"/{i}", "status": 200}, now)
    assert len(many.rows) == MAX_ROWS
