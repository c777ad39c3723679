"""GAMMA's reject and route filters end to end: a real meshd with the kubernetes config
source (the Kubernetes API test server) or the consul one (the Consul test server), real
HTTP/1.1 clients (http.client) and HTTP/2 clients (curl with prior knowledge), the test
backend (HTTP/1.1) and nginx (h2c) behind it.

- a Service with an HTTPRoute attached answers 404 (meshd-error naming the route) to a
  request no rule matches, over HTTP/1.1 and HTTP/2; a Service without one, and the same
  Service once the route is deleted, does not (live, no HUP);
- RequestHeaderModifier, ResponseHeaderModifier, URLRewrite (ReplacePrefixMatch,
  ReplaceFullPath) reach the backend from both client protocols, to an HTTP/1.1 and to an
  HTTP/2 upstream, and an edit applies live;
- Consul's PrefixRewrite and RequestHeaders do the same, and a request no route matches
  still goes to the service itself (Consul's router semantics)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_fleet_consul import fleet_config

from meshd.testing.harness import Meshd, http_get, wait_for
from meshd.testing.k8s_config import kubernetes_table
from meshd.testing.k8s_server import http_route
from meshd.testing.nginx import Nginx

# -- helpers ----------------------------------------------------------------------------------

def admin_json(m: Meshd, path: str) -> Any:
    status, _, body = http_get("127.0.0.1", m.ports["admin"], path)
    assert status == 200, (status, body)
    return json.loads(body)


def wait_applied(m: Meshd, service: str, predicate: Callable[[Any], bool],
                 timeout: float = 10.0) -> None:
    """Until /config shows ``service``'s effective routes satisfying ``predicate`` and
    every worker loaded a snapshot at least that recent (what proves the edit applied)."""
    def effective() -> Any:
        svc = admin_json(m, "/config")["fleet"]["services"].get(service, {})
        return svc.get("effective", {}).get("routes")
    wait_for(lambda: predicate(effective()), timeout, interval=0.01,
             what=f"routes of {service} applied")

    def published() -> bool:
        fleet = admin_json(m, "/config")["fleet"]
        return bool(fleet["version"] == fleet["published_version"])
    wait_for(published, timeout, interval=0.01, what="the policies published")
    m.wait_snapshot_loaded(timeout=timeout)


def curl(port: int, path: str, headers: dict[str, str], http2: bool,
         timeout: float = 10) -> tuple[int, dict[str, str], str]:
    """(status, response headers, body) of one request through meshd with curl:
    HTTP/2 with prior knowledge (h2c) or HTTP/1.1."""
    args = ["curl", "-si", "--max-time", str(timeout),
            "--http2-prior-knowledge" if http2 else "--http1.1"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run([*args, f"http://127.0.0.1:{port}{path}"], capture_output=True,
                         timeout=timeout + 5)
    text = out.stdout.decode(errors="replace")
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    assert lines, f"curl failed: {out.stderr.decode()}"
    assert lines[0].startswith("HTTP/2" if http2 else "HTTP/1.1"), lines[0]
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, fields, body


def k8s_config(mesh: Any, api: Any, tmp_path: Path, services: dict[str, list[str]],
               extra: str = "") -> tuple[str, dict[str, int]]:
    return mesh.config(services, workers=1, extra=kubernetes_table(api, tmp_path) + extra)


H2C_LOCATION = """add_header x-upstream nginx always;
return 200 "$server_protocol uri=$request_uri route=$http_x_route drop=$http_x_drop\\n";"""


@pytest.fixture
def h2c_nginx(tmp_path: Path) -> Iterator[Nginx]:
    """nginx speaking h2c (HTTP/2 with prior knowledge), answering what it received."""
    # `make test` installs nginx (scripts/ensure-tools.sh); missing, the test fails
    server = Nginx(tmp_path, "http2", H2C_LOCATION, worker_connections=64).start()
    yield server
    server.stop()


# -- GAMMA: unmatched -> 404 --------------------------------------------------------------------

def test_a_request_no_attached_route_matches_gets_404(mesh, backends, api, tmp_path):
    a, b = backends("a"), backends("b")
    m = mesh.start(*k8s_config(mesh, api, tmp_path, {"web": [a.address], "api": [b.address]}))
    port = m.ports["outbound"]
    assert http_get("127.0.0.1", port, "/other", {"Host": "web"})[::2] == (200, b"a /other\n")

    api.apply(http_route("web-v1", "web", [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}]}]))
    wait_applied(m, "web", lambda p: p is not None)
    assert http_get("127.0.0.1", port, "/v1/x", {"Host": "web"})[::2] == (200, b"a /v1/x\n")
    status, headers, body = http_get("127.0.0.1", port, "/other", {"Host": "web"})
    assert status == 404, body
    assert headers["meshd-error"] == ("no route of web matches the request "
                                      "(HTTPRoute default/web-v1)")
    assert body == headers["meshd-error"].encode() + b"\n"
    status, headers2, _ = curl(port, "/v1x", {"Host": "web"}, http2=True)   # by path elements
    assert status == 404 and headers2["meshd-error"] == headers["meshd-error"]
    assert curl(port, "/v1/y", {"Host": "web"}, http2=True)[::2] == (200, "a /v1/y\n")
    # A Service no route is attached to: the mesh's default, the Service itself.
    assert http_get("127.0.0.1", port, "/other", {"Host": "api"})[::2] == (200, b"b /other\n")
    # The 404s are counted on web's row as client errors, like any answer.
    def counted() -> bool:
        metrics = http_get("127.0.0.1", m.ports["admin"], "/metrics")[2].decode()
        return any('status_code="404"' in line and '"web"' in line
                   for line in metrics.splitlines() if line.startswith("response_total"))
    wait_for(counted, 10, what="the 404s counted on web's row")

    api.delete("httproutes", "web-v1")   # live: no HUP
    wait_applied(m, "web", lambda p: p is None)
    assert http_get("127.0.0.1", port, "/other", {"Host": "web"})[::2] == (200, b"a /other\n")


# -- HTTPRoute filters --------------------------------------------------------------------------

def _web_route(route_value: str) -> dict[str, Any]:
    return http_route("web-filters", "web", [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/headers"}}],
         "filters": [
             {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                 "set": [{"name": "X-Route", "value": route_value}],
                 "add": [{"name": "X-Added", "value": "a"}],
                 "remove": ["x-drop"]}},
             {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                 "set": [{"name": "x-served-by", "value": "mesh"}],
                 "remove": ["x-backend"]}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
             "type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
        {"matches": [{"path": {"type": "Exact", "value": "/full"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
             "type": "ReplaceFullPath", "replaceFullPath": "/replaced"}}}]}])


def test_httproute_filters_reach_the_backend_from_both_protocols(mesh, backends, api,
                                                                 tmp_path, h2c_nginx):
    a = backends("a")
    api.apply(_web_route("v1"))
    api.apply(http_route("h2web-filters", "h2web", [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [
             {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                 "set": [{"name": "x-route", "value": "h2"}], "remove": ["x-drop"]}},
             {"type": "URLRewrite", "urlRewrite": {"path": {
                 "type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]}]))
    m = mesh.start(*k8s_config(mesh, api, tmp_path, {
        "web": [a.address], "h2web": [f"127.0.0.1:{h2c_nginx.port}"]},
        extra='[service.h2web]\nprotocol = "h2"\n'))
    wait_applied(m, "web", lambda p: p is not None)
    wait_applied(m, "h2web", lambda p: p is not None)
    port = m.ports["outbound"]
    sent = {"Host": "web", "X-Route": "client", "X-Drop": "1"}

    for http2 in (False, True):
        status, headers, body = curl(port, "/headers", sent, http2)
        assert status == 200, body
        got = json.loads(body)
        assert got["x-route"] == "v1" and got["x-added"] == "a" and "x-drop" not in got, got
        assert headers["x-served-by"] == "mesh" and "x-backend" not in headers, headers
        assert curl(port, "/old/x?q=1", sent, http2)[::2] == (200, "a /new/x\n")
        assert curl(port, "/old", sent, http2)[::2] == (200, "a /new\n")
        assert curl(port, "/full", sent, http2)[::2] == (200, "a /replaced\n")
        assert curl(port, "/fuller", sent, http2)[0] == 404   # GAMMA: no rule matches
        # an HTTP/2 upstream (h2c): the same filters on the HTTP/2 head meshd sends
        status, headers, body = curl(port, "/old/p?k=v", {**sent, "Host": "h2web"}, http2)
        assert (status, body) == (200, "HTTP/2.0 uri=/new/p?k=v route=h2 drop=\n"), body
        assert headers["x-upstream"] == "nginx"
    # What the client sent stays in the access log's view: only the upstream's head changed.
    status, _, body = http_get("127.0.0.1", port, "/headers",
                               {"Host": "web", "X-Route": "client"})
    assert status == 200 and json.loads(body)["x-route"] == "v1"

    api.apply(_web_route("v2"))   # an edit applies live, no HUP
    wait_applied(m, "web", lambda p: p is not None and "v2" in json.dumps(p))
    for http2 in (False, True):
        status, _, body = curl(port, "/headers", sent, http2)
        assert status == 200 and json.loads(body)["x-route"] == "v2", body


# -- Consul ---------------------------------------------------------------------------------------



def _router(prefix: str) -> dict[str, Any]:
    return {"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/api/"}},
         "Destination": {"PrefixRewrite": prefix}},
        {"Match": {"HTTP": {"PathExact": "/headers"}},
         "Destination": {"RequestHeaders": {"Set": {"X-Route": "consul"},
                                            "Add": {"X-Added": "a"}, "Remove": ["x-drop"]},
                         "ResponseHeaders": {"Remove": ["x-backend"]}}}]}


def test_consul_prefix_rewrite_and_request_headers(mesh, backends, consul):
    a = backends("a")
    consul.register("web", a.port, address=a.host)
    consul.write_config(_router("/v2/"))
    m = mesh.start(*fleet_config(mesh, consul, workers=1))
    http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})   # watched on demand
    wait_applied(m, "web", lambda p: p is not None)
    port = m.ports["outbound"]
    sent = {"Host": "web", "X-Route": "client", "X-Drop": "1"}
    for http2 in (False, True):
        assert curl(port, "/api/x?q=1", sent, http2)[::2] == (200, "a /v2/x\n")
        status, headers, body = curl(port, "/headers", sent, http2)
        got = json.loads(body)
        assert status == 200 and got["x-route"] == "consul" and got["x-added"] == "a"
        assert "x-drop" not in got and "x-backend" not in headers, (got, headers)
        # Consul's router: what no route matches goes to the service itself, no 404
        assert curl(port, "/other", sent, http2)[::2] == (200, "a /other\n")
    consul.write_config(_router("/v3/"))   # live
    wait_applied(m, "web", lambda p: p is not None and "/v3/" in json.dumps(p))
    started = time.monotonic()
    assert curl(port, "/api/x", sent, False)[::2] == (200, "a /v3/x\n")
    assert time.monotonic() - started < 10
