"""Fleet control from the Kubernetes Gateway API: the test server's route resources
(kubectl-style writes, list, watch, 410), the ``kubernetes`` config source against it
(list+watch shared per namespace, refused routes, 410 re-list, token rotation), and a
real meshd with it: a canary moved 0 -> 10 -> 50 -> 100 % by HTTPRoute weights under
load, a path match with its own timeout, an invalid HTTPRoute refused and named while
the previous one keeps serving, a 410 during the watch, the API server down (and a
restart) keeping the routes, a GRPCRoute sending one method elsewhere (grpcio)."""

from __future__ import annotations

import functools
import json
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
import requests
import yaml
from meshd_kubernetes.config_source import RESOURCE, KubernetesConfigSource

from meshd.errors import ConfigError
from meshd.fleet.api import Clear, Refused, Routes, Set, Update
from meshd.testing.harness import Meshd, http_get, wait_for
from meshd.testing.k8s_config import kubernetes_table
from meshd.testing.k8s_server import GATEWAY, backend, grpc_route, http_route
from meshd.testing.load import CountingLoad

ROUTES = f"/apis/{GATEWAY}/namespaces/default/httproutes"


class Recorder:
    """Runs a config source's watch of one service in a thread, keeping its updates."""

    def __init__(self, source: KubernetesConfigSource, service: str) -> None:
        self.source = source
        self.updates: list[Update] = []
        self.error: BaseException | None = None
        self.routes: Routes | None = None
        self.refused: Refused | None = None
        self._cond = threading.Condition()
        self._gen = source.watch(service)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for u in self._gen:
                with self._cond:
                    self.updates.append(u)
                    if isinstance(u, Set):
                        assert isinstance(u.part, Routes)
                        self.routes, self.refused = u.part, None
                    elif isinstance(u, Clear):
                        self.routes = self.refused = None
                    elif isinstance(u, Refused):
                        self.refused = u
                    self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def wait_for(self, cond: Callable[[Recorder], bool], timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: cond(self) or self.error is not None, timeout):
                raise TimeoutError(f"not reached; updates: {self.updates[-3:]}")
            assert self.error is None, repr(self.error)


def weights(rec: Recorder) -> list[tuple[str, int]] | None:
    if rec.routes is None:
        return None
    return [(w.target.service, w.weight) for w in rec.routes.routes[0].destination]


