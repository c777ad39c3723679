"""Latency-aware balancing and failure accrual with real processes: P2C peak-EWMA over
shared memory, ejection and probing, per-service timeouts."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter

from meshd.testing.harness import http_get, wait_for

WEB = {"Host": "web"}


def _tally(port: int, seconds: float, connections: int = 6, host: str = "web") -> Counter[str]:
    """Requests over keep-alive connections for ``seconds``: answers by backend name."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            with lock:
                seen[resp.getheader("x-backend") or str(resp.status)] += 1
        conn.close()
    threads = [threading.Thread(target=run) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    return seen


def _endpoints(m, service: str = "web") -> dict[str, dict]:
    _, _, raw = http_get("127.0.0.1", m.ports["admin"], "/endpoints")
    return {e["address"]: e for e in json.loads(raw)["services"][service]["endpoints"]}


def test_slow_endpoint_gets_little_traffic_then_wins_its_share_back(mesh, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    http_get(b.host, b.port, "/_delay?ms=50")
    m = mesh.run({"web": [a.address, b.address, c.address]},
                 extra='[balancer]\newma_decay = "1s"\n')
    _tally(m.ports["outbound"], 1.0)  # warm up: every endpoint gets sampled
    slow = _tally(m.ports["outbound"], 4.0)
    assert slow["b"] / sum(slow.values()) < 0.10, slow
    assert _endpoints(m)[b.address]["ewma_ms"] > 20

    http_get(b.host, b.port, "/_delay?ms=0")
    _tally(m.ports["outbound"], 5.0)  # the slow estimate decays (tau 1 s), b is tried again
    recovered = _tally(m.ports["outbound"], 3.0)
    assert recovered["b"] / sum(recovered.values()) > 0.2, recovered


def test_workers_balance_on_each_others_in_flight_requests(mesh, backends):
    """Worker A holds 16 requests to x; worker B, which has never sent x anything, must
    see them through shared memory and send its own traffic elsewhere."""
    x, y, z = backends("x"), backends("y"), backends("z")
    text, ports = mesh.config({"web": [x.address, y.address, z.address], "hold": [x.address]})
    m = mesh.start(text.replace('worker_timeout = "5s"', 'worker_timeout = "60s"'), ports)
    worker_a, worker_b = m.worker_pids()
    held: list[threading.Thread] = []
    os.kill(worker_b, signal.SIGSTOP)  # every new connection is now A's
    try:
        for _ in range(16):
            t = threading.Thread(target=http_get, args=("127.0.0.1", ports["outbound"],
                                                        "/slow?ms=5000", {"Host": "hold"}, 15))
            t.start()
            held.append(t)
        wait_for(lambda: _endpoints(m, "hold")[x.address]["in_flight"] == 16, timeout=10,
                 what="16 requests in flight to x")
        os.kill(worker_b, signal.SIGCONT)
        os.kill(worker_a, signal.SIGSTOP)  # and now B's; A's in-flight stay in its stripe
        seen: Counter[str] = Counter()
        for i in range(60):
            _, headers, _ = http_get("127.0.0.1", ports["outbound"], f"/{i}", WEB)
            seen[headers["x-backend"]] += 1
    finally:
        os.kill(worker_a, signal.SIGCONT)
        os.kill(worker_b, signal.SIGCONT)
        for t in held:
            t.join(20)
    # Alone, B would send x a third of its picks; sharing A's load, it avoids x.
    assert seen["x"] <= 3, seen
    assert seen["y"] + seen["z"] >= 57


def test_failing_endpoint_is_ejected_probed_and_returns(mesh, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    m = mesh.run({"web": [a.address, b.address, c.address]}, workers=1)
    http_get(c.host, c.port, "/_fail?code=503")
    seen = _tally(m.ports["outbound"], 2.0, connections=2)
    # Seven consecutive failures eject c (each GET retried elsewhere); then only probes.
    assert seen["c"] + seen["503"] <= 0.005 * sum(seen.values()), seen
    state = _endpoints(m)[c.address]
    assert state["state"] in ("ejected", "probing") and state["ejections"] >= 1, state
    assert state["failures"] >= 7

    http_get(c.host, c.port, "/_fail?code=0")
    # Probes ride on real traffic: keep some flowing until one succeeds.
    wait_for(lambda: _tally(m.ports["outbound"], 0.3, connections=1)
             and _endpoints(m)[c.address]["state"] == "healthy", timeout=15,
             what="c back after a successful probe")
    back = _tally(m.ports["outbound"], 1.0, connections=2)
    assert back["c"] > 0.1 * sum(back.values()), back
    assert "endpoint " + c.address + " ejected" in m.log()


def test_refused_connections_count_as_failures(mesh, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    m = mesh.run({"web": [a.address, b.address, c.address]}, workers=1)
    c.stop()
    seen = _tally(m.ports["outbound"], 1.5, connections=2)
    # GETs that hit the dead endpoint were retried elsewhere (a probe can still fail).
    assert seen["502"] <= 0.005 * sum(seen.values()), seen
    assert _endpoints(m)[c.address]["state"] in ("ejected", "probing")


def test_never_more_than_half_ejected(mesh, backends):
    a, b = backends("a"), backends("b")
    m = mesh.run({"web": [a.address, b.address]}, workers=1)
    for x in (a, b):
        http_get(x.host, x.port, "/_fail?code=503")
    _tally(m.ports["outbound"], 1.0, connections=2)
    states = [e["state"] for e in _endpoints(m).values()]
    assert states.count("healthy") >= 1, states  # of two, at most one may be out


def test_timeout_fires_near_its_setting(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, extra='[service.web]\ntimeout = "400ms"\n')
    started = time.monotonic()
    status, _, _ = http_get("127.0.0.1", m.ports["outbound"], "/slow?ms=3000", WEB)
    elapsed = time.monotonic() - started
    assert status == 504
    assert 0.36 <= elapsed <= 0.44 + 0.2, elapsed  # within 10 %, plus loopback slack
