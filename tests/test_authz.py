"""[[authorization]] against a real meshd: an inbound listener a policy names refuses a
peer the policy does not allow -- HTTP/1.1 and HTTP/2 with 403, gRPC with
PERMISSION_DENIED, opaque TCP by closing the connection before anything is connected --
and nothing reaches the application (each backend records what it received: checked
after meshd_authz_denied_total counted the refusal). Audit mode lets it through, counted
and logged; a listener no policy names stays open.

Most peers here are plaintext clients of a permissive listener: they have no verified
identity (client_id ""), which no allow-list pattern matches. The test_mtls_* ones are
peers with identities (client certificates from the meshd's CA, over mTLS to the inbound
listener): the allowed identity passes, another is refused. The finer rules are in
tests/test_authz_core.py and tests/test_authz_gate.py."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import MeshFactory

from meshd.errors import Forbidden
from meshd.identity import ca
from meshd.testing.harness import Backend, Meshd, free_port, http_get, require_tool, wait_for
from meshd.testing.tcp_server import TcpServer, echo

TD = "cluster.local"
SELF = f"spiffe://{TD}/ns/default/sa/api"
WEB = f"spiffe://{TD}/ns/default/sa/web"


AUTHORITY = ca.new_ca(TD)  # one CA for the module: certificates for meshd and its clients


def identity_table(folder: Path) -> str:
    """An [identity] table of the files provider, with a CA and this meshd's leaf."""
    authority = AUTHORITY
    leaf = ca.issue(authority, SELF)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("ca.crt", authority.cert_pem), ("tls.crt", leaf.cert_pem),
                       ("tls.key", leaf.key_pem)):
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return (f'\n[identity]\nprovider = "files"\ntrust_domain = "{TD}"\n'
            f'cert_file = "{folder}/tls.crt"\nkey_file = "{folder}/tls.key"\n'
            f'ca_file = "{folder}/ca.crt"\n')


def inbound(name: str, port: int, forward: str) -> str:
    return (f'\n[[listener]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\n'
            f'direction = "inbound"\nprotocol = "auto"\nforward = "{forward}"\n'
            f'mtls = "permissive"\n')


def policy(listener: str, mode: str = "enforce", route: str | None = None) -> str:
    return (f'\n[[authorization]]\nlistener = "{listener}"\nallow = ["{WEB}"]\n'
            f'mode = "{mode}"\n' + (f'route = "{route}"\n' if route else ""))


def start(mesh: MeshFactory, tmp_path: Path, forward: str, policies: str,
          open_forward: str | None = None) -> tuple[Meshd, int, int | None]:
    """meshd with inbound listener "inbound" (forwarding to ``forward``) and, given
    ``open_forward``, a second one "open" no policy names."""
    port = free_port()
    listeners = inbound("inbound", port, forward)
    open_port = None
    if open_forward is not None:
        open_port = free_port()
        listeners += inbound("open", open_port, open_forward)
    text, ports = mesh.config({}, workers=1, listeners=listeners,
                              extra=identity_table(tmp_path / "id") + policies)
    return mesh.start(text, ports), port, open_port


def client_cert(folder: Path, spiffe_id: str) -> tuple[str, str]:
    """(certificate file, key file) of a peer with ``spiffe_id``, from the meshd's CA."""
    leaf = ca.issue(AUTHORITY, spiffe_id)
    folder.mkdir(parents=True, exist_ok=True)
    name = spiffe_id.rsplit("/", 1)[1]
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    key.chmod(0o600)
    return str(cert), str(key)


def curl_mtls(port: int, path: str, cert: tuple[str, str], *args: str) -> tuple[str, bytes]:
    """("STATUS HTTP-VERSION", body) of curl over TLS with a client certificate."""
    r = subprocess.run([require_tool("curl"), "-sS", "-k", "--max-time", "10",
                        "--cert", cert[0], "--key", cert[1], *args, "-H", "Host: app",
                        "-o", "-", "-w", "\n%{http_code} %{http_version}",
                        f"https://127.0.0.1:{port}{path}"], capture_output=True, timeout=30)
    body, _, tail = r.stdout.rpartition(b"\n")
    assert r.returncode == 0, r.stderr
    return tail.decode(), body


