"""TLS on listeners and mTLS between meshds, through real meshd processes: real
certificates (``meshd.identity.ca`` for SPIFFE identities, ``meshd.testing.certs`` for an
ordinary server certificate), curl and sslscan as clients, Python's ssl for handshakes
that must fail. Each refused case is proven by its counter
(``meshd_tls_handshake_total``) and its log line."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MeshFactory

from meshd.identity import ca
from meshd.testing.certs import TestCA
from meshd.testing.harness import Meshd, free_port, wait_for
from meshd.testing.identity_files import TD, expired, files, identity_toml, replace_files
from meshd.testing.tcp_server import TcpServer, echo

WEB = f"spiffe://{TD}/ns/default/sa/web"         # the server meshd (B) in front of the app
CLIENT = f"spiffe://{TD}/ns/default/sa/client"   # the client meshd (A)
OTHER = f"spiffe://{TD}/ns/default/sa/other"     # an identity discovery does not give

TLS_LISTENER = """
[[listener]]
name = "edge"
listen = "127.0.0.1:{port}"
direction = "inbound"
protocol = "auto"
forward = "{app}"
[listener.tls]
cert_file = "{cert}"
key_file = "{key}"
"""


def _handshakes(m: Meshd, listener: str, result: str, direction: str = "inbound") -> float:
    return m.metric("meshd_tls_handshake_total",
                    f'listener="{listener}",direction="{direction}",result="{result}"')


def _wait_handshakes(m: Meshd, listener: str, result: str, at_least: float = 1,
                     direction: str = "inbound") -> float:
    return m.wait_metric("meshd_tls_handshake_total",
                         f'listener="{listener}",direction="{direction}",result="{result}"',
                         at_least)


def _log_line(m: Meshd, *needles: str) -> str:
    """The first line of ``m``'s log holding all ``needles`` (waited for)."""
    found: list[str] = []

    def seen() -> bool:
        for line in m.log_path.read_text(errors="replace").splitlines():
            if all(n in line for n in needles):
                found.append(line)
                return True
        return False
    wait_for(seen, 20, what=f"a log line with {needles}")
    return found[0]


def _curl(*args: str) -> tuple[str, str]:
    """(what -w printed, the body) of a curl that must succeed."""
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "-", *args],
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode(errors="replace")
    body, _, written = text.rpartition("\n@@")
    return written, body


# -- [listener.tls]: TLS from ordinary clients ---------------------------------------------

def _tls_listener(mesh: MeshFactory, tmp_path: Path, app: str) -> tuple[Meshd, int, TestCA]:
    ca = TestCA.create(tmp_path / "pki", "edge-ca")
    server = ca.issue("edge", dns=["edge.test"], ips=["127.0.0.1"])
    port = free_port()
    text, ports = mesh.config({}, workers=1, listeners=TLS_LISTENER.format(
        port=port, app=app, cert=server.cert, key=server.key))
    ports["edge"] = port
    return mesh.start(text, ports), port, ca


def test_listener_tls_serves_curl_over_h2_and_http1_and_plaintext_too(mesh, backends, tmp_path):
    app = backends("app")
    m, port, ca = _tls_listener(mesh, tmp_path, app.address)
    url = f"https://127.0.0.1:{port}/hello"
    # ALPN h2: curl speaks HTTP/2 over TLS
    written, body = _curl("--cacert", ca.cert_file, "--http2", "-w", "\n@@%{http_version}", url)
    assert (written, body) == ("2", "app /hello\n")
    # ALPN http/1.1
    written, body = _curl("--cacert", ca.cert_file, "--http1.1", "-w", "\n@@%{http_version}", url)
    assert (written, body) == ("1.1", "app /hello\n")
    # a POST body crosses the TLS layer both ways, large enough for several records
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 300_000)
    written, body = _curl("--cacert", ca.cert_file, "--http2", "--data-binary", f"@{payload}",
                          "-w", "\n@@%{http_version}", f"https://127.0.0.1:{port}/echo")
    assert written == "2" and body == "x" * 300_000
    assert _wait_handshakes(m, "edge", "ok", 3) == 3
    # plaintext is still served on a [listener.tls] listener, and counted
    written, body = _curl("-w", "\n@@%{http_version}", f"http://127.0.0.1:{port}/plain")
    assert (written, body) == ("1.1", "app /plain\n")
    assert _wait_handshakes(m, "edge", "plaintext_permitted") == 1


def test_listener_tls_refuses_what_is_not_tls_after_a_clienthello(mesh, backends, tmp_path):
    """A client that does not trust the certificate: the handshake fails on both ends;
    meshd counts it as an error and logs the reason, without the key."""
    m, port, ca = _tls_listener(mesh, tmp_path, backends("app").address)
    context = ssl.create_default_context()  # the system's roots: not the test CA
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            context.wrap_socket(raw, server_hostname="127.0.0.1")
            raise AssertionError("the handshake succeeded without trusting the CA")
        except ssl.SSLCertVerificationError:
            pass
    assert _wait_handshakes(m, "edge", "error") == 1
    line = _log_line(m, "edge: TLS handshake from", "refused (error)")
    assert "PRIVATE KEY" not in m.log_path.read_text()
    assert "127.0.0.1" in line


