"""The consul identity provider against the Consul test server's Connect endpoints:
the first material, leaf renewal and CA rotation by blocking query, errors, the ACL token,
intentions through /v1/agent/connect/authorize, and real TLS handshakes with what it
yields."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from meshd_consul import ConsulError
from meshd_consul.identity import ROOTS, ConsulIdentity

from meshd.errors import ConfigError
from meshd.identity.api import Material, Settings
from meshd.identity.material import check
from meshd.testing.consul_server import ConsulServer

SETTINGS = Settings(trust_domain="consul", instance="test", state_dir="/nonexistent")
LEAF = "/v1/agent/connect/ca/leaf/web"


class Recorder:
    """Iterates a provider's watch() in a thread; keeps every Material and the error."""

    def __init__(self, provider: ConsulIdentity) -> None:
        self.provider = provider
        self.materials: list[Material] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for material in self.provider.watch():
                with self._cond:
                    self.materials.append(material)
                    self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def wait(self, predicate: Callable[[list[Material]], bool], timeout: float = 10.0
             ) -> Material:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.materials) or self.error,
                                       timeout):
                raise TimeoutError(f"no such material within {timeout}s "
                                   f"({len(self.materials)} so far)")
            if not predicate(self.materials):
                raise AssertionError(f"watch raised {self.error!r}")
            return self.materials[-1]

    def count(self, n: int, timeout: float = 10.0) -> Material:
        return self.wait(lambda ms: len(ms) >= n, timeout)

    def wait_error(self, timeout: float = 10.0) -> BaseException:
        with self._cond:
            if not self._cond.wait_for(lambda: self.error is not None, timeout):
                raise TimeoutError(f"the watch did not fail within {timeout}s")
            assert self.error is not None
            return self.error

    def close(self) -> None:
        self.provider.close()
        self._thread.join(5)


@pytest.fixture
def servers() -> Iterator[Callable[..., ConsulServer]]:
    started: list[ConsulServer] = []

    def start(**kwargs: Any) -> ConsulServer:
        server = ConsulServer(**kwargs).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def watch() -> Iterator[Callable[..., Recorder]]:
    recorders: list[Recorder] = []

    def start(server: ConsulServer, **options: Any) -> Recorder:
        rec = Recorder(ConsulIdentity({"address": server.url, "service": "web", **options},
                                      SETTINGS))
        recorders.append(rec)
        return rec

    yield start
    for rec in recorders:
        rec.close()


def certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def uri_of(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [uri] = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


def signed_by(cert: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(root)
        return True
    except (ValueError, TypeError, Exception):
        return False


def active_root(server: ConsulServer) -> x509.Certificate:
    return x509.load_pem_x509_certificate(server.connect.active.issued.cert_pem)


def key_matches(material: Material) -> bool:
    key = serialization.load_pem_private_key(material.key_pem, password=None)
    leaf = certs(material.chain_pem)[0]
    return key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]


def both_blocked(server: ConsulServer) -> None:
    """Both long polls sit in a blocking query (index > 0) on the server."""
    server.wait_for(lambda s: s.blocked >= 2, timeout=10)


# -- certificates ------------------------------------------------------------------------

def test_first_material(servers, watch) -> None:
    server = servers()
    m = watch(server).count(1)
    [leaf] = certs(m.chain_pem)
    assert uri_of(leaf) == (f"spiffe://{server.trust_domain}/ns/default/dc/dc1/svc/web")
    assert m.trust_domain == server.trust_domain and m.trust_domain.endswith(".consul")
    assert [c.fingerprint(c.signature_hash_algorithm) for c in certs(m.roots_pem)] == [  # type: ignore[arg-type]
        active_root(server).fingerprint(active_root(server).signature_hash_algorithm)]  # type: ignore[arg-type]
    assert signed_by(leaf, active_root(server)) and key_matches(m)
    # what meshd's control process checks before it publishes (trust domain: Consul's)
    assert check(m, SETTINGS.trust_domain).spiffe_id == server.connect.uri("web")
    assert "key=<hidden>" in repr(m) and b"PRIVATE KEY" not in repr(m).encode()


def test_leaf_renewed_before_expiry(servers, watch) -> None:
    """The agent renews a leaf within 60-90 % of its life; the renewal wakes the blocked
    leaf query and a new Material follows, with the same roots."""
    server = servers(leaf_ttl=3.0)
    rec = watch(server)
    first = rec.count(1)
    second = rec.count(2, timeout=15)
    a, b = certs(first.chain_pem)[0], certs(second.chain_pem)[0]
    assert a.serial_number != b.serial_number and uri_of(a) == uri_of(b)
    assert second.roots_pem == first.roots_pem and key_matches(second)
    assert b.not_valid_after_utc > a.not_valid_after_utc


def test_leaf_reissued_yields_material(servers, watch) -> None:
    server = servers()
    rec = watch(server)
    first = rec.count(1)
    server.reissue_leaves()
    second = rec.count(2)
    assert certs(second.chain_pem)[0].serial_number != certs(first.chain_pem)[0].serial_number


def test_ca_rotation_roots_first_then_leaf(servers, watch) -> None:
    """Rotation in two steps (Consul spreads leaf re-signing after a rotation): first a
    Material with both roots and the old leaf, then one with the leaf under the new root."""
    server = servers()
    rec = watch(server)
    first = rec.count(1)
    old_root = active_root(server)
    server.rotate_ca(reissue=False)
    new_root = active_root(server)
    both = rec.count(2)
    assert len(certs(both.roots_pem)) == 2
    assert both.chain_pem == first.chain_pem and both.key_pem == first.key_pem
    server.reissue_leaves()
    after = rec.count(3)
    leaf = certs(after.chain_pem)[0]
    assert signed_by(leaf, new_root) and not signed_by(leaf, old_root)
    assert {c.subject for c in certs(after.roots_pem)} == {old_root.subject, new_root.subject}
    assert key_matches(after)
    for m in (both, after):
        check(m, SETTINGS.trust_domain)
    server.prune_roots()
    pruned = rec.count(4)
    assert [c.subject for c in certs(pruned.roots_pem)] == [new_root.subject]


def test_ca_rotation_at_once(servers, watch) -> None:
    server = servers()
    rec = watch(server)
    rec.count(1)
    server.rotate_ca()
    new_root = active_root(server)
    last = rec.wait(lambda ms: signed_by(certs(ms[-1].chain_pem)[0], new_root)
                    and len(certs(ms[-1].roots_pem)) == 2)
    assert key_matches(last)


def test_blocking_queries_really_block(servers, watch) -> None:
    """While nothing changes, each loop has made one plain read and one blocking query
    (index > 0, with the configured wait); one leaf change costs one more leaf query."""
    server = servers()
    rec = watch(server, wait="5m")
    rec.count(1)
    both_blocked(server)
    roots, leaf = server.requests_to(ROOTS), server.requests_to(LEAF)
    assert len(roots) == 2 and len(leaf) == 2
    assert roots[0].param("index") is None and int(roots[1].param("index") or 0) > 0
    assert leaf[1].param("wait") == "300s" and int(leaf[1].param("index") or 0) > 0
    server.reissue_leaves()
    rec.count(2)
    both_blocked(server)
    assert len(server.requests_to(ROOTS)) == 2 and len(server.requests_to(LEAF)) == 3
    assert len(rec.materials) == 2


def test_wait_expiry_without_change_yields_nothing_new(servers, watch) -> None:
    """A blocking query that times out (same index) is asked again; no new Material."""
    server = servers()
    rec = watch(server, wait="200ms")
    rec.count(1)
    server.wait_for(lambda s: len(s.requests_to(LEAF)) >= 5, timeout=10)
    server.reissue_leaves()
    rec.count(2)
    assert len(rec.materials) == 2


# -- errors ------------------------------------------------------------------------------

def test_agent_error_raises(servers, watch) -> None:
    server = servers()
    server.set_fault("error")
    err = watch(server).wait_error()
    assert isinstance(err, ConsulError)
    assert f"consul 127.0.0.1:{server.port}" in str(err) and "500" in str(err)


def test_agent_error_after_material_raises(servers, watch) -> None:
    server = servers()
    rec = watch(server)
    rec.count(1)
    both_blocked(server)
    server.set_fault("error", body="rpc error: leader lost")
    server.reissue_leaves()        # the blocked leaf query answers; the next one fails
    err = rec.wait_error()
    assert isinstance(err, ConsulError) and "leader lost" in str(err)
    assert len(rec.materials) == 2  # the new leaf was delivered before the failure


def test_agent_hang_raises_after_timeout(servers, watch) -> None:
    server = servers()
    server.set_fault("hang")
    t0 = time.monotonic()
    err = watch(server, timeout="500ms").wait_error(timeout=15)
    assert isinstance(err, ConsulError) and "no answer in time" in str(err)
    assert time.monotonic() - t0 < 10
    server.set_fault(None)


def test_agent_down_raises(servers, watch) -> None:
    server = servers()
    server.stop()
    err = watch(server).wait_error()
    assert isinstance(err, ConsulError) and "Connection refused" in str(err)


def test_token_sent_and_required(servers, watch, tmp_path: Path) -> None:
    server = servers(acl={"s3cret": "write", "reader": "read"})
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    rec = watch(server, token_file=str(token))
    rec.count(1)
    assert {r.token for r in server.requests_to(LEAF)} == {"s3cret"}
    token.write_text("reader\n")
    err = watch(server, token_file=str(token)).wait_error()
    assert isinstance(err, ConsulError) and "403" in str(err)
    assert "service:write on web" in str(err)
    err = watch(server).wait_error()   # anonymous
    assert "403" in str(err)


def test_datacenter_must_match_the_leaf(servers, watch) -> None:
    server = servers()
    assert watch(server, datacenter="dc1").count(1)
    err = watch(server, datacenter="dc2").wait_error()
    assert isinstance(err, ConsulError) and "not datacenter 'dc2'" in str(err)


# -- real TLS with the material ----------------------------------------------------------

def _context(material: Material, tmp: Path, server_side: bool) -> ssl.SSLContext:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "pem").write_bytes(material.chain_pem + material.key_pem)
    (tmp / "roots").write_bytes(material.roots_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(tmp / "pem")
    ctx.load_verify_locations(tmp / "roots")
    return ctx


def handshake(client: Material, server: Material, tmp: Path) -> tuple[str, str]:
    """A real TLS 1.3 handshake, both sides verifying; the URI SANs each side saw."""
    cctx = _context(client, tmp / "c", False)
    sctx = _context(server, tmp / "s", True)
    a, b = socket.socketpair()
    seen: dict[str, Any] = {}

    def serve() -> None:
        try:
            with sctx.wrap_socket(b, server_side=True) as s:
                seen["client"] = s.getpeercert()
        except ssl.SSLError as e:
            seen["error"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        with cctx.wrap_socket(a) as c:
            peer = c.getpeercert()
    finally:
        t.join(5)
    if "error" in seen:
        raise seen["error"]
    def uri(cert: Any) -> str:
        return next(v for k, v in cert["subjectAltName"] if k == "URI")
    return uri(seen["client"]), uri(peer)


def test_two_services_handshake_through_a_rotation(servers, tmp_path: Path) -> None:
    """web and api each get their material; mTLS between them works before a rotation,
    in its middle (new roots, one side re-signed, the other not yet) and after it."""
    server = servers()
    web = Recorder(ConsulIdentity({"address": server.url, "service": "web"}, SETTINGS))
    api = Recorder(ConsulIdentity({"address": server.url, "service": "api"}, SETTINGS))
    try:
        w, a = web.count(1), api.count(1)
        assert handshake(w, a, tmp_path / "1") == (server.connect.uri("web"),
                                                   server.connect.uri("api"))
        server.rotate_ca(reissue=False)
        w, a = web.count(2), api.count(2)
        server.reissue_leaves(["web"])           # web under the new root, api not yet
        w = web.count(3)
        handshake(w, a, tmp_path / "2")
        handshake(a, w, tmp_path / "3")
        server.reissue_leaves(["api"])
        a = api.count(3)
        handshake(w, a, tmp_path / "4")
        # a peer that never learnt the new root refuses the new leaf: the order matters
        stale = Material(w.chain_pem, w.key_pem, web.materials[0].roots_pem, w.trust_domain)
        with pytest.raises(ssl.SSLError, match="certificate verify failed"):
            handshake(stale, a, tmp_path / "5")
    finally:
        web.close()
        api.close()


# -- intentions --------------------------------------------------------------------------

def provider(server: ConsulServer, **options: Any) -> ConsulIdentity:
    return ConsulIdentity({"address": server.url, "service": "web", "intentions": True,
                           **options}, SETTINGS)


def test_authorize_default_allow_then_intentions(servers) -> None:
    server = servers()
    p = provider(server)
    api, db = server.connect.uri("api"), server.connect.uri("db")
    assert p.authorizes() and p.fail_open is False
    assert p.authorize(api) is True               # no intention: ACLs off, default allow
    server.set_intention("api", "web", "deny")
    assert p.authorize(api) is False and p.authorize(db) is True
    server.set_intention("*", "web", "deny")
    server.set_intention("api", "web", "allow")   # exact beats *
    assert p.authorize(api) is True and p.authorize(db) is False
    server.delete_intention("*", "web")
    assert p.authorize(db) is True
    [req, *_] = server.requests_to("/v1/agent/connect/authorize")
    assert req.method == "POST"
    assert json.loads(req.body) == {"Target": "web", "ClientCertURI": api,
                                    "ClientCertSerial": ""}


def test_authorize_default_deny(servers) -> None:
    server = servers(default_policy="deny")
    p = provider(server)
    assert p.authorize(server.connect.uri("api")) is False
    server.set_intention("api", "web", "allow")
    assert p.authorize(server.connect.uri("api")) is True


def test_authorize_foreign_identity_is_denied_even_fail_open(servers) -> None:
    """Consul answers 400 for an ID that is not a Consul service's: a denial, never an
    error that fail-open would turn into an allow."""
    server = servers()
    p = provider(server, intentions_fail="open")
    assert p.fail_open is True
    assert p.authorize("spiffe://cluster.local/ns/default/sa/web") is False


def test_authorize_errors_raise(servers, tmp_path: Path) -> None:
    server = servers(acl={"s3cret": "write", "reader": "read"})
    token = tmp_path / "token"
    token.write_text("s3cret")
    p = provider(server, token_file=str(token), authorize_timeout="300ms")
    uri = server.connect.uri("api")
    assert p.authorize(uri) is False        # ACLs on: the anonymous default is deny
    assert server.requests_to("/v1/agent/connect/authorize")[-1].token == "s3cret"
    server.set_fault("error")
    with pytest.raises(ConsulError, match="500"):
        p.authorize(uri)
    server.set_fault("hang")
    t0 = time.monotonic()
    with pytest.raises(ConsulError, match="no answer in time"):
        p.authorize(uri)
    assert time.monotonic() - t0 < 5
    server.set_fault(None)
    token.write_text("reader")
    with pytest.raises(ConsulError, match="403"):
        p.authorize(uri)
    server.stop()
    with pytest.raises(ConsulError, match="unreachable"):
        provider(server).authorize(uri)


def test_intentions_api_exact(servers) -> None:
    import urllib.request
    server = servers()
    url = f"{server.url}/v1/connect/intentions/exact?source=api&destination=web"
    req = urllib.request.Request(url, data=json.dumps({"Action": "deny"}).encode(),
                                 method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert json.loads(r.read()) is True
    with urllib.request.urlopen(url, timeout=5) as r:
        got = json.loads(r.read())
    assert (got["SourceName"], got["DestinationName"], got["Action"]) == ("api", "web", "deny")
    assert provider(server).authorize(server.connect.uri("api")) is False
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=5) as r:
        assert json.loads(r.read()) is True
    assert provider(server).authorize(server.connect.uri("api")) is True


# -- options -----------------------------------------------------------------------------

def test_construction_touches_no_network() -> None:
    p = ConsulIdentity({"address": "http://127.0.0.1:1", "service": "web"}, SETTINGS)
    assert p.opts.service == "web" and not p.authorizes() and p.fail_open is False
    assert p.opts.agent.port == 1


def test_options_errors_keyed() -> None:
    with pytest.raises(ConfigError) as e:
        ConsulIdentity({"tags": ["x"], "intentions": "yes", "intentions_fail": "maybe",
                        "address": "ftp://x", "authorize_timeout": "1h"}, SETTINGS)
    keys = {k for k, _ in e.value.problems}
    assert keys == {"tags", "intentions", "intentions_fail", "address", "service",
                    "authorize_timeout"}
    with pytest.raises(ConfigError, match="service"):
        ConsulIdentity({"service": "we/b"}, SETTINGS)


def test_entry_point() -> None:
    from importlib.metadata import entry_points
    [ep] = [e for e in entry_points(group="meshd.identity") if e.name == "consul"]
    assert ep.load() is ConsulIdentity
