"""Routing rules, failover, body replay on retry, per-try timeouts and per-endpoint limits:
the router's pure logic first, then real meshd processes with real backends."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from meshd.config import parse
from meshd.errors import ConfigError
from meshd.shm import KIND_WORKER
from meshd.testing.harness import KeepAliveLoad, http_get, wait_for
from meshd.testing.tcp_server import TcpServer
from meshd.worker.routing import Router

# -- the router, pure --------------------------------------------------------------------------

BASE = {
    "listener": [{"name": "out", "listen": "127.0.0.1:0"}, {"name": "edge", "listen": "127.0.0.1:0"}],
    "service": {"web": {"timeout": "3s", "retries": 2, "failover": ["web-dc2"]}},
}


def _router(routes: list[dict]) -> Router:
    return Router(parse(dict(BASE, route=routes)))


def test_first_matching_route_wins_and_unmatched_requests_keep_their_service():
    r = _router([
        {"host": "web", "path_prefix": "/api/", "service": "api"},
        {"host": "web", "path_regex": "^/v[0-9]+/", "methods": ["GET"], "service": "versioned"},
        {"host": "web", "headers": {"X-Canary": "1"}, "service": "canary"},
        {"host": "web", "listener": "edge", "service": "edge-web"},
    ])
    assert r.match("out", "web", b"GET", b"/api/x?q=1", [])[0] == "api"
    assert r.match("out", "web", b"GET", b"/apix", [])[0] == "web"
    assert r.match("out", "web", b"GET", b"/v2/items", [])[0] == "versioned"
    assert r.match("out", "web", b"POST", b"/v2/items", [])[0] == "web"
    assert r.match("out", "web", b"GET", b"/x", [(b"x-canary", b"1")])[0] == "canary"
    assert r.match("out", "web", b"GET", b"/x", [(b"x-canary", b"2")])[0] == "web"
    assert r.match("edge", "web", b"GET", b"/x", [])[0] == "edge-web"
    assert r.match("out", "other", b"GET", b"/api/x", []) == ("other", None)
    # the query string is not part of the path a prefix or regex sees
    assert r.match("out", "web", b"GET", b"/x?/api/", [])[0] == "web"


def test_weighted_backends_split_exactly_per_worker():
    r = _router([{"host": "web", "backends": [{"service": "v1", "weight": 90},
                                               {"service": "v2", "weight": 10}]}])
    seen = Counter(r.match("out", "web", b"GET", b"/", [])[0] for _ in range(1000))
    assert seen == {"v1": 900, "v2": 100}
    # smooth: the 10 % never arrive in a burst
    run = [r.match("out", "web", b"GET", b"/", [])[0] for _ in range(20)]
    assert run.count("v2") == 2 and run.index("v2") != run.index("v2", run.index("v2") + 1) - 1


def test_policy_takes_the_route_over_the_service_over_the_defaults():
    r = _router([{"host": "web", "path_prefix": "/slow", "timeout": "30s", "try_timeout": "5s",
                  "retries": 0, "retryable": True, "failover": []}])
    service, route = r.match("out", "web", b"GET", b"/slow/x", [])
    p = r.policy(service, route)
    assert (p.timeout, p.try_timeout, p.retries, p.retryable, p.failover) == (30.0, 5.0, 0, True, ())
    p = r.policy(*r.match("out", "web", b"GET", b"/", []))
    assert (p.timeout, p.try_timeout, p.retries, p.retryable, p.failover) == (3.0, 0.0, 2, False,
                                                                            ("web-dc2",))
    p = r.policy("unknown", None)
    assert (p.timeout, p.retries, p.failover) == (10.0, 1, ())


def test_route_config_errors_name_their_key_path():
    bad = dict(BASE, route=[
        {"path_prefix": "api", "backends": [{"service": "a", "weight": 0}], "methods": ["get"]},
        {"host": "web", "path_regex": "(", "headers": {"bad name": "1"}, "listener": "nope",
         "service": "a", "backends": [{"service": "b"}], "retryable": "yes", "colour": 1},
    ])
    with pytest.raises(ConfigError) as e:
        parse(bad)
    keys = {k for k, _ in e.value.problems}
    assert {"route[0].host", "route[0].path_prefix", "route[0].methods", "route[0].backends",
            "route[1].path_regex", "route[1].headers", "route[1].listener", "route[1].service",
            "route[1].retryable", "route[1].colour"} <= keys, e.value.problems


def test_service_resilience_keys_are_validated():
    with pytest.raises(ConfigError) as e:
        parse(dict(BASE, service={"web": {"failover": ["web"], "failure_on": ["5xx", "boom"],
                                          "hash_on": "cookie:x", "max_pending": -1,
                                          "balancer": "random"}}))
    keys = {k for k, _ in e.value.problems}
    assert keys == {"service.web.failover", "service.web.failure_on", "service.web.hash_on",
                    "service.web.max_pending", "service.web.balancer"}, e.value.problems
    cfg = parse(dict(BASE, service={"web": {"balancer": "consistent_hash", "hash_on": "header:X-User",
                                            "failure_on": ["connect"], "max_connections": 4}}))
    svc = cfg.services["web"]
    assert (svc.hash_on, svc.failure_on, svc.max_connections) == ("header:x-user", {"connect"}, 4)


# -- real processes ----------------------------------------------------------------------------

def _get(port: int, path: str = "/", headers: dict[str, str] | None = None,
         method: str = "GET", body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers={"Host": "web", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_a_90_10_split_lands_within_3_percent_over_2000_requests(mesh, backends):
    v1, v2 = backends("v1"), backends("v2")
    extra = """
