"""Authorization from Kubernetes against a real meshd: Istio AuthorizationPolicies
(security.istio.io/v1, a strict subset) in the Kubernetes test server, read by the
``kubernetes`` config source for the Service an inbound listener serves (``[[listener]]
service = "web"``), decide who may call it over real mTLS (client certificates from the
meshd's CA, as a peer meshd presents): an allowed caller gets through, another gets 403
and nothing reaches the application; a policy edited live (no HUP) flips the decision; a
policy meshd cannot apply faithfully is refused with its field named (log, metric,
/ready) and its last good version keeps deciding; a new one refused allows nothing (fail
closed); a local ``[[authorization]]`` table wins for the listener it names; before the
source answered at all, the listener denies everything; a client meshd with an identity
(a meshed endpoint, mTLS between the two meshds) is allowed, then denied after an edit.

Each decision asserted is waited for by its evidence: the effective part in /config, the
policies published and loaded by every worker (a snapshot at least that recent), and
``meshd_authz_denied_total`` counting a refusal before the application's record is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from test_authz import (
    AUTHORITY,
    SELF,
    TD,
    client_cert,
    counts,
    curl_mtls,
    denied,
    identity_table,
    tls_opaque,
)

from meshd.identity import ca
from meshd.testing.harness import Meshd, free_port, http_get, wait_for
from meshd.testing.identity_files import files, identity_toml, replace_files
from meshd.testing.k8s_config import kubernetes_table
from meshd.testing.k8s_server import authorization_policy
from meshd.testing.tcp_server import TcpServer, echo

FRONTEND = f"spiffe://{TD}/ns/default/sa/frontend"
BILLING = f"spiffe://{TD}/ns/default/sa/billing"
OPS = f"spiffe://{TD}/ns/ops/sa/deployer"


def allow(name: str, *principals: str, **kwargs: Any) -> dict[str, Any]:
    """A policy targeting Service web that allows ``principals`` (Istio's form: no scheme)."""
    rules = [{"from": [{"source": {"principals": [p.removeprefix("spiffe://")
                                                  for p in principals]}}]}]
    return authorization_policy(name, "web", rules, **kwargs)


def inbound(name: str, port: int, forward: str) -> str:
    return (f'\n[[listener]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\n'
            f'direction = "inbound"\nprotocol = "auto"\nforward = "{forward}"\n'
            f'mtls = "strict"\nservice = "web"\n')


def start(mesh: Any, api: Any, tmp_path: Path, forward: str, *, local: bool = False,
          wait_ready: bool = True) -> tuple[Meshd, dict[str, int]]:
    """meshd with inbound listener "inbound" serving web (and "local", also serving web,
    which a [[authorization]] table names, given ``local``)."""
    ports = {"inbound": free_port()}
    listeners = inbound("inbound", ports["inbound"], forward)
    extra = identity_table(tmp_path / "id") + "\n" + kubernetes_table(api, tmp_path)
    if local:
        ports["local"] = free_port()
        listeners += inbound("local", ports["local"], forward)
        extra += f'\n[[authorization]]\nlistener = "local"\nallow = ["{OPS}"]\n'
    text, mports = mesh.config({}, workers=2, listeners=listeners, extra=extra)
    mports.update(ports)
    return mesh.start(text, mports, wait_ready=wait_ready), ports


def admin(m: Meshd, path: str) -> tuple[int, bytes]:
    status, _, body = http_get("127.0.0.1", m.ports["admin"], path)  # type: ignore[attr-defined]
    return status, body


def effective_authz(m: Meshd) -> dict[str, Any] | None:
    status, body = admin(m, "/config")
    assert status == 200, body
    web = json.loads(body)["fleet"]["services"].get("web", {})
    return web.get("effective", {}).get("authz")


def wait_authz(m: Meshd, check: Any, what: str, timeout: float = 30) -> None:
    """Until /config's effective authz part of web passes ``check`` and every worker
    loaded the snapshot that publishes it."""
    wait_for(lambda: check(effective_authz(m)), timeout, interval=0.01, what=what)

    def published() -> bool:
        fleet = json.loads(admin(m, "/config")[1])["fleet"]
        return bool(fleet["version"] == fleet["published_version"])
    wait_for(published, timeout, interval=0.01, what="the policies published")
    m.wait_snapshot_loaded(timeout=timeout)


def allowed_peers(part: dict[str, Any] | None) -> set[str]:
    if not part:
        return set()
    return {p for rule in part["value"]["rules"] for p in rule["peers"] or ()}


def status_of(port: int, cert: tuple[str, str], path: str = "/x") -> str:
    return curl_mtls(port, path, cert)[0].split()[0]


@pytest.fixture
def certs(tmp_path):
    return {name: client_cert(tmp_path / "peers", spiffe_id)
            for name, spiffe_id in (("frontend", FRONTEND), ("billing", BILLING), ("ops", OPS))}


def test_policy_allows_one_caller_denies_another_and_an_edit_flips_it_live(
        mesh, backends, api, tmp_path, certs):
    b = backends("app")
    m, ports = start(mesh, api, tmp_path, b.address)
    port = ports["inbound"]
    # No policy targets web: open (Istio's rule), to every verified peer.
    wait_authz(m, lambda p: p is None, "web watched for its inbound listener, no policy")
    assert status_of(port, certs["billing"], "/before") == "200"

    api.apply(allow("web-callers", FRONTEND))
    wait_authz(m, lambda p: allowed_peers(p) == {FRONTEND}, "the policy applied")
    assert status_of(port, certs["frontend"], "/front") == "200"
    assert status_of(port, certs["billing"], "/bill") == "403"
    assert curl_mtls(port, "/bill-h2", certs["billing"], "--http2")[0] == "403 2"   # ALPN h2
    wait_for(lambda: denied(m, "enforce", "http") == 2, what="the refusals counted")
    assert counts(b) == {"GET /before": 1, "GET /front": 1}   # nothing of billing's got in
    assert f"denied http from client_id={BILLING}" in m.log()
    assert "AuthorizationPolicy default/web-callers" in m.log()

    # Edited live (kubectl apply, no HUP): now billing, not frontend.
    api.apply(allow("web-callers", BILLING))
    wait_authz(m, lambda p: allowed_peers(p) == {BILLING}, "the edit applied")
    assert status_of(port, certs["billing"], "/bill2") == "200"
    assert status_of(port, certs["frontend"], "/front2") == "403"
    wait_for(lambda: denied(m, "enforce", "http") == 3, what="the third refusal counted")
    assert counts(b) == {"GET /before": 1, "GET /front": 1, "GET /bill2": 1}

    # A path-scoped rule: frontend may GET /public/*, only canonical paths.
    api.apply(authorization_policy("web-callers", "web", [
        {"from": [{"source": {"principals": [BILLING.removeprefix("spiffe://")]}}]},
        {"from": [{"source": {"principals": [FRONTEND.removeprefix("spiffe://")]}}],
         "to": [{"operation": {"paths": ["/public/*"], "methods": ["GET"]}}]}]))
    wait_authz(m, lambda p: allowed_peers(p) == {BILLING, FRONTEND}, "the scoped rule")
    assert status_of(port, certs["frontend"], "/public/a") == "200"
    assert status_of(port, certs["frontend"], "/private") == "403"
    assert status_of(port, certs["frontend"], "/public/%2e%2e/private") == "403"
    assert status_of(port, certs["billing"], "/private") == "200"

    # Deleted: open again.
    api.delete("authorizationpolicies", "web-callers")
    wait_authz(m, lambda p: p is None, "the policy deleted")
    assert status_of(port, certs["frontend"], "/private") == "200"


def test_refused_policy_is_named_and_its_last_good_version_keeps_deciding(
        mesh, backends, api, tmp_path, certs):
    b = backends("app")
    api.apply(allow("web-callers", FRONTEND))
    m, ports = start(mesh, api, tmp_path, b.address)
    port = ports["inbound"]
    wait_authz(m, lambda p: allowed_peers(p) == {FRONTEND}, "the policy applied")

    bad = allow("web-callers", BILLING)
    bad["spec"]["rules"][0]["from"][0]["source"]["notPrincipals"] = ["cluster.local/ns/x/sa/y"]
    api.apply(bad)
    field = "spec.rules[0].from[0].source.notPrincipals"
    wait_for(lambda: field in admin(m, "/ready")[1].decode(), 30, what="/ready names it")
    status, body = admin(m, "/ready")
    assert status == 200   # ready: the last good version applies
    assert "AuthorizationPolicy default/web-callers" in body.decode()
    assert m.metric("meshd_fleet_refused_entries",
                    'service="web",source="k8s",kind="authz",'
                    'entry="AuthorizationPolicy default/web-callers"') == 1
    assert field in m.log()
    assert allowed_peers(effective_authz(m)) == {FRONTEND}   # the last good one
    assert status_of(port, certs["frontend"]) == "200"
    assert status_of(port, certs["billing"]) == "403"

    # A DENY policy (not in the subset): refused and named; having no good version, it
    # allows nothing -- fail closed, not the open door it was meant to shut.
    api.apply(authorization_policy("deny-all", "web", [{}], action="DENY"))
    wait_for(lambda: "spec.action" in admin(m, "/ready")[1].decode(), 30,
             what="/ready names the DENY policy")
    wait_authz(m, lambda p: p is not None and "deny-all" in p["from"], "refused DENY counted")
    before = denied(m, "enforce", "http")
    assert status_of(port, certs["frontend"], "/after-deny") == "403"
    wait_for(lambda: denied(m, "enforce", "http") == before + 1, what="counted")
    assert "GET /after-deny" not in counts(b)

    # Fixed: accepted again, the refusals gone from /ready.
    api.delete("authorizationpolicies", "deny-all")
    api.apply(allow("web-callers", BILLING))
    wait_authz(m, lambda p: allowed_peers(p) == {BILLING}, "the fixed policy applied")
    wait_for(lambda: "refused" not in admin(m, "/ready")[1].decode(), 30,
             what="no refusal left in /ready")
    assert status_of(port, certs["billing"]) == "200"


def test_a_local_authorization_table_wins_for_its_listener(mesh, backends, api, tmp_path,
                                                           certs):
    b = backends("app")
    api.apply(allow("web-callers", FRONTEND))
    m, ports = start(mesh, api, tmp_path, b.address, local=True)
    # Ready means every worker holds the policy (its first answer): no wait needed.
    # The fleet policy decides "inbound"; the file's table decides "local".
    assert status_of(ports["inbound"], certs["frontend"]) == "200"
    assert status_of(ports["inbound"], certs["ops"]) == "403"
    assert status_of(ports["local"], certs["ops"]) == "200"
    assert status_of(ports["local"], certs["frontend"]) == "403"
    wait_for(lambda: denied(m, "enforce", "http", "local") == 1
             and denied(m, "enforce", "http", "inbound") == 1, what="both refusals counted")
    web = json.loads(admin(m, "/config")[1])["fleet"]["services"]["web"]
    assert web["authz_listeners"] == {"inbound": "fleet", "local": "file: [[authorization]]"}
    assert allowed_peers(web["effective"]["authz"]) == {FRONTEND}


def test_no_answer_yet_denies_everything_then_the_answer_opens(mesh, backends, api, tmp_path,
                                                               certs):
    b = backends("app")
    api.stop()   # the source cannot answer: nothing persisted either
    m, ports = start(mesh, api, tmp_path, b.address)
    wait_authz(m, lambda p: p is not None and p["from"].startswith("meshd:"),
               "the placeholder published")
    assert status_of(ports["inbound"], certs["frontend"]) == "403"
    wait_for(lambda: denied(m, "enforce", "http") == 1, what="counted")
    assert "no answer yet from k8s" in m.log()
    assert counts(b) == {}
    api.restart()   # answers: no policy targets web, so it is open
    wait_authz(m, lambda p: p is None, "the answer applied", 60)
    assert status_of(ports["inbound"], certs["frontend"]) == "200"


def test_opaque_tcp_is_covered_by_rules_without_operations_only(mesh, api, tmp_path, certs):
    api.apply(authorization_policy("web-callers", "web", [
        {"from": [{"source": {"principals": [FRONTEND.removeprefix("spiffe://")]}}]},
        {"from": [{"source": {"principals": [BILLING.removeprefix("spiffe://")]}}],
         "to": [{"operation": {"paths": ["/*"]}}]}]))
    with TcpServer(echo) as app:
        m, ports = start(mesh, api, tmp_path, app.address)
        payload = b"\x00\x01opaque bytes\r\n\r\n"
        assert tls_opaque(ports["inbound"], certs["billing"], payload) == b""
        wait_for(lambda: denied(m, "enforce", "tcp") == 1, what="the refusal counted")
        assert app.accepted == 0
        assert tls_opaque(ports["inbound"], certs["frontend"], payload) == payload
        assert app.accepted == 1


def test_api_server_down_keeps_the_policy_also_after_a_restart(mesh, backends, api, tmp_path,
                                                                 certs):
    b = backends("app")
    api.apply(allow("web-callers", FRONTEND))
    m, ports = start(mesh, api, tmp_path, b.address)
    port = ports["inbound"]
    persisted = json.loads(admin(m, "/config")[1])["fleet"]["persisted"]["path"]

    def saved() -> bool:
        try:
            fleet = msgpack.unpackb(Path(persisted).read_bytes())["services"]
        except OSError:
            return False
        return "authz" in fleet.get("web", {}).get("k8s", {})
    wait_for(saved, 10, what="the policy persisted")
    api.stop()
    m.wait_metric("meshd_fleet_stale", 'service="web"', at_least=1)
    assert status_of(port, certs["frontend"]) == "200"
    assert status_of(port, certs["billing"]) == "403"
    m.stop()   # and meshd restarts meanwhile: the persisted policy decides, not the
    m.start()  # deny-all of a source that never answered
    assert status_of(port, certs["frontend"]) == "200"
    assert status_of(port, certs["billing"]) == "403"
    assert json.loads(admin(m, "/config")[1])["fleet"]["services"]["web"]["sources"]["k8s"][
        "stale"] is True
    api.start()
    api.apply(allow("web-callers", BILLING))
    # (the watch retries with backoff, grown while the API server was down)
    wait_authz(m, lambda p: allowed_peers(p) == {BILLING}, "a change applies again", 60)
    assert status_of(port, certs["billing"]) == "200"


def test_a_client_meshd_with_an_identity_is_allowed_then_denied_live(mesh, backends, api,
                                                                      tmp_path):
    """The mesh's own path: a client meshd (identity frontend) calls web's meshd over mTLS
    (a meshed endpoint with web's expected identity); the policy decides on B."""
    app = backends("app")
    api.apply(allow("web-callers", FRONTEND))
    b, ports = start(mesh, api, tmp_path, app.address)
    issued = ca.issue(AUTHORITY, FRONTEND)
    replace_files(tmp_path / "id-a", files(issued.cert_pem, issued.key_pem,
                                           AUTHORITY.cert_pem))
    text, ports_a = mesh.config({"web": []}, workers=1,
                                extra=identity_toml(tmp_path / "id-a", trust_domain=TD))
    text = text.replace("web = []", (
        f'web = [{{ address = "{app.address}", meshed = true, '
        f'inbound_port = {ports["inbound"]}, identity = "{SELF}" }}]'))
    a = mesh.start(text, ports_a)

    def get(path: str) -> int:
        return http_get("127.0.0.1", ports_a["outbound"], path, {"Host": "web"})[0]
    assert get("/front") == 200
    api.apply(allow("web-callers", BILLING))
    wait_authz(b, lambda p: allowed_peers(p) == {BILLING}, "the edit applied")
    assert get("/front-again") == 403
    wait_for(lambda: denied(b, "enforce", "http") == 1, what="the refusal counted on B")
    assert f"denied http from client_id={FRONTEND}" in b.log()
    assert counts(app) == {"GET /front": 1}
    assert a.metric("meshd_tls_handshake_total",
                    'listener="outbound",direction="outbound",result="ok"') >= 1
