"""Route status written back (Gateway API ``status.parents``): what meshd computes for a
route (sans-IO), the Kubernetes test server's status subresource, two config sources
writing for the same routes (one write per change, not one each, and no write caused
by their own), and a real meshd with ``write_status = true``."""

from __future__ import annotations

import datetime
import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from meshd_kubernetes.config_source import KubernetesConfigSource
from meshd_kubernetes.status import CONTROLLER, patch

from meshd.errors import ConfigError
from meshd.testing.harness import http_get, wait_for
from meshd.testing.k8s_config import kubernetes_table
from meshd.testing.k8s_server import GATEWAY, backend, http_route

ROUTES = f"/apis/{GATEWAY}/namespaces/default/httproutes"
T0 = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
T1 = datetime.datetime(2026, 1, 2, 3, 9, 9, tzinfo=datetime.UTC)


def _stored(route: dict[str, Any], generation: int = 1, rv: str = "7") -> dict[str, Any]:
    route["metadata"].update(generation=generation, resourceVersion=rv)
    return route


def _conditions(obj: dict[str, Any]) -> dict[str, tuple[str, str, int]]:
    (entry,) = [p for p in obj["status"]["parents"] if p["controllerName"] == CONTROLLER]
    return {c["type"]: (c["status"], c["reason"], c["observedGeneration"])
            for c in entry["conditions"]}