def denied(m: Meshd, mode: str, protocol: str, listener: str = "inbound") -> float:
    return m.metric("meshd_authz_denied_total",
                    f'listener="{listener}",mode="{mode}",protocol="{protocol}"')


def counts(b: Backend) -> dict[str, int]:
    return json.loads(http_get(b.host, b.port, "/_counts")[2])


def test_enforce_http1_answers_403_and_nothing_reaches_the_backend(mesh, backends, tmp_path):
    b = backends("app")
    m, port, open_port = start(mesh, tmp_path, b.address, policy("inbound"),
                               open_forward=b.address)
    status, headers, body = http_get("127.0.0.1", port, "/secret", {"Host": "app"})
    assert status == 403
    assert body == Forbidden.reason.encode() + b"\n"
    # a POST with a body: refused before the body is read, and the connection closed
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"POST /secret HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
        got = b""
        while data := s.recv(65536):
            got += data
    assert got.startswith(b"HTTP/1.1 403 ") and b"Connection: close" in got
    wait_for(lambda: denied(m, "enforce", "http") == 2, what="two refusals counted")
    assert counts(b) == {}
    assert "denied http from client_id=-" in m.log()
    assert "no verified client identity" in m.log()
    # a listener no policy names is open to the same peer
    status, _, body = http_get("127.0.0.1", open_port, "/open", {"Host": "app"})  # type: ignore[arg-type]
    assert (status, body) == (200, b"app /open\n")
    assert denied(m, "enforce", "http", "open") == 0
    assert counts(b) == {"GET /open": 1}


def test_enforce_http2_prior_knowledge(mesh, backends, tmp_path):
    curl = require_tool("curl")
    b = backends("app")
    m, port, _ = start(mesh, tmp_path, b.address, policy("inbound"))
    r = subprocess.run([curl, "-sS", "--http2-prior-knowledge", "-H", "Host: app",
                        "-o", "-", "-w", "\n%{http_code} %{http_version}",
                        f"http://127.0.0.1:{port}/h2"], capture_output=True, timeout=30)
    body, _, tail = r.stdout.rpartition(b"\n")
    assert tail == b"403 2", r
    assert body == Forbidden.reason.encode() + b"\n"
    wait_for(lambda: denied(m, "enforce", "http") == 1, what="the refusal counted")
    assert counts(b) == {}


SERVICE = "meshd.test.Echo"


class Recorder:
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
        return request


@pytest.fixture
def grpc_backend() -> Iterator[tuple[Recorder, int]]:
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(
        rec.unary, request_deserializer=None, response_serializer=None)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, port
    server.stop(0)


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_grpc(mesh, tmp_path, grpc_backend, mode):
    rec, backend_port = grpc_backend
    m, port, _ = start(mesh, tmp_path, f"127.0.0.1:{backend_port}", policy("inbound", mode))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary")
        if mode == "enforce":
            with pytest.raises(grpc.RpcError) as err:
                call(b"ping", timeout=15)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        else:
            assert call(b"ping", timeout=15) == b"ping"
    wait_for(lambda: denied(m, mode, "http") == 1, what="the refusal counted")
    assert rec.calls == (0 if mode == "enforce" else 1)


def test_enforce_tcp_closes_before_connecting(mesh, tmp_path):
    with TcpServer(echo) as app:
        m, port, _ = start(mesh, tmp_path, app.address, policy("inbound"))
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b"\x00\x01opaque bytes, not HTTP\r\n\r\n")
            got = b""
            try:
                while data := s.recv(65536):
                    got += data
            except ConnectionResetError:
                pass
        assert got == b""
        wait_for(lambda: denied(m, "enforce", "tcp") == 1, what="the refusal counted")
        assert app.accepted == 0
        assert "denied tcp from client_id=-" in m.log()


def test_audit_lets_http_and_tcp_through_counted_and_logged(mesh, backends, tmp_path):
    b = backends("app")
    m, port, _ = start(mesh, tmp_path, b.address, policy("inbound", "audit"))
    status, _, body = http_get("127.0.0.1", port, "/audited", {"Host": "app"})
    assert (status, body) == (200, b"app /audited\n")
    wait_for(lambda: denied(m, "audit", "http") == 1, what="the audit denial counted")
    assert denied(m, "enforce", "http") == 0
    assert "audit: would deny http from client_id=-" in m.log()
    with TcpServer(echo) as app:
        m2, port2, _ = start(mesh, tmp_path, app.address, policy("inbound", "audit"))
        with socket.create_connection(("127.0.0.1", port2), timeout=15) as s:
            s.sendall(b"\x00\x01opaque")
            got = b""
            while len(got) < 8 and (data := s.recv(65536)):
                got += data
        assert got == b"\x00\x01opaque"
        wait_for(lambda: denied(m2, "audit", "tcp") == 1, what="the audit denial counted")
        assert app.accepted == 1


