"""The kubernetes discovery plugin against the Kubernetes API test server (real HTTP, real
TLS): list then watch, the ready rule, ports, 410 Gone, bookmarks, token rotation,
dropped streams, NoSuchService, kubeconfig, errors, config validation and close()."""

from __future__ import annotations

import base64
import time

import pytest
from meshd_kubernetes import KubernetesBackend
from meshd_kubernetes.slices import Options, ServiceRef, endpoints, parse_service

from meshd.discovery import Endpoint, NoSuchService, Reset
from meshd.errors import ConfigError
from meshd.testing.harness import wait_for
from meshd.testing.k8s_server import K8sApiServer, endpoint
from meshd.testing.watch import WatchRecorder


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("test-token\n")
    return path


@pytest.fixture
def watch(api, token_file):
    recorders: list[WatchRecorder] = []

    def start(service="web", **options):
        opts = {"api_server": api.url, "token_file": str(token_file), "ca_file": api.ca_file,
                "namespace": "default", **options}
        rec = WatchRecorder(KubernetesBackend("k8s", opts), service)
        recorders.append(rec)
        return rec

    yield start
    for rec in recorders:
        rec.close()


def hosts(eps):
    return sorted(str(e) for e in eps)


def test_list_then_watch_follows_add_remove_and_not_ready(api, watch):
    api.create_service("web")
    api.apply_slice("web-1", "web", ["10.0.0.1", endpoint("10.0.0.2", ready=False)],
                    ports={"http": 8080})
    rec = watch()
    first = rec.next()
    assert first == Reset((Endpoint("10.0.0.1", 8080),))
    api.wait_watches(1)
    lst, wch = api.wait_requests(1, watch=False)[0], api.wait_requests(1, watch=True)[0]
    assert lst.query["labelSelector"] == "kubernetes.io/service-name=web"
    assert wch.query["allowWatchBookmarks"] == "true" and "timeoutSeconds" in wch.query
    assert int(wch.query["resourceVersion"]) == api.rv

    api.set_condition("web-1", "10.0.0.2", ready=True)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.1:8080", "10.0.0.2:8080"], timeout=2)
    api.apply_slice("web-1", "web", ["10.0.0.2", "10.0.0.3"], ports={"http": 8080})
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.2:8080", "10.0.0.3:8080"], timeout=2)
    api.set_condition("web-1", "10.0.0.3", ready=False)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.2:8080"], timeout=2)
    assert len(api.slice_requests(watch=False)) == 1
    assert rec.error is None


def test_terminating_is_dropped_and_serving_terminating_only_as_last_resort(api, watch):
    api.apply_slice("web-1", "web", ["10.0.0.1", "10.0.0.2"], ports={"http": 80})
    rec = watch()
    rec.wait_for(lambda e: len(e) == 2)
    # Rolling out: 10.0.0.2 is draining. It still serves, but gets no new requests.
    api.set_condition("web-1", "10.0.0.2", ready=False, serving=True, terminating=True)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.1:80"], timeout=2)
    # Every endpoint draining: the serving ones are used rather than none.
    api.set_condition("web-1", "10.0.0.1", ready=False, serving=True, terminating=True)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.1:80", "10.0.0.2:80"], timeout=2)
    api.set_condition("web-1", "10.0.0.1", serving=False)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.2:80"], timeout=2)
    # A ready endpoint appears: the draining one stops getting traffic.
    api.apply_slice("web-2", "web", ["10.0.0.9"], ports={"http": 80})
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.9:80"], timeout=2)


def test_slices_are_merged_and_deleted_slices_leave(api, watch):
    api.create_service("web")
    api.apply_slice("web-a", "web", [endpoint("10.0.0.1", zone="z1", node="n1", pod="web-x")],
                    ports={"http": 80})
    api.apply_slice("web-b", "web", ["10.0.1.1", "10.0.0.1"], ports={"http": 80})
    api.apply_slice("other-a", "other", ["10.9.9.9"], ports={"http": 80})
    rec = watch()
    eps = rec.wait_for(lambda e: len(e) == 2)
    assert hosts(eps) == ["10.0.0.1:80", "10.0.1.1:80"]
    first = next(e for e in eps if e.host == "10.0.0.1")
    assert first.zone == "z1" and dict(first.labels) == {"namespace": "default", "node": "n1",
                                                         "pod": "web-x"}
    api.wait_watches(1)
    api.delete_slice("web-b")
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.1:80"], timeout=2)
    api.delete_slice("web-a")
    rec.wait_for(lambda e: e == () and rec.exists is True, timeout=2)


def test_port_selection_and_meshed_service(api, watch):
    api.apply_slice("web-1", "web", ["10.0.0.1"],
                    ports={"meshd-inbound": 4143, "metrics": 9090, "http": 8080},
                    labels={"meshd.io/meshed": "true"})
    first = watch().wait_for(lambda e: len(e) == 1)[0]
    assert (first.port, first.meshed, first.inbound_port) == (9090, True, 4143)
    assert watch(port="http").wait_for(lambda e: len(e) == 1)[0].port == 8080
    assert watch("web:metrics", port="http").wait_for(lambda e: len(e) == 1)[0].port == 9090
    missing = watch("web:grpc")
    assert missing.next() == Reset(())