def test_status_meshd_computes_for_a_route() -> None:
    ok = _stored(http_route("web-v1", "web", [{"backendRefs": [backend("web")]}]))
    body = patch("HTTPRoute", ok, T0)
    assert body is not None and body["metadata"] == {"resourceVersion": "7"}
    (entry,) = body["status"]["parents"]
    assert entry["controllerName"] == CONTROLLER
    assert entry["parentRef"] == ok["spec"]["parentRefs"][0]
    assert {c["type"]: (c["status"], c["reason"], c["lastTransitionTime"])
            for c in entry["conditions"]} == {
        "Accepted": ("True", "Accepted", "2026-01-02T03:04:05Z"),
        "ResolvedRefs": ("True", "ResolvedRefs", "2026-01-02T03:04:05Z")}
    # Once the object says so, nothing to write (a status equal but for the times).
    ok["status"] = body["status"]
    assert patch("HTTPRoute", ok, T1) is None
    # Another controller's entry (a Gateway's) is kept; ours follows the new generation,
    # and a condition whose status did not change keeps its lastTransitionTime.
    other = {"parentRef": {"name": "gw", "kind": "Gateway"}, "controllerName": "x.io/gw",
             "conditions": []}
    ok["status"]["parents"].insert(0, other)
    ok["spec"]["rules"][0]["filters"] = [{"type": "RequestMirror", "requestMirror": {}}]
    ok["metadata"]["generation"] = 2
    body = patch("HTTPRoute", ok, T1)
    assert body is not None and body["status"]["parents"][0] == other
    ok["status"] = body["status"]
    assert _conditions(ok) == {"Accepted": ("False", "UnsupportedValue", 2),
                               "ResolvedRefs": ("True", "ResolvedRefs", 2)}
    accepted, resolved = ok["status"]["parents"][1]["conditions"]
    assert "filters[0]: filter 'RequestMirror' is not supported" in accepted["message"]
    assert accepted["lastTransitionTime"] == "2026-01-02T03:09:09Z"   # True -> False
    assert resolved["lastTransitionTime"] == "2026-01-02T03:04:05Z"   # still True
    bad_ref = _stored(http_route("x", "web", [{"backendRefs": [
        {"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "web"}]}]))
    body = patch("HTTPRoute", bad_ref, T0)
    assert body is not None
    bad_ref["status"] = body["status"]
    assert _conditions(bad_ref) == {"Accepted": ("False", "UnsupportedValue", 1),
                                    "ResolvedRefs": ("False", "InvalidKind", 1)}
    gateway_only = _stored(http_route("g", "web", []))
    gateway_only["spec"]["parentRefs"] = [{"name": "gw", "kind": "Gateway",
                                           "group": "gateway.networking.k8s.io"}]
    assert patch("HTTPRoute", gateway_only, T0) is None   # not a mesh route: not ours


def test_the_test_server_has_a_status_subresource(api) -> None:
    s = requests.Session()
    s.headers["Authorization"] = "Bearer test-token"
    s.request = functools.partial(s.request, verify=api.ca_file)  # type: ignore[method-assign]
    rv = api.apply(http_route("web-v1", "web", [{}]))
    merge = {"Content-Type": "application/merge-patch+json"}
    stale = {"metadata": {"resourceVersion": "1"}, "status": {"parents": []}}
    assert s.patch(api.url + ROUTES + "/web-v1/status", json=stale,
                   headers=merge).status_code == 409
    fresh = {"metadata": {"resourceVersion": str(rv)},
             "status": {"parents": [{"controllerName": "a.io/b"}]}, "spec": {"rules": []}}
    r = s.patch(api.url + ROUTES + "/web-v1/status", json=fresh, headers=merge)
    assert r.status_code == 200, r.text
    obj = api.get("httproutes", "web-v1")
    assert obj is not None and obj["metadata"]["generation"] == 1   # the spec is untouched
    assert obj["spec"]["rules"] == [{}] and obj["status"]["parents"][0]["controllerName"] == "a.io/b"
    api.apply(http_route("web-v1", "web", [{}, {}]))   # a write of the object keeps status
    obj = api.get("httproutes", "web-v1")
    assert obj is not None and obj["metadata"]["generation"] == 2 and obj["status"]["parents"]
    assert api.status_writes == 1


@pytest.fixture
def sources(api, tmp_path) -> Iterator[Any]:
    token = tmp_path / "token"
    token.write_text("test-token\n")
    made: list[KubernetesConfigSource] = []

    def make(**options: Any) -> KubernetesConfigSource:
        opts = {"api_server": api.url, "token_file": str(token), "ca_file": api.ca_file,
                "namespace": "default", "timeout": "2s", **options}
        made.append(KubernetesConfigSource("k8s", opts))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _watch(src: KubernetesConfigSource, service: str) -> None:
    def run() -> None:
        for _ in src.watch(service):
            pass
    threading.Thread(target=run, daemon=True).start()


def _accepted(api: Any, name: str) -> tuple[str, int] | None:
    obj = api.get("httproutes", name)
    if obj is None or not obj.get("status"):
        return None
    c = _conditions(obj)["Accepted"]
    return c[0], c[2]


def test_two_writers_write_once_per_change(api, sources) -> None:
    with pytest.raises(ConfigError) as e:
        sources(write_status="yes")
    assert e.value.problems[0][0] == "write_status"
    a, b = sources(write_status=True), sources(write_status=True)
    for src in (a, b):
        _watch(src, "web")
    api.wait_watches(4)   # httproutes and grpcroutes, for each source
    api.apply(http_route("web-v1", "web", [{"backendRefs": [backend("web")]}]))
    wait_for(lambda: _accepted(api, "web-v1") == ("True", 1), 10, what="status written")
    bad = http_route("web-v1", "web", [{"filters": [{"type": "RequestMirror",
                                                     "requestMirror": {}}]}])
    api.apply(bad)
    wait_for(lambda: _accepted(api, "web-v1") == ("False", 2), 10, what="status rewritten")
    # A later route's status written by both sources proves that each saw every event
    # before it, its own status writes included: none of those caused another write.
    api.apply(http_route("api-v1", "web", [{}]))
    wait_for(lambda: _accepted(api, "api-v1") == ("True", 1), 10, what="status written")
    wait_for(lambda: a._status is not None and b._status is not None
             and a._status.written + b._status.written == api.status_writes
             and not a._status.pending and not b._status.pending, 10,
             what="both writers idle")
    assert api.status_writes == 3, api.status_writes   # one per change, not one per meshd
    obj = api.get("httproutes", "web-v1")
    assert obj is not None and len(obj["status"]["parents"]) == 1


def test_a_meshd_writes_route_status(mesh, backends, api, tmp_path: Path) -> None:
    a = backends("a")
    api.apply(http_route("web-v1", "web", [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}]}]))
    m = mesh.start(*mesh.config({"web": [a.address]}, workers=1, extra=kubernetes_table(
        api, tmp_path, lines="write_status = true")))
    wait_for(lambda: _accepted(api, "web-v1") == ("True", 1), 10, what="status written")
    obj = api.get("httproutes", "web-v1")
    assert obj is not None
    (entry,) = obj["status"]["parents"]
    assert entry["parentRef"] == {"group": "", "kind": "Service", "name": "web"}
    bad = http_route("web-v1", "web", [{"matches": [{"path": {
        "type": "RegularExpression", "value": "/(unclosed"}}]}])
    api.apply(bad)
    wait_for(lambda: _accepted(api, "web-v1") == ("False", 2), 10, what="status rewritten")
    # meshd keeps serving the last good version meanwhile, as /ready says
    wait_for(lambda: "HTTPRoute default/web-v1" in http_get(
        "127.0.0.1", m.ports["admin"], "/ready")[2].decode(), 10, what="/ready names it")
    status, _, body = http_get("127.0.0.1", m.ports["outbound"], "/v1/x", {"Host": "web"})
    assert (status, body) == (200, b"a /v1/x\n")


def test_shipped_status_rbac_grants_the_patch() -> None:
    docs = list(yaml.safe_load_all((Path(__file__).parent.parent /
                                    "deploy/kubernetes/rbac-gateway-api-status.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ClusterRole", "ClusterRoleBinding"]
    granted = {(g, r, v) for rule in docs[0]["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("gateway.networking.k8s.io", r, "patch")
                       for r in ("httproutes/status", "grpcroutes/status")}
    assert docs[1]["roleRef"]["name"] == docs[0]["metadata"]["name"]
