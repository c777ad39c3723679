"""A real meshd with the kubernetes discovery plugin against the Kubernetes API test server
(TLS, a token file): traffic goes to the ready endpoints of the service's EndpointSlices
and follows changes; the API server going away keeps the last endpoints."""

from __future__ import annotations

import http.client
import json
import signal
import textwrap
import time

import pytest

from meshd.testing.harness import free_port, http_get, port_open, wait_for
from meshd.testing.k8s_config import kubernetes_table
from meshd.testing.k8s_server import endpoint

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"  # pod IPs: one port, as in a cluster


@pytest.fixture
def pods(backends):
    """Backends a, b, c listening on one port, each on its own loopback address."""
    for _ in range(20):
        port = free_port(A)
        if not any(port_open(h, port) for h in (B, C)):
            break
    started = {name: backends(name, port, host) for name, host in zip("abc", (A, B, C),
                                                                       strict=True)}
    return port, started


def start_mesh(mesh, api, tmp_path):
    extra = kubernetes_table(api, tmp_path, "discovery") + textwrap.dedent("""
        [service.web]
        balancer = "round_robin"  # these tests follow discovery: every endpoint gets traffic
        discovery = "k8s"
        timeout = "2s"
        """)
    text, ports = mesh.config({}, workers=1, extra=extra)
    m = mesh.start(text, ports)
    m.text = text
    return m


def seen(m, n=8):
    """The backends that answered ``n`` requests for web (round robin: each ready one)."""
    conn = http.client.HTTPConnection("127.0.0.1", m.ports["outbound"], timeout=5)
    names = []
    try:
        for _ in range(n):
            conn.request("GET", "/", headers={"Host": "web"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            names.append(resp.getheader("x-backend"))
    finally:
        conn.close()
    return set(names)


def follows(m, expected, timeout=2.0):
    wait_for(lambda: seen(m) == expected, timeout=timeout, interval=0.02,
             what=f"traffic to exactly {sorted(expected)}")


def test_routes_to_ready_endpoints_and_follows_changes(mesh, api, pods, tmp_path):
    port, _ = pods
    api.create_service("web")
    api.apply_slice("web-x", "web", [A, endpoint(B, ready=False)], ports={"http": port})
    m = start_mesh(mesh, api, tmp_path)
    assert seen(m) == {"a"}
    api.set_condition("web-x", B, ready=True)                          # becomes ready
    follows(m, {"a", "b"})
    api.apply_slice("web-y", "web", [C], ports={"http": port})         # added (another slice)
    follows(m, {"a", "b", "c"})
    api.apply_slice("web-x", "web", [B], ports={"http": port})         # a removed
    follows(m, {"b", "c"})
    api.set_condition("web-x", B, ready=False)                         # not ready
    follows(m, {"c"})
    api.delete_slice("web-y")
    api.set_condition("web-x", B, ready=True)
    follows(m, {"b"})


def test_terminating_endpoint_gets_no_new_requests(mesh, api, pods, tmp_path):
    port, _ = pods
    api.apply_slice("web-x", "web", [A, B], ports={"http": port})
    m = start_mesh(mesh, api, tmp_path)
    follows(m, {"a", "b"})
    api.set_condition("web-x", B, ready=False, serving=True, terminating=True)
    follows(m, {"a"})
    assert seen(m, 40) == {"a"}


def test_api_server_down_keeps_the_last_endpoints_and_updates_resume(mesh, api, pods,
                                                                    tmp_path):
    port, _ = pods
    api.apply_slice("web-x", "web", [A, B], ports={"http": port})
    m = start_mesh(mesh, api, tmp_path)
    follows(m, {"a", "b"})
    api.stop()
    wait_for(lambda: "watch of web failed" in m.log(), timeout=5, what="the watch failing")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # the outage goes on: traffic stays on the last set
        assert seen(m) == {"a", "b"}
    api.start()  # same port, same state
    api.set_condition("web-x", A, ready=False)
    follows(m, {"b"}, timeout=10)  # the watch restarts after meshd's backoff (a few s at most)
    api.wait_watches(1)
    api.set_condition("web-x", A, ready=True)
    follows(m, {"a", "b"})


def web_source(m):
    """/endpoints: the k8s source's view of web (stale, error, ...)."""
    _, _, raw = http_get("127.0.0.1", m.ports["admin"], "/endpoints")
    return json.loads(raw)["services"]["web"]["sources"]["k8s"]


def test_restart_during_outage_routes_from_persisted_endpoints(mesh, api, pods, tmp_path):
    port, _ = pods
    api.apply_slice("web-x", "web", [A, B], ports={"http": port})
    m = start_mesh(mesh, api, tmp_path)
    follows(m, {"a", "b"})
    instance = m.text.split('instance = "')[1].split('"')[0]
    wait_for((tmp_path / "state" / f"{instance}.endpoints").exists, timeout=5,
             what="the persisted endpoints")

    api.stop()
    wait_for(lambda: "watch of web failed" in m.log(), timeout=5, what="the watch failing")
    m.signal(signal.SIGTERM)                           # restarted during the outage
    assert m.wait(20) == 0
    m2 = mesh.start(m.text, m.ports)                   # same config, same state_dir
    assert seen(m2) == {"a", "b"}                      # from the persisted snapshot
    wait_for(lambda: web_source(m2)["error"], timeout=5, what="the watch error")
    assert web_source(m2)["stale"] is True

    api.start()                                        # same port, same state
    api.set_condition("web-x", A, ready=False)
    follows(m2, {"b"}, timeout=10)                     # updates resume after the backoff
    src = web_source(m2)
    assert (src["stale"], src["error"]) == (False, None), src
