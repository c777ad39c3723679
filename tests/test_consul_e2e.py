"""A real meshd with the consul plugin, against the Consul test server: traffic follows
what Consul holds, keeps flowing through an outage, and follows again once it is back."""

from __future__ import annotations

import http.client
import json
import random
import signal
import statistics
import textwrap
import time

import pytest
from meshd_consul import ConsulBackend

from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import http_get, wait_for
from meshd.testing.watch import WatchRecorder


def consul_config(mesh, consul: ConsulServer, workers: int = 1) -> tuple[str, dict[str, int]]:
    """A config whose service web comes from the Consul test server."""
    return mesh.config({}, workers=workers, extra=textwrap.dedent(f"""\
        [[discovery]]
        name = "consul"
        plugin = "consul"
        address = "{consul.url}"
        wait = "30s"

        [service.web]
        balancer = "round_robin"  # these tests follow discovery: every endpoint gets traffic
        discovery = "consul"
        """))


class Client:
    """One keep-alive client of meshd's outbound listener; ``who()`` names the backend."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def who(self) -> str:
        try:
            self.conn.request("GET", "/", headers={"Host": "web"})
            resp = self.conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            return "error"
        if resp.will_close:
            self.conn.close()
        return resp.getheader("x-backend") or f"status {resp.status}"

    def seen(self, n: int = 20) -> set[str]:
        return {self.who() for _ in range(n)}

    def until(self, expected: set[str], timeout: float = 10.0, n: int = 20) -> float:
        """Seconds until ``n`` answers in a row come from exactly ``expected``."""
        started = time.monotonic()
        wait_for(lambda: self.seen(n) == expected, timeout, interval=0.0,
                 what=f"traffic to go to {sorted(expected)}")
        return time.monotonic() - started


def test_traffic_follows_consul(mesh, backends, consul) -> None:
    a, b, c = backends("a"), backends("b"), backends("c")
    ia = consul.register("web", a.port, address=a.host)
    ib = consul.register("web", b.port, address=b.host)
    m = mesh.start(*consul_config(mesh, consul))
    client = Client(m.ports["outbound"])
    assert client.seen() == {"a", "b"}

    ic = consul.register("web", c.port, address=c.host)                 # added
    client.until({"a", "b", "c"})
    consul.deregister(ia)                                               # removed
    client.until({"b", "c"})
    consul.set_health(ib, "critical")                                   # turned critical
    client.until({"c"})
    consul.set_health(ib, "passing")
    consul.deregister(ic)
    client.until({"b"})


def test_outage_keeps_last_endpoints_and_restart_resumes(mesh, backends, consul) -> None:
    a, b = backends("a"), backends("b")
    consul.register("web", a.port, address=a.host)
    m = mesh.start(*consul_config(mesh, consul))
    client = Client(m.ports["outbound"])
    assert client.seen() == {"a"}

    consul.stop()
    # The watch fails and backs off; traffic keeps going to the last endpoints.
    wait_for(lambda: "unreachable" in m.log(), 5, what="meshd to log the consul outage")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert client.seen(10) == {"a"}

    consul.register("web", b.port, address=b.host)    # a change made during the outage
    consul.restart()
    # Back on the same port: the watch is restarted with meshd's jittered backoff (0.5s
    # doubling per failure: at most 4s after the ~3 failures of this outage).
    client.until({"a", "b"}, timeout=8)


def web_source(admin_port: int) -> dict:
    """/endpoints: the consul source's view of web (stale, error, ...)."""
    _, _, raw = http_get("127.0.0.1", admin_port, "/endpoints")
    return json.loads(raw)["services"]["web"]["sources"]["consul"]


def test_restart_during_outage_routes_from_persisted_endpoints(mesh, backends, consul) -> None:
    a, b = backends("a"), backends("b")
    consul.register("web", a.port, address=a.host)
    text, ports = consul_config(mesh, consul)
    m = mesh.start(text, ports)
    assert Client(ports["outbound"]).seen() == {"a"}
    instance = text.split('instance = "')[1].split('"')[0]
    state_file = mesh.tmp_path / "state" / f"{instance}.endpoints"
    wait_for(state_file.exists, 5, what="the persisted endpoints")

    consul.stop()
    wait_for(lambda: "unreachable" in m.log(), 5, what="meshd to log the consul outage")
    m.signal(signal.SIGTERM)                           # restarted during the outage
    assert m.wait(20) == 0
    mesh.start(text, ports)                            # same config, same state_dir
    client = Client(ports["outbound"])
    assert client.seen() == {"a"}                      # from the persisted snapshot
    wait_for(lambda: web_source(ports["admin"])["error"], 5, what="the watch error")
    src = web_source(ports["admin"])
    assert src["stale"] is True and "unreachable" in src["error"], src

    consul.register("web", b.port, address=b.host)    # changed during the outage
    consul.restart()
    client.until({"a", "b"}, timeout=10)               # updates resume after the backoff
    src = web_source(ports["admin"])
    assert (src["stale"], src["error"]) == (False, None), src


@pytest.mark.measure  # a measurement, not a check: `pytest -m measure -s` runs it
def test_measure_change_to_traffic_latency(mesh, backends, consul) -> None:
    """Change at Consul -> first answer from the new endpoint, over 30 swaps of one instance
    between two backends (one mutation each: the same service ID re-registered)."""
    a, b = backends("a"), backends("b")
    consul.register("web", a.port, address=a.host, id="web-1")
    m = mesh.start(*consul_config(mesh, consul))
    client = Client(m.ports["outbound"])
    assert client.seen() == {"a"}
    samples = []
    rng = random.Random(7)
    for i in range(30):
        target = b if i % 2 == 0 else a
        # Random spacing: keeps the rate limiter out of it and avoids phase-locking with
        # the workers' snapshot poll.
        time.sleep(rng.uniform(0.2, 0.5))
        started = time.monotonic()
        consul.register("web", target.port, address=target.host, id="web-1")
        while client.who() != target.name:
            assert time.monotonic() - started < 5
        samples.append((time.monotonic() - started) * 1000)
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f"\nconsul change -> traffic: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"min {samples[0]:.1f} ms, max {samples[-1]:.1f} ms, n={len(samples)}")

    # The plugin's share: change -> Reset out of watch() (WatchRecorder's timestamps).
    rec = WatchRecorder(ConsulBackend("consul", {"address": consul.url}), "web")
    rec.next()
    plugin = []
    for i in range(30):
        time.sleep(rng.uniform(0.05, 0.15))
        seen = len(rec.updates)
        started = time.monotonic()
        consul.register("web", 9000 + i, address="127.0.0.1", id="web-1")
        rec.wait_for(lambda eps, i=i: bool(eps) and eps[0].port == 9000 + i, timeout=2)
        plugin.append((rec.updates[seen][0] - started) * 1000)
    rec.close()
    plugin.sort()
    print(f"consul change -> plugin Reset: p50 {statistics.median(plugin):.2f} ms, "
          f"max {plugin[-1]:.2f} ms")