[[route]]
host = "web"
backends = [{ service = "web-v1", weight = 90 }, { service = "web-v2", weight = 10 }]
"""
    m = mesh.run({"web-v1": [v1.address], "web-v2": [v2.address]}, extra=extra)
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", m.ports["outbound"], timeout=10)
        for _ in range(500):
            conn.request("GET", "/", headers={"Host": "web"})
            resp = conn.getresponse()
            resp.read()
            with lock:
                seen[resp.getheader("x-backend") or str(resp.status)] += 1
        conn.close()
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(seen.values()) == 2000, seen
    assert abs(seen["v2"] / 2000 - 0.10) <= 0.03, seen
    assert seen["v1"] + seen["v2"] == 2000, seen


def test_routes_by_path_method_and_header_end_to_end(mesh, backends):
    web, api, canary, writes = backends("web"), backends("api"), backends("canary"), backends("writes")
    extra = """
[[route]]
host = "web"
path_prefix = "/api/"
service = "api"

[[route]]
host = "web"
headers = { "x-canary" = "yes" }
service = "canary"

[[route]]
host = "web"
methods = ["POST", "PUT"]
service = "writes"
"""
    m = mesh.run({"web": [web.address], "api": [api.address], "canary": [canary.address],
                  "writes": [writes.address]}, extra=extra)
    port = m.ports["outbound"]
    assert _get(port, "/api/users")[1]["x-backend"] == "api"
    assert _get(port, "/other")[1]["x-backend"] == "web"
    assert _get(port, "/other", {"X-Canary": "yes"})[1]["x-backend"] == "canary"
    assert _get(port, "/other", method="POST", body=b"x")[1]["x-backend"] == "writes"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_failover_to_the_next_service_and_back(mesh, backends, tmp_path):
    a, b = backends("a"), backends("b")
    path = tmp_path / "endpoints.toml"
    _write(path, f'web = ["{a.address}"]\nweb-dc2 = ["{b.address}"]\n')
    text, ports = mesh.config({}, extra='[service.web]\nfailover = ["web-dc2"]\n')
    text = text.replace('plugin = "static"\n', f'plugin = "static"\nfile = "{path}"\ninterval = "100ms"\n')
    m = mesh.start(text, ports)
    port = m.ports["outbound"]

    def who() -> str:
        status, headers, _ = _get(port)
        return headers.get("x-backend", str(status))
    assert {who() for _ in range(10)} == {"a"}
    _write(path, f'web = []\nweb-dc2 = ["{b.address}"]\n')
    wait_for(lambda: {who() for _ in range(5)} == {"b"}, timeout=5, what="traffic on web-dc2")
    m.wait_snapshot_loaded()  # every worker, not only the one that answered
    assert {who() for _ in range(20)} == {"b"}
    _write(path, f'web = ["{a.address}"]\nweb-dc2 = ["{b.address}"]\n')
    wait_for(lambda: {who() for _ in range(5)} == {"a"}, timeout=5, what="traffic back on web")
    # both gone: 503 naming every service tried
    _write(path, "web = []\nweb-dc2 = []\n")
    wait_for(lambda: who() == "503", timeout=5, what="503 once nothing is left")
    m.wait_snapshot_loaded()  # every worker, not only the one that answered
    status, headers, _ = _get(port)
    assert status == 503 and "web, web-dc2" in headers["meshd-error"], headers


def test_a_reload_applies_new_routes_without_dropping_connections(mesh, backends):
    v1, v2 = backends("v1"), backends("v2")
    route = '\n[[route]]\nhost = "web"\nservice = "{}"\n'
    text, ports = mesh.config({"web-v1": [v1.address], "web-v2": [v2.address]},
                              extra=route.format("web-v1"))
    m = mesh.start(text, ports)
    port = m.ports["outbound"]
    assert _get(port)[1]["x-backend"] == "v1"
    load = KeepAliveLoad("127.0.0.1", port, 8, "/", {"Host": "web"}).start()
    try:
        wait_for(lambda: load.ok >= 50, timeout=30, what="the load running")
        Path(m.config_path).write_text(text.replace(route.format("web-v1"), route.format("web-v2")))
        m.signal(signal.SIGHUP)
        wait_for(lambda: {_get(port)[1]["x-backend"] for _ in range(6)} == {"v2"}, timeout=15,
                 what="the new route serving")
        # the old generation drains under load: its workers are gone
        gen = max(s.generation for s in m.slots(KIND_WORKER))
        wait_for(lambda: all(s.generation == gen for s in m.slots(KIND_WORKER)), timeout=30,
                 what="the old generation's workers gone")
        wait_for(lambda: load.ok > 100, timeout=30, what="the load served")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 100


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bodies_are_replayed_on_retry_up_to_64_kib(mesh, backends):
    """One of three endpoints answers 503: an idempotent PUT with a 10 KiB body, a POST on
    a route marked retryable and a chunked PUT are retried elsewhere with the body intact;
    a PUT whose body is over 64 KiB is not retried (the 503 reaches the client)."""
    a, b, bad = backends("a"), backends("b"), backends("bad")
    http_get(bad.host, bad.port, "/_fail?code=503")
    extra = """
