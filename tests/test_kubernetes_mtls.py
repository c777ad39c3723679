"""Two real meshds where the client meshd (A) discovers the server meshd (B) through the
kubernetes discovery plugin: a meshed Service labelled ``meshd.io/service-account``
makes A expect B's service-account identity, so the hop is mTLS (B's strict inbound
listener counts the verified handshake)."""

from __future__ import annotations

import http.client
import textwrap

import pytest

from meshd.identity import ca
from meshd.testing.harness import free_port
from meshd.testing.identity_files import TD, files, identity_toml, replace_files
from meshd.testing.k8s_config import kubernetes_table

WEB = f"spiffe://{TD}/ns/default/sa/web"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"

INBOUND = """
[[listener]]
name = "inbound"
listen = "127.0.0.1:{port}"
direction = "inbound"
protocol = "auto"
forward = "{forward}"
mtls = "strict"
"""


@pytest.fixture(scope="module")
def authority() -> ca.Issued:
    return ca.new_ca(TD)


def _get(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", "/hello", headers={"Host": "web"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_labelled_meshed_service_is_reached_over_mtls(mesh, backends, api, tmp_path,
                                                        authority):
    app = backends("app")
    folder_a, folder_b = tmp_path / "id-a", tmp_path / "id-b"
    for folder, spiffe_id in ((folder_a, CLIENT), (folder_b, WEB)):
        issued = ca.issue(authority, spiffe_id)
        replace_files(folder, files(issued.cert_pem, issued.key_pem, authority.cert_pem))
    # B: strict mTLS inbound in front of the app, as web's sidecar
    inbound_port = free_port()
    text_b, ports_b = mesh.config({}, workers=1, listeners=INBOUND.format(
        port=inbound_port, forward=app.address), extra=identity_toml(folder_b))
    ports_b["inbound"] = inbound_port
    b = mesh.start(text_b, ports_b)

    # The Service web (labels copied onto its slice): meshed, service account web.
    api.create_service("web", labels={"meshd.io/meshed": "true",
                                      "meshd.io/service-account": "web"})
    api.apply_slice("web-x", "web", [app.host],
                    ports={"http": app.port, "meshd-inbound": inbound_port},
                    labels={"meshd.io/meshed": "true", "meshd.io/service-account": "web"})
    extra = kubernetes_table(api, tmp_path, "discovery") + textwrap.dedent("""
        [service.web]
        discovery = "k8s"
        timeout = "5s"
        """) + identity_toml(folder_a)
    text_a, ports_a = mesh.config({}, workers=1, extra=extra)
    a = mesh.start(text_a, ports_a)

    assert _get(a.ports["outbound"]) == (200, b"app /hello\n")
    sel = 'listener="inbound",direction="inbound",result="ok"'
    assert b.wait_metric("meshd_tls_handshake_total", sel, 1) >= 1
    assert a.wait_metric("meshd_tls_handshake_total",
                         'listener="outbound",direction="outbound",result="ok"', 1) >= 1
    assert b.metric("meshd_tls_handshake_total",
                    'listener="inbound",direction="inbound",result="plaintext_refused"') == 0