def test_service_name_forms(api, watch):
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80, namespace="team")
    for name in ("web.team", "web.team.svc", "web.team.svc.cluster.local", "web"):
        rec = watch(name, namespace="team" if name == "web" else "default")
        assert hosts(rec.wait_for(lambda e: len(e) == 1)) == ["10.0.0.1:80"]
    assert watch("web.team.svc.other.domain").next() == NoSuchService()


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
def test_gone_relists(api, watch, as_http):
    api.gone_as_http = as_http
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
    rec = watch()
    rec.wait_for(lambda e: len(e) == 1)
    api.wait_watches(1)
    api.expire_history()
    api.drop_watches()  # the re-watch asks for a compacted resourceVersion -> 410 -> re-list
    api.wait_requests(2, watch=False)
    gone = api.slice_requests(watch=True)[1]
    assert gone.status == (410 if as_http else 200)
    assert int(gone.query["resourceVersion"]) < api.floor
    api.wait_watches(1)
    api.apply_slice("web-1", "web", ["10.0.0.3"], ports=80)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.3:80"], timeout=2)
    assert rec.error is None


def test_bookmark_advances_the_resource_version(api, watch):
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
    rec = watch()
    rec.wait_for(lambda e: len(e) == 1)
    api.wait_watches(1)
    api.apply_slice("other-1", "other", ["10.9.9.9"], ports=80)  # not this watch's
    before = len(rec.updates)
    bookmark = api.send_bookmark()
    api.drop_watches()
    again = api.wait_requests(2, watch=True)[-1]
    assert again.query["resourceVersion"] == str(bookmark)
    assert len(rec.updates) == before  # a bookmark changes no endpoints
    assert len(api.slice_requests(watch=False)) == 1


@pytest.mark.parametrize("abrupt", [False, True], ids=["stream-ended", "connection-cut"])
def test_dropped_stream_rewatches_without_losing_events(api, watch, abrupt):
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
    rec = watch()
    rec.wait_for(lambda e: len(e) == 1)
    api.wait_watches(1)
    for i in range(2, 6):  # changes racing with the drop arrive through the replayed history
        api.drop_watches(abrupt=abrupt)
        api.apply_slice("web-1", "web", [f"10.0.0.{n}" for n in range(1, i + 1)], ports=80)
        rec.wait_for(lambda e, i=i: len(e) == i, timeout=2)
    assert len(api.slice_requests(watch=False)) == 1
    assert rec.error is None


def test_watch_timeout_ends_the_stream_and_the_plugin_watches_again(api, watch):
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
    rec = watch(watch_timeout="1s")
    rec.wait_for(lambda e: len(e) == 1)
    watches = api.wait_requests(2, watch=True, timeout=4)
    assert watches[0].query["timeoutSeconds"] == "1"
    api.wait_watches(1)
    api.apply_slice("web-1", "web", ["10.0.0.2"], ports=80)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.2:80"], timeout=2)
    assert len(api.slice_requests(watch=False)) == 1


def test_token_rotation_recovers_after_401(api, watch, token_file):
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
    rec = watch()
    rec.wait_for(lambda e: len(e) == 1)
    api.wait_watches(1)
    api.set_tokens("rotated-token")
    token_file.write_text("rotated-token\n")
    api.drop_watches()
    assert api.wait_requests(1, watch=True, status=401)[0].token == "test-token"
    assert api.wait_requests(2, watch=True, status=200)[-1].token == "rotated-token"
    api.wait_watches(1)
    api.apply_slice("web-1", "web", ["10.0.0.2"], ports=80)
    rec.wait_for(lambda e: hosts(e) == ["10.0.0.2:80"], timeout=2)
    assert rec.error is None


def test_token_file_is_reread_periodically(api, watch, token_file, monkeypatch):
    monkeypatch.setattr("meshd_kubernetes.client.TOKEN_REFRESH", 0.0)
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
    rec = watch()
    rec.wait_for(lambda e: len(e) == 1)
    api.wait_watches(1)
    token_file.write_text("rotated-token\n")
    api.set_tokens("rotated-token")
    api.drop_watches()
    assert api.wait_requests(2, watch=True)[-1].token == "rotated-token"
    assert [r for r in api.requests if r.status == 401] == []  # read before it was refused


def test_unknown_token_is_a_clear_error(api, watch, token_file):
    token_file.write_text("wrong\n")
    err = watch().wait_error()
    assert str(err).startswith(f"kubernetes {api.url}: 401 Unauthorized listing endpointslices "
                               f"in ns default")


