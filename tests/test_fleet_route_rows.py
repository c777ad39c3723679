"""Metric rows of the routes a config source adds live (``route_*`` families).

A Consul service-router written while meshd runs, and an HTTPRoute applied to the
Kubernetes test server, count their requests under their own route name (Consul:
``service-router/<service>#<index>``; Gateway API: ``<namespace>/<name>#<rule name or
index>``) and ``dst`` = the service, not under ``route="_overflow"``, without a HUP; a
HUP keeps them on the same rows (their counters continue). Units: the row keys, the
cap shared with ``[[route]]`` tables, and a route's key made once when routes are
compiled, not per request."""

from __future__ import annotations

import json
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

from test_fleet_consul import fleet_config

from meshd import rowkeys
from meshd.config import load
from meshd.control.rows import RowTable
from meshd.fleet.api import Match, PathMatch, Route, Routes
from meshd.fleet.wire import Policy as FleetPolicy
from meshd.fleet.wire import pack
from meshd.shm import Region
from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import Meshd, http_get, wait_for
from meshd.testing.k8s_config import kubernetes_table
from meshd.testing.k8s_server import K8sApiServer, backend, http_route
from meshd.worker.routing import Router

ROUTE_LABELS = 'direction="outbound",listener="outbound",dst="{dst}",route="{route}",rt_route="{route}"'


def route_requests(m: Meshd, dst: str, route: str) -> float:
    return m.metric("route_request_total", ROUTE_LABELS.format(dst=dst, route=route))


def overflow(m: Meshd) -> float:
    """Requests counted under route="_overflow", and route labels that overflowed."""
    return (m.metric("route_request_total", 'route="_overflow"')
            + m.metric("meshd_label_overflow_total", 'label="route"'))


def admin_json(m: Meshd, path: str) -> Any:
    status, _, body = http_get("127.0.0.1", m.ports["admin"], path)  # type: ignore[attr-defined]
    assert status == 200, (status, body)
    return json.loads(body)


def wait_routes_applied(m: Meshd, service: str, entry: str) -> None:
    """/config shows ``service``'s routes from ``entry`` and every worker loaded a
    snapshot at least as recent as the one that published them."""
    def shown() -> bool:
        routes = admin_json(m, "/config")["fleet"]["services"].get(service, {}).get(
            "effective", {}).get("routes")
        return bool(routes) and str(routes["from"]).endswith(entry)
    wait_for(shown, 20, interval=0.01, what=f"routes of {service} from {entry} applied")

    def published() -> bool:
        fleet = admin_json(m, "/config")["fleet"]
        return bool(fleet["version"] == fleet["published_version"])
    wait_for(published, 20, interval=0.01, what="the policies published")
    m.wait_snapshot_loaded(timeout=20)


def reload(m: Meshd) -> None:
    """HUP, and wait until generation 2 alone serves (the old control process answers
    the admin port until the master retires it)."""
    m.signal(signal.SIGHUP)
    wait_for(lambda: {s.generation for s in m.slots()} == {2}, timeout=60,
             what="generation 2 alone in the process table")
    m.wait_ready(60)
    m.wait_snapshot_loaded(timeout=20)


def get(m: Meshd, path: str, host: str = "web") -> tuple[int, bytes]:
    status, _, body = http_get("127.0.0.1", m.ports["outbound"], path, {"Host": host})  # type: ignore[attr-defined]
    return status, body


# -- end to end ---------------------------------------------------------------------------