def test_route_scoped_policies_only_default_deny_the_rest(mesh, backends, tmp_path):
    """A listener whose only policy is for one route: requests of that route are judged
    by it, every other request is denied by default (the log says which)."""
    b = backends("app")
    route = '\n[[route]]\nname = "admin"\nhost = "app"\npath_prefix = "/admin"\n'
    m, port, _ = start(mesh, tmp_path, b.address, route + policy("inbound", route="admin"))
    status, _, _ = http_get("127.0.0.1", port, "/admin/x", {"Host": "app"})
    assert status == 403  # the route's enforce policy
    status, _, _ = http_get("127.0.0.1", port, "/other", {"Host": "app"})
    assert status == 403  # no policy for this request: default deny
    wait_for(lambda: denied(m, "enforce", "http") == 2, what="both refusals counted")
    assert counts(b) == {}
    log = m.log()
    assert "route=admin: no verified client identity; route 'admin' allows" in log
    assert "client_id=-: no policy of listener 'inbound' covers this request" in log


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_mtls_peers_allowed_identity_passes_others_get_403(mesh, backends, tmp_path, version):
    """Peers with verified identities (mTLS to the inbound listener): the allowed one
    reaches the application, another one is refused before it."""
    b = backends("app")
    m, port, _ = start(mesh, tmp_path, b.address, policy("inbound"))
    web = client_cert(tmp_path / "peers", WEB)
    other = client_cert(tmp_path / "peers", f"spiffe://{TD}/ns/default/sa/other")
    http = "1.1" if version == "--http1.1" else "2"
    assert curl_mtls(port, "/allowed", web, version) == (f"200 {http}", b"app /allowed\n")
    status, body = curl_mtls(port, "/refused", other, version)
    assert (status, body) == (f"403 {http}", Forbidden.reason.encode() + b"\n")
    wait_for(lambda: denied(m, "enforce", "http") == 1, what="the refusal counted")
    assert counts(b) == {"GET /allowed": 1}
    assert f"denied http from client_id=spiffe://{TD}/ns/default/sa/other" in m.log()