# -- mTLS between two meshds ----------------------------------------------------------------

INBOUND = """
[[listener]]
name = "inbound"
listen = "127.0.0.1:{port}"
direction = "inbound"
protocol = "auto"
forward = "{forward}"
mtls = "{mode}"
tunnel_ports = [{tunnel_ports}]
"""


@dataclass
class Pair:
    a: Meshd          # the client's meshd: outbound listener, discovery says web is meshed
    b: Meshd          # the server's meshd: the inbound listener in front of the app
    inbound_port: int
    folder_a: Path    # the files provider's folders (replace files there to rotate)
    folder_b: Path


@pytest.fixture(scope="module")
def authority() -> ca.Issued:
    return ca.new_ca(TD)


def _material(folder: Path, authority: ca.Issued, spiffe_id: str,
              roots: bytes | None = None) -> ca.Issued:
    issued = ca.issue(authority, spiffe_id)
    replace_files(folder, files(issued.cert_pem, issued.key_pem, roots or authority.cert_pem))
    return issued


def _pair(mesh: MeshFactory, tmp_path: Path, app: str, authority: ca.Issued, *,
          mode: str = "strict", expect: str = WEB, b_id: str = WEB,
          b_authority: ca.Issued | None = None, tunnel_ports: tuple[int, ...] = (),
          forward: str | None = None, listeners_a: str = "", service: str = "web",
          workers: int = 1) -> Pair:
    """meshd A (client side) -> meshd B (inbound, ``mode``) -> ``app``; A's discovery says
    ``service`` is meshed behind B and must present ``expect``; B presents ``b_id``
    issued by ``b_authority`` (the shared CA unless given)."""
    folder_a, folder_b = tmp_path / "id-a", tmp_path / "id-b"
    _material(folder_a, authority, CLIENT)
    b_ca = b_authority or authority
    _material(folder_b, b_ca, b_id, roots=authority.cert_pem + (
        b_ca.cert_pem if b_ca is not authority else b""))
    inbound_port = free_port()
    text_b, ports_b = mesh.config({}, workers=workers, listeners=INBOUND.format(
        port=inbound_port, forward=forward or app, mode=mode,
        tunnel_ports=", ".join(map(str, tunnel_ports))), extra=identity_toml(folder_b))
    ports_b["inbound"] = inbound_port
    b = mesh.start(text_b, ports_b)
    meshed = (f'{{ address = "{app}", meshed = true, inbound_port = {inbound_port}, '
              f'identity = "{expect}" }}')
    text_a, ports_a = mesh.config({}, workers=workers, listeners=listeners_a,
                                  extra=identity_toml(folder_a))
    text_a = text_a.replace("[discovery.services]\n",
                            f"[discovery.services]\n{service} = [{meshed}]\n")
    a = mesh.start(text_a, ports_a)
    return Pair(a, b, inbound_port, folder_a, folder_b)


def _get(m: Meshd, path: str = "/hello", host: str = "web") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", m.ports["outbound"], timeout=15)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _client_context(authority: ca.Issued, tmp_path: Path,
                    issued: ca.Issued | None = None) -> ssl.SSLContext:
    """A Python client as a peer meshd would be: TLS 1.3, ALPN h2, the roots, and the
    given certificate (none: no client certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cadata=authority.cert_pem.decode())
    context.set_alpn_protocols(["h2"])
    if issued is not None:
        pem = tmp_path / f"client-{id(issued)}.pem"
        pem.write_bytes(issued.cert_pem + issued.key_pem)
        context.load_cert_chain(str(pem))
    return context


def _tls_exchange(port: int, context: ssl.SSLContext, data: bytes, enough: int = 0) -> bytes:
    """Handshake, send ``data``, read until the server closes or ``enough`` bytes came
    (b"" when it refused us: in TLS 1.3 the server rejects a client certificate after
    the client's side of the handshake is done)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(data)
                while (not enough or len(got) < enough) and (chunk := tls.recv(65536)):
                    got += chunk
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass
    return got


def test_two_meshds_over_mtls(mesh, backends, tmp_path, authority):
    app = backends("app")
    p = _pair(mesh, tmp_path, app.address, authority)
    # HTTP/1.1 client -> A -> mTLS (h2) -> B -> app
    assert _get(p.a) == (200, b"app /hello\n")
    # an HTTP/2 client too, over the same mTLS connection
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge",
                          "-H", "Host: web", f"http://127.0.0.1:{p.a.ports['outbound']}/h2"],
                         capture_output=True, timeout=20)
    assert out.stdout == b"app /h2\n", out.stderr
    # one handshake each side, verified both ways; B took A's certificate (its client_id)
    assert _wait_handshakes(p.a, "outbound", "ok", direction="outbound") == 1
    assert _wait_handshakes(p.b, "inbound", "ok") == 1
    for result in ("verify_failed", "bad_san", "error", "no_client_cert", "plaintext_refused"):
        assert _handshakes(p.b, "inbound", result) == 0
    # plaintext to the strict port is refused: closed without a byte, counted, logged
    with socket.create_connection(("127.0.0.1", p.inbound_port), timeout=10) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: web\r\n\r\n")
        assert s.recv(65536) == b""
    assert _wait_handshakes(p.b, "inbound", "plaintext_refused") == 1
    _log_line(p.b, "inbound: refused a plaintext connection from 127.0.0.1:",
              'mtls = "strict"')