[service.web]
balancer = "round_robin"
failure_accrual = 0
retries = 2

[[route]]
host = "web"
path_prefix = "/upload"
methods = ["POST"]
retryable = true
service = "web"
"""
    m = mesh.run({"web": [a.address, b.address, bad.address]}, extra=extra)
    port = m.ports["outbound"]
    small = os.urandom(10 * 1024)
    for method in ("PUT", "POST"):
        for _ in range(6):
            status, headers, raw = _get(port, "/upload", method=method, body=small)
            assert status == 200, (method, status, headers)
            assert json.loads(raw) == {"bytes": len(small), "sha256": _sha(small)}
    for _ in range(6):  # chunked, in several pieces
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("PUT", "/upload", body=iter([small[:3000], small[3000:7000], small[7000:]]),
                     headers={"Host": "web"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read()) == {"bytes": len(small), "sha256": _sha(small)}
        conn.close()
    # about every third request met the failing endpoint; each worker keeps its own
    # round-robin turn, and under load the requests split unevenly between them
    assert m.metric("retry_total") >= 3
    big = os.urandom(100 * 1024)
    statuses = Counter(_get(port, "/upload", method="PUT", body=big)[0] for _ in range(9))
    assert statuses[503] >= 2 and statuses[200] >= 5, statuses
    # a plain POST (no retryable route) is not retried either
    posts = Counter(_get(port, "/other", method="POST", body=b"x")[0] for _ in range(9))
    assert posts[503] >= 2, posts


class SilentServer:
    """Accepts, reads a request, never answers; records how long each connection stayed
    open after its request arrived (the proxy's cancellation closes it)."""

    def __init__(self) -> None:
        self.held: list[float] = []
        self.server = TcpServer(self._hold)
        self.address = self.server.address

    def _hold(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            data = conn.recv(65536)
            if not data:
                return
            arrived = time.monotonic()
            while conn.recv(65536):
                pass
            self.held.append(time.monotonic() - arrived)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.server.close()


def test_try_timeout_cancels_the_attempt_and_retries_elsewhere(mesh, backends):
    silent = SilentServer()
    a = backends("a")
    try:
        extra = """
[service.web]
balancer = "round_robin"
failure_accrual = 0
timeout = "10s"
try_timeout = "1s"
retries = 1
"""
        m = mesh.run({"web": [silent.address, a.address]}, workers=1, extra=extra)
        port = m.ports["outbound"]
        for _ in range(4):  # round robin: two of them meet the silent endpoint first
            status, headers, _ = _get(port)
            assert (status, headers.get("x-backend")) == (200, "a"), headers
        wait_for(lambda: len(silent.held) >= 2, timeout=5, what="the silent endpoint's closes")
        # each attempt was cancelled at its try_timeout (within 10 %), and the upstream saw it
        assert all(0.9 <= held <= 1.1 for held in silent.held), silent.held
        # with every endpoint silent: 504 naming the try_timeout, after retries, within
        # the whole request's timeout
        extra2 = extra.replace('"10s"', '"3s"').replace("retries = 1", "retries = 5")
        m2 = mesh.run({"web": [silent.address]}, workers=1, extra=extra2)
        started = time.monotonic()
        status, headers, _ = _get(m2.ports["outbound"])
        elapsed = time.monotonic() - started
        assert status == 504 and "timeout" in headers["meshd-error"], headers
        assert 2.7 <= elapsed <= 3.3, elapsed
    finally:
        silent.close()


def test_consistent_hash_keeps_a_key_on_one_endpoint(mesh, backends):
    bs = [backends(n) for n in "abc"]
    extra = '[service.web]\nbalancer = "consistent_hash"\nhash_on = "header:x-user"\n'
    m = mesh.run({"web": [b.address for b in bs]}, extra=extra)
    port = m.ports["outbound"]
    owners = {}
    for user in range(24):
        seen = {_get(port, headers={"X-User": f"u{user}"})[1]["x-backend"] for _ in range(4)}
        assert len(seen) == 1, (user, seen)
        owners[user] = seen.pop()
    assert len(set(owners.values())) == 3, owners
    # without the header the request is still served (balanced like p2c)
    assert _get(port)[0] == 200


def test_consistent_hash_on_the_client_address_over_http1_and_h2(mesh, backends):
    """hash_on = "client_address" (the default): HTTP/1.1 and HTTP/2 connections from
    127.0.0.1 hash to one endpoint, since both look the address up the same way."""
    bs = [backends(n) for n in "abc"]
    m = mesh.run({"web": [b.address for b in bs]}, extra='[service.web]\nbalancer = "consistent_hash"\n')
    port = m.ports["outbound"]
    seen = {_get(port)[1]["x-backend"] for _ in range(6)}
    for _ in range(6):
        r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web",
                            f"http://127.0.0.1:{port}/"], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        seen.add(r.stdout.split()[0].decode())
    assert len(seen) == 1, seen


def _hold_requests(port: int, n: int, path: str) -> list[threading.Thread]:
    def one() -> None:
        _get(port, path)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.parametrize("limit", ["max_pending", "max_connections"])
def test_per_endpoint_limits_answer_503_at_once(mesh, backends, limit):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, extra=f"[service.web]\n{limit} = 2\nretries = 0\n")
    port = m.ports["outbound"]
    held = _hold_requests(port, 2, "/slow?ms=8000")
    # both in flight at the endpoint before the probe (else a probe may take a slot first)
    def in_flight() -> int:
        raw = http_get("127.0.0.1", m.ports["admin"], "/endpoints")[2]
        return sum(e["in_flight"] for e in json.loads(raw)["services"]["web"]["endpoints"])
    wait_for(lambda: in_flight() >= 2, timeout=6, what="the two slow requests at the endpoint")
    try:
        def busy() -> bool:
            status, headers, _ = _get(port)
            return status == 503 and limit in headers.get("meshd-error", "")
        # both workers see the two requests held by whichever worker took them
        wait_for(busy, timeout=6, interval=0.05, what=f"a 503 naming {limit}")
        assert all(t.is_alive() for t in held)  # answered while the slow ones still wait
    finally:
        for t in held:
            t.join(20)
    # freed again (the slots are released just after the responses went out)
    wait_for(lambda: _get(port)[0] == 200, timeout=5, what="a 200 once the slow ones ended")