def test_consul_router_written_live_counts_under_its_route_name(mesh, backends,
                                                                consul: ConsulServer) -> None:
    a, b = backends("a"), backends("api")
    consul.register("web", a.port, address=a.host)
    consul.register("web-api", b.port, address=b.host)
    m = mesh.start(*fleet_config(mesh, consul))
    assert get(m, "/first") == (200, b"a /first\n")    # web watched, no router yet
    consul.write_config({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/api"}}, "Destination": {"Service": "web-api"}},
        {"Match": {"HTTP": {"PathPrefix": "/a"}}}]})
    wait_routes_applied(m, "web", "service-router/web")
    for i in range(5):
        assert get(m, f"/api/{i}") == (200, f"api /api/{i}\n".encode())
    assert get(m, "/abc") == (200, b"a /abc\n")
    assert get(m, "/other") == (200, b"a /other\n")   # no route
    assert route_requests(m, "web", "service-router/web#0") == 5
    assert route_requests(m, "web", "service-router/web#1") == 1
    m.wait_metric("route_response_total", ROUTE_LABELS.format(
        dst="web", route="service-router/web#0") + ',status_code="200"', 5)
    assert overflow(m) == 0
    # A reload keeps the rows: the counters go on from where they were.
    reload(m)
    for i in range(3):
        assert get(m, f"/api/{i}")[0] == 200
    assert route_requests(m, "web", "service-router/web#0") == 8
    assert route_requests(m, "web", "service-router/web#1") == 1
    assert overflow(m) == 0


def test_httproute_applied_live_counts_under_its_rule_names(mesh, backends, tmp_path: Path,
                                                           api: K8sApiServer) -> None:
    a, b = backends("a"), backends("api")
    m = mesh.start(*mesh.config({"web": [a.address], "web-api": [b.address]}, workers=2,
                                extra=kubernetes_table(api, tmp_path)))
    assert get(m, "/first") == (200, b"a /first\n")
    api.apply(http_route("web-routes", "web", [
        {"name": "api", "matches": [{"path": {"type": "PathPrefix", "value": "/api"}},
                                    {"headers": [{"name": "x-api", "value": "1"}]}],
         "backendRefs": [backend("web-api")]},
        {"backendRefs": [backend("web")]}]))
    wait_routes_applied(m, "web", "HTTPRoute default/web-routes")
    for i in range(4):
        assert get(m, f"/api/{i}") == (200, f"api /api/{i}\n".encode())
    status, _, _ = http_get("127.0.0.1", m.ports["outbound"], "/h",  # type: ignore[attr-defined]
                            {"Host": "web", "x-api": "1"})
    assert status == 200                      # the rule's second match: the same route
    assert get(m, "/x") == (200, b"a /x\n")   # the unnamed rule, by its index
    assert route_requests(m, "web", "default/web-routes#api") == 5
    assert route_requests(m, "web", "default/web-routes#1") == 1
    assert overflow(m) == 0
    reload(m)
    assert get(m, "/api/again")[0] == 200
    assert route_requests(m, "web", "default/web-routes#api") == 6
    assert overflow(m) == 0


# -- units ----------------------------------------------------------------------------------

def test_fleet_route_keys_name_the_route_and_its_service() -> None:
    k = rowkeys.fleet_route_key("default/r#0", "web")
    assert rowkeys.parts(k) == ("", "false", "", "", "default/r#0", "web")
    assert rowkeys.parts(rowkeys.route_key("r1")) == ("", "false", "", "", "r1", "")
    assert rowkeys.parts(rowkeys.OVERFLOW_KEY).route == rowkeys.OVERFLOW
    for name, ok in (("service-router/web#0", True), ("", False), ("a\x1fb", False),
                     ("x" * rowkeys.MAX_ROUTE_NAME, True),
                     ("x" * (rowkeys.MAX_ROUTE_NAME + 1), False), ("a\nb", False)):
        assert rowkeys.fleet_route_name_ok(name) == ok, name


