"""Linkerd's dst_namespace and dst_pod on the per-endpoint families (meshd_endpoint_*) for
endpoints the kubernetes discovery plugin finds in EndpointSlices (targetRef pod name,
its namespace); none for endpoints of other sources. One value per endpoint: no series
more than the endpoints already have."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from meshd.testing.harness import http_get, wait_for
from meshd.testing.k8s_config import kubernetes_table
from meshd.testing.k8s_server import endpoint


def test_kubernetes_endpoints_carry_dst_namespace_and_pod(mesh, backends, api, tmp_path) -> None:
    a, other = backends("a"), backends("other")
    api.create_service("web")
    api.apply_slice("web-x", "web", [endpoint(a.host, pod="web-7d9f-abcde")],
                    ports={"http": a.port})
    m = mesh.start(*mesh.config({"static-svc": [other.address]}, workers=1,
                                extra=kubernetes_table(api, tmp_path, "discovery")
                                + '\n[service.web]\ndiscovery = "k8s"\n'))
    port = m.ports["outbound"]
    for host in ("web", "static-svc"):
        assert http_get("127.0.0.1", port, "/", {"Host": host})[0] == 200

    def attempts() -> dict[str, dict[str, str]]:
        body = http_get("127.0.0.1", m.ports["admin"], "/metrics")[2].decode()
        return {s.labels["service"]: s.labels
                for f in text_string_to_metric_families(body)
                if f.name == "meshd_endpoint_attempts"
                for s in f.samples if s.labels.get("classification") == "success" and s.value}
    wait_for(lambda: {"web", "static-svc"} <= set(attempts()), 20,
             what="both services' endpoints counted")
    got = attempts()
    assert got["web"] == {"service": "web", "target_addr": a.address,
                          "dst_namespace": "default", "dst_pod": "web-7d9f-abcde",
                          "classification": "success"}
    assert got["static-svc"] == {"service": "static-svc", "target_addr": other.address,
                                 "classification": "success"}
    # the ejection families of the same endpoint say the same
    body = http_get("127.0.0.1", m.ports["admin"], "/metrics")[2].decode()
    assert (f'meshd_endpoint_ejected{{service="web",target_addr="{a.address}",'
            'dst_namespace="default",dst_pod="web-7d9f-abcde"} 0') in body
