"""Two real meshds getting their identities from the Consul test server's Connect CA
(provider ``consul``), mTLS between them, and a CA rotation in Consul under keep-alive
load with zero failed requests."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MeshFactory

from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import KeepAliveLoad, Meshd, free_port, http_get, wait_for

INBOUND = """
[[listener]]
name = "inbound"
listen = "127.0.0.1:{port}"
direction = "inbound"
protocol = "auto"
forward = "{forward}"
mtls = "strict"
"""


def identity(server: ConsulServer, service: str, **extra: object) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(["[identity]", 'provider = "consul"',
                      f'trust_domain = "{server.trust_domain}"', f'address = "{server.url}"',
                      f'service = "{service}"', *lines]) + "\n"


def admin_json(m: Meshd, path: str) -> dict:
    host, _, port = (m.admin or "").rpartition(":")
    status, _, body = http_get(host, int(port), path)
    assert status == 200, (status, body)
    return json.loads(body)


@dataclass
class Pair:
    a: Meshd            # client side: outbound listener; discovery says web is meshed behind b
    b: Meshd            # server side: strict mTLS inbound listener in front of the app
    inbound_port: int


@pytest.fixture
def consul_ca() -> Iterator[ConsulServer]:
    server = ConsulServer().start()
    yield server
    server.stop()


def _pair(mesh: MeshFactory, server: ConsulServer, app: str, *, b_top: str = "",
          b_identity: dict[str, object] | None = None) -> Pair:
    inbound_port = free_port()
    text_b, ports_b = mesh.config({}, workers=2, top=b_top, listeners=INBOUND.format(
        port=inbound_port, forward=app), extra=identity(server, "web", **(b_identity or {})))
    ports_b["inbound"] = inbound_port
    b = mesh.start(text_b, ports_b)
    meshed = (f'{{ address = "{app}", meshed = true, inbound_port = {inbound_port}, '
              f'identity = "{server.connect.uri("web")}" }}')
    text_a, ports_a = mesh.config({}, workers=2, extra=identity(server, "client"))
    text_a = text_a.replace("[discovery.services]\n", f"[discovery.services]\nweb = [{meshed}]\n")
    a = mesh.start(text_a, ports_a)
    return Pair(a, b, inbound_port)


def _serial(server: ConsulServer, service: str) -> str:
    """The current leaf's serial as meshd's /identity shows it (hex, no colons)."""
    with server._cond:
        return server.connect.leaves[service].serial.replace(":", "").lstrip("0")


def _published(m: Meshd) -> dict:
    return admin_json(m, "/identity")


def _handshakes(m: Meshd, listener: str, direction: str, result: str = "ok") -> float:
    return m.metric("meshd_tls_handshake_total",
                    f'listener="{listener}",direction="{direction}",result="{result}"')


class PeerLoad:
    """A peer meshd's traffic to b's inbound port, one new mTLS connection per request,
    with the client service's current leaf and roots read from the agent each time (as a
    peer following Consul would): every request is a fresh handshake both ways."""

    def __init__(self, server: ConsulServer, port: int, tmp: Path, max_requests: int = 2000,
                 max_seconds: float = 60.0) -> None:
        self.server, self.port, self.tmp = server, port, tmp
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PeerLoad:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _context(self) -> ssl.SSLContext:
        def get(path: str) -> dict:
            with urllib.request.urlopen(self.server.url + path, timeout=10) as r:
                return json.loads(r.read())
        leaf = get("/v1/agent/connect/ca/leaf/client")
        roots = get("/v1/agent/connect/ca/roots")
        pem = self.tmp / "client.pem"
        pem.write_text(leaf["CertPEM"] + leaf["PrivateKeyPEM"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(str(pem))
        ctx.load_verify_locations(cadata="".join(r["RootCert"] for r in roots["Roots"]))
        return ctx

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                        self._context().wrap_socket(raw) as tls:
                    tls.sendall(b"GET /peer HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                    got = b""
                    while chunk := tls.recv(65536):
                        got += chunk
                if not got.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(got[:80])
                self.ok += 1
            except Exception as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            time.sleep(0.02)

    def stop(self) -> PeerLoad:
        self._stop.set()
        self._thread.join(20)
        return self


def test_two_meshds_over_mtls_with_consul_identities(mesh, backends, consul_ca) -> None:
    app = backends("app")
    p = _pair(mesh, consul_ca, app.address)
    status, _, body = http_get("127.0.0.1", p.a.ports["outbound"], "/hello", {"Host": "web"})
    assert (status, body) == (200, b"app /hello\n")
    for m, service in ((p.a, "client"), (p.b, "web")):
        info = _published(m)
        assert info["local_id"] == consul_ca.connect.uri(service)
        assert info["provider"] == "consul" and info["serial"] == _serial(consul_ca, service)
    assert p.a.wait_metric("meshd_tls_handshake_total",
                           'listener="outbound",direction="outbound",result="ok"') >= 1
    assert p.b.wait_metric("meshd_tls_handshake_total",
                           'listener="inbound",direction="inbound",result="ok"') >= 1
    # meshd asked the agent by blocking query: the leaf of its own service, the roots
    blocking = {r.path for r in consul_ca.requests if r.param("index")}
    assert {"/v1/agent/connect/ca/leaf/web", "/v1/agent/connect/ca/leaf/client",
            "/v1/agent/connect/ca/roots"} <= blocking


def test_ca_rotation_under_keep_alive_load_drops_nothing(mesh, backends, consul_ca,
                                                         tmp_path) -> None:
    """Consul rotates its CA: the new root reaches both meshds first (roots of both), then
    the leaves are re-signed under it. Keep-alive clients through meshd A and a peer
    making a new mTLS connection per request to meshd B see no failure; afterwards a new
    A -> B connection handshakes with the new leaves on both ends."""
    app = backends("app")
    # B closes an idle client connection after 1 s: the check at the end gets a new A -> B
    # connection without restarting anything.
    p = _pair(mesh, consul_ca, app.address, b_top='[limits]\nclient_idle_timeout = "1s"\n')
    load = KeepAliveLoad("127.0.0.1", p.a.ports["outbound"], connections=4, path="/load",
                         headers={"Host": "web"}, max_seconds=90).start()
    peer = PeerLoad(consul_ca, p.inbound_port, tmp_path / "peer", max_seconds=90).start()
    try:
        wait_for(lambda: load.ok >= 50 and peer.ok >= 5, timeout=30,
                 what="load through both paths")
        old_serials = {s: _serial(consul_ca, s) for s in ("web", "client")}

        consul_ca.rotate_ca(reissue=False)
        for m in (p.a, p.b):
            wait_for(lambda m=m: len(_published(m)["roots"]) == 2, timeout=20,
                     what="both roots published")
        mark = (load.ok, peer.ok)
        wait_for(lambda: load.ok >= mark[0] + 50 and peer.ok >= mark[1] + 5, timeout=30,
                 what="load with both roots")

        consul_ca.reissue_leaves()
        new_serials = {s: _serial(consul_ca, s) for s in ("web", "client")}
        assert new_serials["web"] != old_serials["web"]
        for m, s in ((p.a, "client"), (p.b, "web")):
            wait_for(lambda m=m, s=s: _published(m)["serial"] == new_serials[s], timeout=20,
                     what=f"the re-signed leaf of {s} published")
        mark = (load.ok, peer.ok)
        wait_for(lambda: load.ok >= mark[0] + 50 and peer.ok >= mark[1] + 10, timeout=30,
                 what="load with the new leaves")
    finally:
        load.stop()
        peer.stop()
    assert load.failures == [] and peer.failures == []
    assert load.ok > 150 and peer.ok > 20
    for result in ("verify_failed", "bad_san", "error", "no_client_cert"):
        assert _handshakes(p.b, "inbound", "inbound", result) == 0
    # B's workers took the new leaf for new handshakes (the peer connects anew each time)
    loaded = f"loaded {consul_ca.connect.uri('web')} (serial {new_serials['web']}"
    wait_for(lambda: loaded in p.b.log(), timeout=10, what="B loaded the new leaf")
    # A new A -> B connection once B closed the idle one: both ends on their new leaves.
    before = _handshakes(p.a, "outbound", "outbound")

    def fresh_handshake() -> bool:
        status = http_get("127.0.0.1", p.a.ports["outbound"], "/after", {"Host": "web"})[0]
        return status == 200 and _handshakes(p.a, "outbound", "outbound") > before
    wait_for(fresh_handshake, timeout=20, interval=0.5, what="a new A -> B handshake")
    assert _handshakes(p.a, "outbound", "outbound", "verify_failed") == 0


def test_agent_outage_keeps_the_last_material_then_follows_a_rotation(mesh, backends,
                                                                      consul_ca) -> None:
    """The agent goes away: meshd logs the failed watch, keeps serving mTLS with the last
    material (fail static) and, once the agent is back, picks up a rotation made there."""
    app = backends("app")
    p = _pair(mesh, consul_ca, app.address)
    assert http_get("127.0.0.1", p.a.ports["outbound"], "/1", {"Host": "web"})[0] == 200
    serial = _published(p.b)["serial"]
    consul_ca.stop()
    needle = f"watch failed: ConsulError: consul 127.0.0.1:{consul_ca.port}: unreachable"
    for m in (p.a, p.b):
        wait_for(lambda m=m: needle in m.log(), timeout=20, what="the failed watch logged")
    assert http_get("127.0.0.1", p.a.ports["outbound"], "/2", {"Host": "web"})[0] == 200
    assert _published(p.b)["serial"] == serial
    consul_ca.restart()
    consul_ca.rotate_ca()
    for m, s in ((p.a, "client"), (p.b, "web")):
        wait_for(lambda m=m, s=s: _published(m)["serial"] == _serial(consul_ca, s)
                 and len(_published(m)["roots"]) == 2, timeout=60,
                 what=f"the rotated leaf of {s} published after the outage")
    assert http_get("127.0.0.1", p.a.ports["outbound"], "/3", {"Host": "web"})[0] == 200


def test_meshd_check_constructs_the_provider_without_an_agent(mesh, tmp_path) -> None:
    """`meshd check` builds the provider (no network: no agent listens here) and names
    each bad option under identity.*."""
    base = mesh.config({"web": ["127.0.0.1:1"]})[0]
    agent = f"http://127.0.0.1:{free_port()}"
    good = tmp_path / "good.toml"
    good.write_text(base + '\n[identity]\nprovider = "consul"\ntrust_domain = "consul"\n'
                    f'address = "{agent}"\nservice = "web"\nintentions = true\n')
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(good)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '\n[identity]\nprovider = "consul"\ntrust_domain = "consul"\n'
                   'intentions_fail = "ajar"\npassing_only = true\n')
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    for line in ("identity.service: required", 'identity.intentions_fail: expected "closed" '
                 'or "open", got \'ajar\'', "identity.passing_only: unknown key"):
        assert f"{bad}: {line}" in out.stderr, (line, out.stderr)


@pytest.mark.parametrize(("case", "expect"), [
    ("allow-intention", 200),     # default deny, an allow intention for client -> web
    ("deny-intention", 403),      # default allow, a deny intention
    ("default-deny", 403),        # no intention, Consul's ACL default policy deny
    ("agent-error-closed", 403),  # the agent cannot answer: fail closed
    ("agent-error-open", 200),    # ... or open, when intentions_fail = "open"
])
def test_intentions_through_the_agent(mesh, backends, case, expect) -> None:
    """B asks its agent (``intentions = true``) whether A's identity may call it; the
    answer comes from the test server's intentions and default policy."""
    pytest.importorskip("meshd.worker.authorize",
                        reason="the worker's authorization gate (w-authz) is not merged here")
    server = ConsulServer(default_policy="deny" if case != "deny-intention" else "allow")
    server.start()
    try:
        if case == "allow-intention":
            server.set_intention("client", "web", "allow")
        elif case == "deny-intention":
            server.set_intention("client", "web", "deny")
        elif case.startswith("agent-error"):
            server.set_intention("client", "web", "allow")
            server.set_fault("error", prefix="/v1/agent/connect/authorize")
        extra: dict[str, object] = {"intentions": True}
        if case == "agent-error-open":
            extra["intentions_fail"] = "open"
        app = backends("app")
        p = _pair(mesh, server, app.address, b_identity=extra)
        status, _, body = http_get("127.0.0.1", p.a.ports["outbound"], "/who", {"Host": "web"})
        assert status == expect, body
        [asked, *_] = server.requests_to("/v1/agent/connect/authorize")
        assert asked.method == "POST"
        if expect == 403:
            assert p.b.wait_metric("meshd_authz_denied_total",
                                   'listener="inbound",mode="enforce",protocol="http"') == 1
    finally:
        server.stop()