def _config(tmp_path: Path, routes: int) -> Any:
    text = textwrap.dedent("""\
        [[listener]]
        name = "outbound"
        listen = "127.0.0.1:1"
        direction = "outbound"
        protocol = "http"

        [[listener]]
        name = "orders-only"
        listen = "127.0.0.1:2"
        direction = "outbound"
        protocol = "http"
        service = "orders"

        [[listener]]
        name = "tcp"
        listen = "127.0.0.1:3"
        direction = "outbound"
        protocol = "tcp"
        service = "web"
        """) + "".join(f'[[route]]\nname = "r{i}"\nhost = "other"\npath_prefix = "/r{i}"\n\n'
                       for i in range(routes))
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return load(str(path))


def test_fleet_routes_get_rows_within_the_cap_shared_with_file_routes(tmp_path) -> None:
    cfg = _config(tmp_path, routes=rowkeys.MAX_ROUTE_ROWS - 2)
    region = Region.create(str(tmp_path / "rows.shm"), 2, 1024)
    try:
        table = RowTable(region, None)
        table.routes(cfg)
        names = ["service-router/web#0", "service-router/web#1", "service-router/web#2",
                 "bad\x00name"]
        assert table.fleet_routes(cfg, "web", names)
        out = table.rows["outbound"]
        assert rowkeys.fleet_route_key(names[0], "web") in out
        assert rowkeys.fleet_route_key(names[1], "web") in out
        assert rowkeys.fleet_route_key(names[2], "web") not in out    # past the cap
        assert sum(1 for k in out if k.startswith(rowkeys.ROUTE)) == rowkeys.MAX_ROUTE_ROWS + 1
        assert "tcp" not in table.rows                                # no route rows there
        assert "orders-only" not in table.rows                        # routes orders only
        assert not table.fleet_routes(cfg, "web", names[:2])          # nothing new
        # the listener of one service has room: its rows come with that service's routes
        assert table.fleet_routes(cfg, "orders", ["default/orders#0"])
        assert set(table.rows["orders-only"]) == {
            rowkeys.OVERFLOW_KEY, rowkeys.fleet_route_key("default/orders#0", "orders")}
        # a reload seeds the rows: the same keys, the same rows, nothing added
        again = RowTable(region, table.rows)
        again.routes(cfg)
        assert not again.fleet_routes(cfg, "web", names[:2])
        assert again.rows == table.rows
    finally:
        region.close()


def test_a_routes_row_key_is_made_when_routes_are_compiled(tmp_path) -> None:
    cfg = load(str(_write(tmp_path, '[[route]]\nname = "local"\nhost = "other"\n')))
    router = Router(cfg)
    routes = Routes("service-router/web", (
        Route("service-router/web#0", (Match(PathMatch("prefix", "/a")),)),
        Route("service-router/web#1")))
    router.set_fleet("v1", {"web": pack(FleetPolicy("web", routes))})
    first = router.request_policy("outbound", "web", b"GET", b"/a", [])
    again = router.request_policy("outbound", "web", b"GET", b"/a", [])
    assert first.route_key == rowkeys.fleet_route_key("service-router/web#0", "web")
    assert first.route_key is again.route_key          # one string, not one per request
    assert router.request_policy("outbound", "web", b"GET", b"/b", []).route_key == \
        rowkeys.fleet_route_key("service-router/web#1", "web")
    local = router.request_policy("outbound", "other", b"GET", b"/", [])
    assert local.route == "local" and local.route_key == rowkeys.route_key("local")
    assert local.route_key is router.request_policy("outbound", "other", b"GET", b"/", []).route_key
    assert router.request_policy("outbound", "nope", b"GET", b"/", []).route_key == ""
    # a new snapshot with the same policy keeps the compiled keys
    router.set_fleet("v2", {"web": pack(FleetPolicy("web", routes))})
    assert router.request_policy("outbound", "web", b"GET", b"/a", []).route_key is first.route_key


def _write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / f"m{time.monotonic_ns()}.toml"
    path.write_text(textwrap.dedent("""\
        [[listener]]
        name = "outbound"
        listen = "127.0.0.1:1"
        direction = "outbound"
        protocol = "http"
        """) + extra)
    return path