def tls_opaque(port: int, cert: tuple[str, str], payload: bytes) -> bytes:
    """Opaque bytes over mTLS to the inbound listener; what came back until it closed
    (or as many bytes as were sent)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw, \
            ctx.wrap_socket(raw) as s:
        s.sendall(payload)
        got = b""
        try:
            while len(got) < len(payload) and (data := s.recv(65536)):
                got += data
        except (ConnectionResetError, ssl.SSLError):
            pass
        return got


def test_mtls_tcp_allowed_identity_tunnels_others_are_closed(mesh, tmp_path):
    with TcpServer(echo) as app:
        m, port, _ = start(mesh, tmp_path, app.address, policy("inbound"))
        web = client_cert(tmp_path / "peers", WEB)
        other = client_cert(tmp_path / "peers", f"spiffe://{TD}/ns/default/sa/other")
        payload = b"\x00\x01opaque bytes\r\n\r\n"
        assert tls_opaque(port, other, payload) == b""
        wait_for(lambda: denied(m, "enforce", "tcp") == 1, what="the refusal counted")
        assert app.accepted == 0
        assert tls_opaque(port, web, payload) == payload
        assert app.accepted == 1


INTENTIONS = '''
import json
import os

from meshd.identity.files import FilesProvider


class Intentions(FilesProvider):
    """The files provider, plus authorize() answering from a JSON file (Consul
    intentions' stand-in); each call is appended to a log file the test reads."""

    def __init__(self, options, settings):
        options = dict(options)
        self.answers_file = options.pop("answers_file")
        super().__init__(options, settings)

    def authorizes(self):
        return True

    def authorize(self, client_id):
        with open(self.answers_file + ".asked", "a") as f:
            f.write(client_id + "\\n")
        with open(self.answers_file) as f:
            answers = json.load(f)
        if client_id not in answers:
            raise ConnectionError("no answer for " + client_id)
        return answers[client_id]
'''


def test_provider_authorize_allows_and_denies_through_the_cache(mesh, backends, tmp_path):
    """An identity provider that authorizes (an installed plugin distribution of the
    test's own standing in for Consul intentions) is asked about each authenticated peer
    of an mTLS listener, no policy needed: its "no" is a 403 before the application, its
    answers are cached, a provider that cannot tell refuses (fail closed), and plaintext
    peers of the permissive listener are not subject to it."""
    root = tmp_path / "plugin"
    root.mkdir()
    (root / "authz_intentions.py").write_text(INTENTIONS)
    info = root / "authz_intentions-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: authz-intentions\n"
                                   "Version: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        "[meshd.identity]\nintentions = authz_intentions:Intentions\n")
    answers = tmp_path / "answers.json"
    other_id = f"spiffe://{TD}/ns/default/sa/other"
    answers.write_text(json.dumps({WEB: True, other_id: False}))
    b = backends("app")
    port = free_port()
    ident = identity_table(tmp_path / "id").replace(
        'provider = "files"', f'provider = "intentions"\nanswers_file = "{answers}"')
    text, ports = mesh.config({}, workers=1, listeners=inbound("inbound", port, b.address),
                              extra=ident)
    m = mesh.start(text, ports, env={**os.environ, "PYTHONPATH": str(root)})
    web = client_cert(tmp_path / "peers", WEB)
    other = client_cert(tmp_path / "peers", other_id)
    unknown_id = f"spiffe://{TD}/ns/default/sa/unknown"
    unknown = client_cert(tmp_path / "peers", unknown_id)
    for _ in range(3):
        assert curl_mtls(port, "/allowed", web, "--http1.1") == ("200 1.1", b"app /allowed\n")
    assert curl_mtls(port, "/refused", other, "--http2")[0] == "403 2"
    assert curl_mtls(port, "/unknown", unknown, "--http1.1")[0] == "403 1.1"
    assert http_get("127.0.0.1", port, "/plain", {"Host": "app"})[0] == 200
    wait_for(lambda: denied(m, "enforce", "http") == 2, what="two refusals counted")
    assert counts(b) == {"GET /allowed": 3, "GET /plain": 1}
    asked = Path(f"{answers}.asked").read_text().splitlines()
    assert sorted(asked) == sorted([WEB, other_id, unknown_id])  # once each: cached
    log = m.log()
    assert "the identity provider denies it (intentions)" in log
    assert "could not authorize client_id=spiffe://cluster.local/ns/default/sa/unknown: " \
           "ConnectionError" in log


def test_mtls_route_scoping(mesh, backends, tmp_path):
    """Route "admin" is for one identity, the rest of the listener for another: each
    identity reaches its own part only."""
    b = backends("app")
    admin_id = f"spiffe://{TD}/ns/ops/sa/admin"
    route = ('\n[[route]]\nname = "admin"\nhost = "app"\npath_prefix = "/admin"\n'
             'methods = ["POST", "GET"]\n')
    policies = (route + policy("inbound")
                + f'\n[[authorization]]\nlistener = "inbound"\nroute = "admin"\n'
                  f'allow = ["spiffe://{TD}/ns/ops/sa/*"]\n')
    m, port, _ = start(mesh, tmp_path, b.address, policies)
    web = client_cert(tmp_path / "peers", WEB)
    admin = client_cert(tmp_path / "peers", admin_id)
    assert curl_mtls(port, "/admin/users", admin, "--http2")[0] == "200 2"
    assert curl_mtls(port, "/admin/users", web, "--http2")[0] == "403 2"
    assert curl_mtls(port, "/home", web, "--http1.1")[0] == "200 1.1"
    assert curl_mtls(port, "/home", admin, "--http1.1")[0] == "403 1.1"
    # a method the route does not list: not the route's request, the listener's policy
    assert curl_mtls(port, "/admin/users", web, "--http1.1", "-X", "DELETE")[0] == "200 1.1"
    wait_for(lambda: denied(m, "enforce", "http") == 2, what="both refusals counted")
    assert counts(b) == {"GET /admin/users": 1, "GET /home": 1, "DELETE /admin/users": 1}