def test_no_such_service_versus_no_endpoints(api, watch):
    api.create_service("empty")
    assert watch("empty").next() == Reset(())
    ghost = watch("ghost")
    assert ghost.next() == NoSuchService()
    api.wait_watches(2)
    api.create_service("ghost")
    api.apply_slice("ghost-1", "ghost", ["10.0.0.7"], ports=80)
    assert ghost.next(timeout=2) == Reset((Endpoint("10.0.0.7", 80),))
    assert watch("not.a.kubernetes.name.at.all").next() == NoSuchService()


def test_errors_name_the_server_and_the_request(api, watch):
    api.fail_next(1, 403)
    err = watch().wait_error()
    assert str(err) == (f"kubernetes {api.url}: 403 Forbidden listing endpointslices in ns "
                        f"default: injected failure 403")
    api.stop()
    err = watch().wait_error()
    assert str(err).startswith(f"kubernetes {api.url}: listing endpointslices in ns default: ")


def test_tls_needs_the_servers_ca(api, watch):
    err = watch(ca_file="/etc/ssl/certs/ca-certificates.crt").wait_error()
    assert "CERTIFICATE_VERIFY_FAILED" in str(err)


def test_plain_http_server(token_file):
    with K8sApiServer(tls=False, tokens=None) as plain:
        plain.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
        rec = WatchRecorder(KubernetesBackend("k8s", {"api_server": plain.url,
                                                      "namespace": "default"}), "web")
        try:
            rec.wait_for(lambda e: len(e) == 1)
        finally:
            rec.close()


@pytest.mark.parametrize("inline_ca", [True, False], ids=["ca-data", "ca-path"])
def test_kubeconfig(api, tmp_path, inline_ca):
    ca = open(api.ca_file, "rb").read()
    if inline_ca:
        ca_line = f"certificate-authority-data: {base64.b64encode(ca).decode()}"
    else:
        (tmp_path / "ca.crt").write_bytes(ca)
        ca_line = "certificate-authority: ca.crt"  # relative to the kubeconfig's folder
    path = tmp_path / "kubeconfig"
    path.write_text(f"""\
apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: other
  cluster: {{server: "https://192.0.2.1:6443"}}
- name: test
  cluster:
    server: {api.url}
    {ca_line}
contexts:
- name: dev
  context: {{cluster: test, user: me, namespace: team}}
users:
- name: me
  user: {{token: test-token}}
""")
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80, namespace="team")
    rec = WatchRecorder(KubernetesBackend("k8s", {"kubeconfig": str(path)}), "web")
    try:
        assert hosts(rec.wait_for(lambda e: len(e) == 1)) == ["10.0.0.1:80"]
    finally:
        rec.close()


def test_config_validation_names_the_keys(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError) as e:
        KubernetesBackend("k8s", {"namespace": 3, "timeout": "10", "bogus": 1,
                                  "api_server": "10.0.0.1:443"})
    keys = [k for k, _ in e.value.problems]
    assert sorted(keys) == ["api_server", "bogus", "namespace", "timeout"]
    with pytest.raises(ConfigError) as e:
        KubernetesBackend("k8s", {"kubeconfig": "/x", "api_server": "https://a:1",
                                  "namespace": "Team_A", "watch_timeout": "100ms"})
    assert sorted(k for k, _ in e.value.problems) == ["api_server", "namespace", "watch_timeout"]
    with pytest.raises(ConfigError) as e:
        KubernetesBackend("k8s", {})
    assert e.value.problems[0][0] == "api_server" and "KUBERNETES_SERVICE_HOST" in str(e.value)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    assert KubernetesBackend("k8s", {})._server == "https://[fd00::1]:6443"


def test_close_ends_a_running_watch_promptly(api, watch):
    api.apply_slice("web-1", "web", ["10.0.0.1"], ports=80)
    rec = watch()
    rec.wait_for(lambda e: len(e) == 1)
    api.wait_watches(1)
    started = time.monotonic()
    rec.close(timeout=5)
    assert not rec._thread.is_alive() and time.monotonic() - started < 5
    assert rec.error is None
    wait_for(lambda: api.open_watches() == 0, timeout=2, what="the stream to close")


def test_ready_rule_and_names_sans_io():
    ref, opts = ServiceRef("default", "web", None), Options(None, "meshd.io/meshed", "x")
    sl = {"ports": [{"name": "", "port": 80, "protocol": "TCP"},
                    {"name": "u", "port": 53, "protocol": "UDP"}],
          "endpoints": [{"addresses": ["fd00::1"]},                                 # unset: ready
                        {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                        {"addresses": ["10.0.0.3"], "conditions": {"terminating": True}}]}
    assert [str(e) for e in endpoints([sl], ref, opts)] == ["[fd00::1]:80"]
    assert endpoints([{"endpoints": sl["endpoints"], "ports": [{"port": 53, "protocol": "UDP"}]}],
                     ref, opts) == ()
    assert parse_service("web.ns.svc.cluster.local:http", "d", "cluster.local") == \
        ServiceRef("ns", "web", "http")
    assert parse_service("Web", "d", "cluster.local") == ServiceRef("d", "web", None)
    assert parse_service("web.ns.other", "d", "cluster.local") is None
    assert parse_service("-web", "d", "cluster.local") is None
