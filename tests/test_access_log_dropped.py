"""meshd_access_log_dropped_total: access log lines a worker dropped because its writer
fell behind, on /metrics, and every request either logged or counted as dropped."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from meshd.testing.harness import wait_for

REQUESTS = 1000


def _pipelined(port: int, n: int) -> int:
    """``n`` GETs written at once on one connection (meshd answers them in order, faster
    than its access log writer wakes up); how many 200 answers came back."""
    req = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(req * n)
        deadline = time.monotonic() + 60
        while got.count(b"HTTP/1.1 200 ") < n and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            got += data
    return got.count(b"HTTP/1.1 200 ")


def _lines(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def test_dropped_lines_are_counted_on_metrics(mesh, backends, tmp_path):
    a = backends("a")
    log = tmp_path / "access.log"
    m = mesh.run({"web": [a.address]}, workers=1,
                 extra=f'[access_log]\npath = "{log}"\nformat = "text"\nqueue = 16\n')
    assert m.metric("meshd_access_log_dropped_total") == 0
    assert _pipelined(m.ports["outbound"], REQUESTS) == REQUESTS
    # Every request was logged or dropped: wait until the two add up (the writer wakes
    # every 50 ms), then the count shows drops (16 lines per wake-up at most).
    wait_for(lambda: _lines(log) + m.metric("meshd_access_log_dropped_total") == REQUESTS,
             timeout=20, what="lines written + dropped = requests")
    assert m.metric("meshd_access_log_dropped_total") > 0
    assert "lines dropped so far" in m.log()
