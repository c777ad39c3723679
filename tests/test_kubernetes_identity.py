"""Expected identities from the kubernetes discovery plugin, against the Kubernetes API test
server: a meshed Service labelled ``meshd.io/service-account`` gives its endpoints the
service account's SPIFFE ID; the label changing (a slice MODIFIED event) changes it; a bad
value gives none and a warning; the options are validated with key paths."""

from __future__ import annotations

import logging

import pytest
from meshd_kubernetes import KubernetesBackend
from meshd_kubernetes.slices import Options, ServiceRef, dns_subdomain, endpoints

from meshd.errors import ConfigError
from meshd.testing.watch import WatchRecorder

MESHED = {"meshd.io/meshed": "true"}
PORTS = {"http": 8080, "meshd-inbound": 4143}


@pytest.fixture
def watch(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("test-token\n")
    recorders: list[WatchRecorder] = []

    def start(service="web", **options):
        opts = {"api_server": api.url, "token_file": str(token), "ca_file": api.ca_file,
                "namespace": "default", **options}
        rec = WatchRecorder(KubernetesBackend("k8s", opts), service)
        recorders.append(rec)
        return rec

    yield start
    for rec in recorders:
        rec.close()


def ids(eps):
    return sorted((e.host, e.identity) for e in eps)


def test_identity_from_the_service_account_label_follows_changes(api, watch):
    api.create_service("web", namespace="team")
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=PORTS, namespace="team",
                    labels={**MESHED, "meshd.io/service-account": "web"})
    rec = watch("web.team")
    eps = rec.wait_for(lambda e: len(e) == 1)
    assert eps[0].meshed and eps[0].inbound_port == 4143
    assert eps[0].identity == "spiffe://cluster.local/ns/team/sa/web"
    api.wait_watches(1)
    # The Service's label changes: Kubernetes rewrites its slices (MODIFIED).
    api.apply_slice("web-1", "web", ["10.0.0.1", "10.0.0.2"], ports=PORTS, namespace="team",
                    labels={**MESHED, "meshd.io/service-account": "web-v2.prod"})
    rec.wait_for(lambda e: ids(e) == [
        ("10.0.0.1", "spiffe://cluster.local/ns/team/sa/web-v2.prod"),
        ("10.0.0.2", "spiffe://cluster.local/ns/team/sa/web-v2.prod")], timeout=2)
    # The label removed: meshed without identity (plaintext h2c to them).
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=PORTS, namespace="team",
                    labels=MESHED)
    eps = rec.wait_for(lambda e: ids(e) == [("10.0.0.1", "")], timeout=2)
    assert eps[0].meshed
    # Not meshed: no identity even with the label.
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=PORTS, namespace="team",
                    labels={"meshd.io/service-account": "web"})
    eps = rec.wait_for(lambda e: len(e) == 1 and not e[0].meshed, timeout=2)
    assert eps[0].identity == ""
    assert rec.error is None


def test_options_rename_the_label_and_set_the_trust_domain(api, watch):
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=PORTS,
                    labels={**MESHED, "example.com/sa": "frontend",
                            "meshd.io/service-account": "ignored"})
    rec = watch(service_account_label="example.com/sa", trust_domain="prod.example")
    eps = rec.wait_for(lambda e: len(e) == 1)
    assert eps[0].identity == "spiffe://prod.example/ns/default/sa/frontend"


def test_a_bad_label_value_gives_no_identity_and_a_warning(api, watch, caplog):
    caplog.set_level(logging.WARNING, "meshd.discovery.kubernetes")
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=PORTS,
                    labels={**MESHED, "meshd.io/service-account": "Web_App"})
    rec = watch()
    eps = rec.wait_for(lambda e: len(e) == 1)
    assert (eps[0].meshed, eps[0].identity) == (True, "")
    assert any("EndpointSlice default/web-1" in r.getMessage() and "'Web_App'" in
               r.getMessage() and "meshd.io/service-account" in r.getMessage()
               for r in caplog.records), caplog.text
    api.wait_watches(1)
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=PORTS,
                    labels={**MESHED, "meshd.io/service-account": "web"})
    rec.wait_for(lambda e: ids(e) == [("10.0.0.1", "spiffe://cluster.local/ns/default/sa/web")],
                 timeout=2)
    assert rec.error is None


def test_identity_options_are_validated_with_their_keys(api, tmp_path):
    base = {"api_server": api.url, "token_file": str(tmp_path / "t"), "ca_file": api.ca_file}
    with pytest.raises(ConfigError) as e:
        KubernetesBackend("k8s", {**base, "trust_domain": "Cluster.Local",
                                  "service_account_label": ""})
    assert sorted(k for k, _ in e.value.problems) == ["service_account_label", "trust_domain"]
    assert "not a trust domain" in dict(e.value.problems)["trust_domain"]
    with pytest.raises(ConfigError) as e:
        KubernetesBackend("k8s", {**base, "trust_domain": 7})
    assert [k for k, _ in e.value.problems] == ["trust_domain"]
    backend = KubernetesBackend("k8s", base)
    assert (backend._opts.service_account_label, backend._opts.trust_domain) == \
        ("meshd.io/service-account", "cluster.local")


def test_service_account_names_sans_io(caplog):
    for good in ("web", "web-v2", "a.b-c.d", "x" * 63 + "." + "y" * 63):
        assert dns_subdomain(good), good
    for bad in ("", "Web", "web_app", "-web", "web-", "a..b", ".a", "spiffe://x/y", "a/b",
                "x" * 64, "é", ("a" * 63 + ".") * 4 + "a"):
        assert not dns_subdomain(bad), bad
    ref = ServiceRef("ns1", "web", None)
    opts = Options(None, "meshd.io/meshed", "meshd-inbound", "sa", "td")

    def one(labels):
        sl = {"metadata": {"name": "web-abc", "labels": labels},
              "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
              "endpoints": [{"addresses": ["10.0.0.1"]}]}
        return endpoints([sl], ref, opts)[0].identity

    assert one({"meshd.io/meshed": "true", "sa": "api"}) == "spiffe://td/ns/ns1/sa/api"
    caplog.set_level(logging.WARNING, "meshd.discovery.kubernetes")
    for bad in (7, None, "x" * 10_000, "a/../b"):
        assert one({"meshd.io/meshed": "true", "sa": bad}) == ""
    assert all(len(r.getMessage()) < 600 for r in caplog.records)