def test_an_unexpected_server_identity_is_a_connect_failure(mesh, backends, tmp_path,
                                                            authority):
    """Discovery says the endpoint is web; B presents other: A refuses the connection
    (no plaintext fallback), counts it and names both identities."""
    app = backends("app")
    p = _pair(mesh, tmp_path, app.address, authority, b_id=OTHER)
    status, body = _get(p.a)
    assert status == 502, body
    assert _wait_handshakes(p.a, "outbound", "bad_san", direction="outbound") >= 1
    line = _log_line(p.a, "mTLS to 127.0.0.1:", "(bad_san)")
    assert f"expected identity {WEB}, the server presented {OTHER}" in line
    assert _handshakes(p.a, "outbound", "ok", direction="outbound") == 0


def test_a_server_certificate_of_another_ca_fails_verification(mesh, backends, tmp_path,
                                                               authority):
    app = backends("app")
    stranger = ca.new_ca(TD)
    p = _pair(mesh, tmp_path, app.address, authority, b_authority=stranger)
    status, _ = _get(p.a)
    assert status == 502
    assert _wait_handshakes(p.a, "outbound", "verify_failed", direction="outbound") >= 1
    line = _log_line(p.a, "mTLS to 127.0.0.1:", "(verify_failed)")
    # (B sends its chain up to its own root: OpenSSL names that root as the culprit)
    assert "certificate verify failed: self-signed certificate in certificate chain" in line


def test_client_certificates_a_strict_listener_refuses(mesh, backends, tmp_path, authority):
    """Each refused with its counter and log line on the inbound side: a client
    certificate of another CA, an expired one, none at all."""
    app = backends("app")
    p = _pair(mesh, tmp_path, app.address, authority)
    request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    stranger = ca.new_ca(TD)
    cases = [
        ("verify_failed", ca.issue(stranger, CLIENT),
         "certificate verify failed: unable to get local issuer certificate"),
        ("verify_failed", expired(authority, CLIENT),
         "certificate verify failed: certificate has expired"),
        ("no_client_cert", None, "peer did not return a certificate"),
    ]
    for result, issued, reason in cases:
        before = _handshakes(p.b, "inbound", result)
        assert _tls_exchange(p.inbound_port, _client_context(authority, tmp_path, issued),
                             request) == b""
        _wait_handshakes(p.b, "inbound", result, before + 1)
        _log_line(p.b, "inbound: TLS handshake from 127.0.0.1:", f"refused ({result})", reason)
    assert _handshakes(p.b, "inbound", "ok") == 0
    # a good certificate gets the HTTP/2 server's SETTINGS
    good = _material(tmp_path / "good", authority, CLIENT)
    empty_settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    assert _tls_exchange(p.inbound_port, _client_context(authority, tmp_path, good),
                         request + empty_settings, enough=9)[3:4] == b"\x04"  # SETTINGS
    _wait_handshakes(p.b, "inbound", "ok")
    assert "PRIVATE KEY" not in p.b.log()


def test_permissive_serves_and_counts_plaintext_and_tunnels_need_an_authenticated_peer(
        mesh, backends, tmp_path, authority):
    app = backends("app")
    with TcpServer(echo) as db:
        tcp_port = free_port()
        tcp = (f'\n[[listener]]\nname = "db"\nlisten = "127.0.0.1:{tcp_port}"\n'
               f'protocol = "tcp"\nservice = "db"\n')
        p = _pair(mesh, tmp_path, db.address, authority, mode="permissive",
                  tunnel_ports=(db.port,), forward=app.address, listeners_a=tcp,
                  service="db")
        # plaintext HTTP to the permissive inbound port: served, counted
        with socket.create_connection(("127.0.0.1", p.inbound_port), timeout=10) as s:
            s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"app /plain\n")
        assert _wait_handshakes(p.b, "inbound", "plaintext_permitted") == 1
        # a plaintext MESHD-TUNNEL is refused once [identity] is set (not authenticated)
        with socket.create_connection(("127.0.0.1", p.inbound_port), timeout=10) as s:
            s.sendall(f"MESHD-TUNNEL {db.port}\r\nhello".encode())
            assert s.recv(65536) == b""
        p.b.wait_metric("meshd_protocol_detect_total",
                        'listener="inbound",result="tunnel_refused"')
        _log_line(p.b, "refused a meshd tunnel from", "the peer is not authenticated")
        # through A, the tunnel rides mTLS and is honoured
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as s:
            payload = b"SELECT 1;" + bytes(range(256)) * 100
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(65536)
                assert chunk, got[:100]
                got += chunk
        assert got == payload
        assert p.b.metric("meshd_protocol_detect_total",
                          'listener="inbound",result="tunnel"') == 1
        assert _wait_handshakes(p.a, "db", "ok", direction="outbound") == 1