@pytest.fixture
def source(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("test-token\n")
    made: list[KubernetesConfigSource] = []

    def make(**options):
        opts = {"api_server": api.url, "token_file": str(token), "ca_file": api.ca_file,
                "namespace": "default", "timeout": "2s", **options}
        made.append(KubernetesConfigSource("k8s", opts))
        return made[-1]

    make.token = token
    yield make
    for s in made:
        s.close()


def canary(weight: int):
    return http_route("web-canary", "web", [
        {"backendRefs": [backend("web", 100 - weight), backend("web-canary", weight)]}])


# -- the test server --------------------------------------------------------------------------

def test_server_takes_kubectl_style_writes_and_watches_them(api):
    s = requests.Session()
    s.headers["Authorization"] = "Bearer test-token"
    s.request = functools.partial(s.request, verify=api.ca_file)  # type: ignore[method-assign]
    r = s.post(api.url + ROUTES, json=canary(10))
    assert r.status_code == 201
    md = r.json()["metadata"]
    assert md["generation"] == 1 and md["creationTimestamp"].endswith("Z") and md["uid"]
    assert s.post(api.url + ROUTES, json=canary(10)).json()["reason"] == "AlreadyExists"
    lst = s.get(api.url + ROUTES).json()
    assert lst["kind"] == "HTTPRouteList" and lst["items"][0]["kind"] == "HTTPRoute"
    rv = lst["metadata"]["resourceVersion"]
    stale = canary(50)
    stale["metadata"]["resourceVersion"] = "1"
    assert s.put(api.url + ROUTES + "/web-canary", json=stale).status_code == 409
    fresh = canary(50)
    fresh["metadata"]["resourceVersion"] = md["resourceVersion"]
    r = s.put(api.url + ROUTES + "/web-canary", json=fresh)
    assert r.status_code == 200 and r.json()["metadata"]["generation"] == 2
    assert r.json()["metadata"]["creationTimestamp"] == md["creationTimestamp"]
    patch = {"spec": {"rules": canary(70)["spec"]["rules"]}, "metadata": {"labels": {"a": "b"}}}
    r = s.patch(api.url + ROUTES + "/web-canary", json=patch,
                headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200 and r.json()["metadata"]["generation"] == 3
    assert r.json()["spec"]["rules"][0]["backendRefs"][1]["weight"] == 70
    assert r.json()["spec"]["parentRefs"] == canary(0)["spec"]["parentRefs"]   # merged
    r = s.patch(api.url + ROUTES + "/web-canary", json=patch,
                headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert r.status_code == 415   # no strategic merge for custom resources
    assert s.delete(api.url + ROUTES + "/web-canary").status_code == 200
    assert s.delete(api.url + ROUTES + "/web-canary").status_code == 404
    assert s.put(api.url + ROUTES + "/x", json=canary(1)).status_code == 400   # name != URL
    assert requests.get(api.url + ROUTES, verify=api.ca_file).status_code == 401
    w = s.get(api.url + ROUTES, params={"watch": "1", "resourceVersion": rv,
                                        "timeoutSeconds": "1"})
    events = [e.split('"type": ')[1][:10] for e in w.text.splitlines()]
    assert events == ['"MODIFIED"', '"MODIFIED"', '"DELETED",']
    api.expire_history()
    w = s.get(api.url + ROUTES, params={"watch": "1", "resourceVersion": rv})
    assert '"code": 410' in w.text


# -- the config source ------------------------------------------------------------------------

def test_options_are_checked_like_the_discovery_plugin(api):
    with pytest.raises(ConfigError) as e:
        KubernetesConfigSource("k8s", {"api_server": "ftp://x", "kinds": ["Ingress"],
                                       "port": "http"})
    keys = sorted(k for k, _ in e.value.problems)
    assert keys == ["api_server", "kinds", "port"]


def test_routes_follow_apply_edit_and_delete_and_one_watch_serves_a_namespace(api, source):
    src = source()
    web = Recorder(src, "web")
    web.wait_for(lambda r: r.updates == [Clear("routes")])
    other = Recorder(src, "api")
    other.wait_for(lambda r: r.updates == [Clear("routes")])
    api.wait_watches(2)   # httproutes and grpcroutes of ns default, shared by both
    assert api.open_watches() == 2
    assert len(api.slice_requests(watch=False, resource="httproutes")) == 1

    api.apply(canary(10))
    web.wait_for(lambda r: weights(r) == [("web", 90), ("web-canary", 10)])
    assert web.routes is not None and web.routes.entry == "HTTPRoute default/web-canary"
    api.apply(canary(50))
    web.wait_for(lambda r: weights(r) == [("web", 50), ("web-canary", 50)])
    api.apply(grpc_route("greeter", "web", [{"matches": [{"method": {"service": "g.G"}}]}]))
    web.wait_for(lambda r: r.routes is not None and len(r.routes.routes) == 2)
    api.delete("httproutes", "web-canary")
    api.delete("grpcroutes", "greeter")
    web.wait_for(lambda r: isinstance(r.updates[-1], Clear))
    assert other.updates == [Clear("routes")]   # none of it was attached to "api"
    # A route edited to attach to another Service leaves the first and reaches the other.
    api.apply(canary(10))
    web.wait_for(lambda r: weights(r) == [("web", 90), ("web-canary", 10)])
    moved = canary(10)
    moved["spec"]["parentRefs"][0]["name"] = "api"
    api.apply(moved)
    other.wait_for(lambda r: weights(r) == [("web", 90), ("web-canary", 10)])
    web.wait_for(lambda r: isinstance(r.updates[-1], Clear))


def test_invalid_route_is_refused_by_name_and_the_previous_one_keeps_serving(api, source):
    rec = Recorder(source(), "web")
    api.apply(canary(10))
    rec.wait_for(lambda r: weights(r) == [("web", 90), ("web-canary", 10)])
    bad = canary(20)
    bad["spec"]["rules"][0]["matches"] = [{"path": {"type": "RegularExpression",
                                                    "value": "/(unclosed"}}]
    api.apply(bad)
    rec.wait_for(lambda r: r.refused is not None)
    assert rec.refused is not None and rec.refused.entry == "HTTPRoute default/web-canary"
    assert rec.refused.reason.startswith("spec.rules[0].matches[0].path.value: not a regular")
    assert weights(rec) == [("web", 90), ("web-canary", 10)]
    api.apply(canary(30))
    rec.wait_for(lambda r: weights(r) == [("web", 70), ("web-canary", 30)] and not r.refused)


def test_410_during_the_watch_relists_and_the_routes_stay(api, source):
    rec = Recorder(source(), "web")
    api.apply(canary(10))
    rec.wait_for(lambda r: weights(r) == [("web", 90), ("web-canary", 10)])
    api.wait_watches(2)
    lists = len(api.slice_requests(watch=False, resource="httproutes"))
    api.expire_history()
    api.drop_watches()          # the re-watch from the old resourceVersion gets 410
    api.wait_requests(lists + 1, watch=False, resource="httproutes")
    api.wait_watches(2)
    assert weights(rec) == [("web", 90), ("web-canary", 10)]
    assert [type(u) for u in rec.updates] == [Set]   # nothing changed: nothing said
    # A change made while the history was gone arrives by the list.
    api.expire_history()
    api.drop_watches()
    api.apply(canary(40))
    rec.wait_for(lambda r: weights(r) == [("web", 60), ("web-canary", 40)])
    assert rec.error is None


def test_token_rotation_and_bookmarks(api, source):
    src = source()
    rec = Recorder(src, "web")
    rec.wait_for(lambda r: r.updates == [Clear("routes")])
    api.wait_watches(2)
    api.send_bookmark()
    api.set_tokens("rotated")          # the old token is refused from now on
    source.token.write_text("rotated\n")
    api.drop_watches()                 # the re-watch gets 401, re-reads the file, retries
    api.wait_requests(1, watch=True, status=401, resource="httproutes")
    api.wait_watches(2)
    api.apply(canary(10))
    rec.wait_for(lambda r: weights(r) == [("web", 90), ("web-canary", 10)])
    watches = api.slice_requests(watch=True, resource="httproutes")
    assert watches[-1].token == "rotated" and rec.error is None


def test_api_errors_end_the_watches_so_meshd_backs_off(api, source):
    src = source()
    api.fail_next(1, 403, "httproutes")
    rec = Recorder(src, "web")
    with rec._cond:
        assert rec._cond.wait_for(lambda: rec.error is not None, 5)
    assert "403 Forbidden listing httproutes in ns default" in str(rec.error)
    again = Recorder(src, "web")   # what meshd does after its backoff
    again.wait_for(lambda r: r.updates == [Clear("routes")])


def test_a_route_kind_without_its_crd_counts_as_empty_and_is_looked_for_again(api, source):
    api.fail_next(1, 404, "grpcroutes")   # as when the GRPCRoute CRD is not installed
    rec = Recorder(source(watch_timeout="1s"), "web")
    rec.wait_for(lambda r: r.updates == [Clear("routes")])
    api.apply(canary(10))
    rec.wait_for(lambda r: weights(r) == [("web", 90), ("web-canary", 10)])
    api.wait_requests(1, watch=False, status=404, resource="grpcroutes")
    api.wait_requests(1, watch=False, status=200, resource="grpcroutes", timeout=5)
    api.apply(grpc_route("g", "web", [{"matches": [{"method": {"service": "g.G"}}]}]))
    rec.wait_for(lambda r: r.routes is not None and len(r.routes.routes) == 2)


def test_a_service_in_another_namespace_takes_consumer_routes_from_meshds(api, source):
    rec = Recorder(source(), "cart.shop")   # meshd's namespace is "default"
    api.apply(http_route("p", "cart", [{"backendRefs": [backend("cart-v2")]}],
                         namespace="shop"))
    rec.wait_for(lambda r: r.routes is not None and r.routes.entry == "HTTPRoute shop/p")
    assert weights(rec) == [("cart-v2.shop", 1)]
    api.wait_watches(4)   # routes of both kinds in "shop", and in "default"
    api.apply(http_route("c", "cart", [{"backendRefs": [backend("cart-v3", 1)]}],
                         service_namespace="shop"))
    rec.wait_for(lambda r: r.routes is not None and r.routes.entry == "HTTPRoute default/c")
    api.delete("httproutes", "c")
    rec.wait_for(lambda r: r.routes is not None and r.routes.entry == "HTTPRoute shop/p")


def test_shipped_rbac_grants_what_the_source_reads():
    docs = list(yaml.safe_load_all(
        (Path(__file__).parent.parent / "deploy/kubernetes/rbac-gateway-api.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ClusterRole", "ClusterRoleBinding"]
    granted = {(g, r, v) for rule in docs[0]["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("gateway.networking.k8s.io", r, v) for r in RESOURCE.values()
                       for v in ("get", "list", "watch")}
    assert docs[1]["roleRef"]["name"] == docs[0]["metadata"]["name"]


# -- a real meshd ---------------------------------------------------------------------------

def k8s_config(mesh, api, tmp_path, services, workers=2, extra=""):
    return mesh.config(services, workers=workers, extra=kubernetes_table(api, tmp_path) + extra)


def admin_json(m: Meshd, path: str) -> Any:
    status, _, body = http_get("127.0.0.1", m.ports["admin"], path)
    assert status == 200, (status, body)
    return json.loads(body)


def fleet_service(m: Meshd, service: str) -> dict[str, Any]:
    return admin_json(m, "/config")["fleet"]["services"].get(service, {})


def wait_applied(m: Meshd, service: str, predicate: Callable[[Any], bool],
                 timeout: float = 10.0) -> float:
    """Seconds until /config shows ``service``'s effective routes satisfying ``predicate``
    and every worker loaded a snapshot at least that recent."""
    started = time.monotonic()
    wait_for(lambda: predicate(fleet_service(m, service).get("effective", {}).get("routes")),
             timeout, interval=0.005, what=f"routes of {service} applied")

    def published() -> bool:
        fleet = admin_json(m, "/config")["fleet"]
        return bool(fleet["version"] == fleet["published_version"])
    wait_for(published, timeout, interval=0.005, what="the policies published")
    m.wait_snapshot_loaded(timeout=timeout)
    return time.monotonic() - started


def route_weights(part: Any) -> list[int] | None:
    if not part:
        return None
    return [t["weight"] for t in part["value"]["routes"][0]["destination"]]


def test_canary_by_httproute_weights_under_load(mesh, backends, api, tmp_path):
    a, b = backends("stable"), backends("canary")
    m = mesh.start(*k8s_config(mesh, api, tmp_path, {"web": [a.address],
                                                     "web-canary": [b.address]}))
    load = CountingLoad(m.ports["outbound"]).start()
    took = []
    try:
        for share in (0, 10, 50, 100):
            api.apply(canary(share))
            took.append(wait_applied(m, "web", lambda p, s=share: route_weights(p) ==
                                     [100 - s, s]))
            counts = load.sample(2000)
            got = 100 * counts["canary"] / sum(counts.values())
            assert abs(got - share) <= 3, (share, counts)
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.total_ok >= 8000
    effective = fleet_service(m, "web")["effective"]["routes"]
    assert effective["from"] == "k8s: HTTPRoute default/web-canary"
    print("write-to-applied seconds per step:", [round(t, 3) for t in took])
    assert max(took) < 10   # a second on a quiet machine; generous for busy CPUs


def test_path_match_with_its_own_timeout_and_410_relist(mesh, backends, api, tmp_path):
    a = backends("a")
    api.apply(http_route("web-slow", "web", [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
         "timeouts": {"request": "300ms"}},
        {"backendRefs": [backend("web")]}]))
    m = mesh.start(*k8s_config(mesh, api, tmp_path, {"web": [a.address]}, workers=1,
                               extra='[service.web]\ntimeout = "5s"\n'))
    wait_applied(m, "web", lambda p: p is not None)
    port = m.ports["outbound"]
    started = time.monotonic()
    status, _, body = http_get("127.0.0.1", port, "/slow?ms=3000", {"Host": "web"})
    assert status == 504, body
    assert time.monotonic() - started < 2.5      # the route's 300 ms, not the service's 5 s
    status, _, body = http_get("127.0.0.1", port, "/slowly?ms=600", {"Host": "web"})
    assert (status, body) == (200, b"a /slowly\n")   # PathPrefix is by path elements
    # The history is compacted while the watch is down: a re-watch gets 410, meshd lists
    # again and the routes stay (and no update is lost).
    lists = len(api.slice_requests(watch=False, resource="httproutes"))
    api.expire_history()
    api.drop_watches()
    api.wait_requests(lists + 1, watch=False, resource="httproutes", timeout=10)
    status, _, _ = http_get("127.0.0.1", port, "/slow?ms=3000", {"Host": "web"})
    assert status == 504
    api.delete("httproutes", "web-slow")
    wait_applied(m, "web", lambda p: p is None)
    status, _, body = http_get("127.0.0.1", port, "/slow?ms=600", {"Host": "web"})
    assert status == 200, body


def test_invalid_httproute_is_refused_by_name_and_the_previous_kept(mesh, backends, api,
                                                                    tmp_path):
    a, b = backends("stable"), backends("canary")
    api.apply(canary(100))
    m = mesh.start(*k8s_config(mesh, api, tmp_path, {"web": [a.address],
                                                     "web-canary": [b.address]}, workers=1))
    wait_applied(m, "web", lambda p: route_weights(p) == [0, 100])
    port = m.ports["outbound"]
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"canary /\n"
    bad = canary(50)
    bad["spec"]["rules"][0]["filters"] = [{"type": "RequestMirror",
                                           "requestMirror": {"backendRef": {"name": "x"}}}]
    api.apply(bad)
    labels = ('service="web",source="k8s",kind="routes",entry="HTTPRoute default/web-canary"')
    m.wait_metric("meshd_fleet_refused_entries", labels)
    assert {http_get("127.0.0.1", port, "/", {"Host": "web"})[2]
            for _ in range(10)} == {b"canary /\n"}
    status, _, body = http_get("127.0.0.1", m.ports["admin"], "/ready")
    assert status == 200
    assert b"refused HTTPRoute default/web-canary" in body and b"RequestMirror" in body, body
    assert "refused HTTPRoute default/web-canary for service web: spec.rules[0].filters[0]: " \
           "filter 'RequestMirror' is not supported" in m.log()
    api.apply(canary(0))   # fixed: applied, no longer named
    wait_applied(m, "web", lambda p: route_weights(p) == [100, 0])
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"stable /\n"
    assert m.metric("meshd_fleet_refused_entries", 'kind="routes"') == 0


def test_api_server_down_keeps_the_routes_also_after_a_restart(mesh, backends, api, tmp_path):
    a, b = backends("stable"), backends("canary")
    api.apply(canary(100))
    # web-canary has no route: the source never gave it anything, so nothing of it is
    # persisted; after the restart its watch fails, and /ready must not wait for it.
    m = mesh.start(*k8s_config(mesh, api, tmp_path, {"web": [a.address],
                                                     "web-canary": [b.address]}, workers=1))
    wait_applied(m, "web", lambda p: route_weights(p) == [0, 100])
    port = m.ports["outbound"]
    persisted = admin_json(m, "/config")["fleet"]["persisted"]["path"]

    def saved() -> bool:
        try:
            fleet = msgpack.unpackb(Path(persisted).read_bytes())["services"]
        except OSError:
            return False
        return "routes" in fleet.get("web", {}).get("k8s", {})
    wait_for(saved, 10, what="the policies persisted")
    api.stop()                                 # the API server goes away
    m.wait_metric("meshd_fleet_stale", 'service="web"', at_least=1)
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"canary /\n"
    m.stop()                                   # and meshd restarts meanwhile
    m.start()
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"canary /\n"
    assert fleet_service(m, "web")["sources"]["k8s"]["stale"] is True
    api.start()                                # back (same port): a change applies again
    api.apply(canary(0))
    wait_applied(m, "web", lambda p: route_weights(p) == [100, 0], timeout=60)
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"stable /\n"


@pytest.mark.parametrize("table, problem", [
    ('kinds = ["Ingress"]', "config_source[0].kinds"),
    ('port = "http"', "config_source[0].port"),          # a discovery key, not this one's
    ('api_server = "ftp://x"', "config_source[0].api_server"),
])
def test_check_names_bad_source_keys(tmp_path, table: str, problem: str) -> None:
    from meshd.validate import load_checked
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(f"""\
        shm_dir = "{tmp_path}"
        [[listener]]
        name = "out"
        listen = "127.0.0.1:0"
        [[config_source]]
        name = "k8s"
        plugin = "kubernetes"
        """) + table + "\n")
    with pytest.raises(ConfigError) as e:
        load_checked(str(path))
    assert any(k == problem for k, _ in e.value.problems), e.value.problems


def test_grpcroute_sends_one_method_to_another_service(mesh, api, tmp_path):
    servers = []

    def serve(name: str) -> int:
        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            return name.encode() + b":" + request
        handlers = {m: grpc.unary_unary_rpc_method_handler(unary) for m in ("Get", "Put")}
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "shop.Cart", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port

    v1, v2 = serve("v1"), serve("v2")
    api.apply(grpc_route("cart-put", "cart", [
        {"matches": [{"method": {"service": "shop.Cart", "method": "Put"}}],
         "backendRefs": [backend("cart-v2")]}]))
    try:
        m = mesh.start(*k8s_config(mesh, api, tmp_path, {"cart": [f"127.0.0.1:{v1}"],
                                                         "cart-v2": [f"127.0.0.1:{v2}"]},
                                   workers=1))
        wait_applied(m, "cart", lambda p: p is not None)
        with grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",
                                   options=[("grpc.default_authority", "cart")]) as ch:
            assert ch.unary_unary("/shop.Cart/Put")(b"x", timeout=10) == b"v2:x"
            # GAMMA: a method no rule of the attached route matches is rejected (meshd's
            # 404, which gRPC clients read as UNIMPLEMENTED), not sent to cart itself
            with pytest.raises(grpc.RpcError) as e:
                ch.unary_unary("/shop.Cart/Get")(b"y", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        api.apply(grpc_route("cart-put", "cart", [
            {"matches": [{"method": {"service": "shop.Cart", "method": "Put"}}],
             "backendRefs": [backend("cart-v2")]},
            {"matches": [{"method": {"service": "shop.Cart"}}]}]))   # the rest: cart itself
        wait_applied(m, "cart", lambda p: p is not None and len(p["value"]["routes"]) == 2)
        with grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",
                                   options=[("grpc.default_authority", "cart")]) as ch:
            assert ch.unary_unary("/shop.Cart/Get")(b"y", timeout=10) == b"v1:y"
        effective = fleet_service(m, "cart")["effective"]["routes"]
        assert effective["from"] == "k8s: GRPCRoute default/cart-put"
    finally:
        for s in servers:
            s.stop(0)


def test_routes_and_endpoints_both_from_kubernetes(mesh, backends, api, tmp_path):
    """The usual pod setup: discovery from EndpointSlices, routes from HTTPRoutes; the
    canary Service, named only by the route, is watched on demand when traffic goes to
    it."""
    a, b = backends("stable"), backends("canary")
    api.create_service("web")
    api.create_service("web-canary")
    api.apply_slice("web-1", "web", ["127.0.0.1"], ports={"http": a.port})
    api.apply_slice("web-canary-1", "web-canary", ["127.0.0.1"], ports={"http": b.port})
    text, ports = k8s_config(mesh, api, tmp_path, {}, workers=1, extra="\n" + kubernetes_table(
        api, tmp_path, "discovery", timeout=None) + '\n[service.web]\ndiscovery = "k8s"\n')
    m = mesh.start(text, ports)
    port = m.ports["outbound"]
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"stable /\n"
    api.apply(canary(100))
    wait_applied(m, "web", lambda p: route_weights(p) == [0, 100])
    wait_for(lambda: http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"canary /\n",
             10, what="traffic to the canary")
    assert {http_get("127.0.0.1", port, "/", {"Host": "web"})[2]
            for _ in range(10)} == {b"canary /\n"}
