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
import threading
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest
from conftest import MeshFactory

from meshd.identity import ca
from meshd.testing.certs import TestCA
from meshd.testing.harness import Meshd, free_port, require_tool, wait_for
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


def test_listener_tls_on_an_outbound_http_listener(mesh, backends, tmp_path):
    """An application speaks HTTPS to its outbound listener: Host routes as before."""
    app = backends("app")
    ca_ = TestCA.create(tmp_path / "pki", "out-ca")
    server = ca_.issue("out", ips=["127.0.0.1"])
    port = free_port()
    listener = (f'\n[[listener]]\nname = "secure-out"\nlisten = "127.0.0.1:{port}"\n'
                f'direction = "outbound"\nprotocol = "http"\n[listener.tls]\n'
                f'cert_file = "{server.cert}"\nkey_file = "{server.key}"\n')
    text, ports = mesh.config({"web": [app.address]}, workers=1, listeners=listener)
    m = mesh.start(text, ports)
    for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
        written, body = _curl("--cacert", ca_.cert_file, flag, "-H", "Host: web",
                              "-w", "\n@@%{http_version}", f"https://127.0.0.1:{port}/out")
        assert (written, body) == (version, "app /out\n")
    assert _wait_handshakes(m, "secure-out", "ok", 2) == 2


def test_an_h2_client_over_tls_that_stops_reading_is_dropped(mesh, backends, tmp_path):
    """HTTP/2 over a terminated TLS connection writes through the TLS socket; a client
    that accepts no byte for write_timeout is dropped there too."""
    import h2.config
    import h2.connection
    import h2.settings

    app = backends("big")
    ca_ = TestCA.create(tmp_path / "pki", "edge-ca")
    server = ca_.issue("edge", ips=["127.0.0.1"])
    port = free_port()
    text, ports = mesh.config({}, workers=1, listeners=TLS_LISTENER.format(
        port=port, app=app.address, cert=server.cert, key=server.key),
        extra='[limits]\nwrite_timeout = "1s"\n')
    m = mesh.start(text, ports)
    context = ssl.create_default_context(cafile=ca_.cert_file)
    context.set_alpn_protocols(["h2"])
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        conn.initiate_connection()
        conn.increment_flow_control_window(2**31 - 1 - 65535)
        big = 200_000_000
        conn.send_headers(1, [(":method", "GET"), (":path", f"/bytes?n={big}&cl=1"),
                              (":scheme", "https"), (":authority", "web")], end_stream=True)
        tls.sendall(conn.data_to_send())
        _log_line(m, "edge: dropped an HTTP/2 client that accepted no bytes for 1s")
        got = 0
        try:
            while chunk := tls.recv(1 << 20):
                got += len(chunk)
        except (ssl.SSLError, ConnectionResetError):
            pass
        assert got < big  # dropped, not served from memory


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
          workers: int = 1, extra_b: str = "") -> Pair:
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
        tunnel_ports=", ".join(map(str, tunnel_ports))),
        extra=identity_toml(folder_b) + extra_b)
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
    """A Python client as a peer meshd would be: TLS 1.3, ALPN h2 and meshd's marker, the
    roots, and the given certificate (none: no client certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cadata=authority.cert_pem.decode())
    context.set_alpn_protocols(["h2", "meshd"])
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


def test_rotation_under_keep_alive_load_fails_no_request(mesh, backends, tmp_path, authority):
    """Both meshds' files are replaced (new leaves, new keys) while HTTP/1.1 keep-alive
    and HTTP/2 clients keep sending through A: no request fails, established connections
    keep their context, and a new handshake after the rotation gets the new certificate."""
    app = backends("app")
    p = _pair(mesh, tmp_path, app.address, authority, workers=2)
    port = p.a.ports["outbound"]
    done = threading.Event()
    results: list[int] = []

    def http1_loop() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            for i in range(20_000):  # bounded; the test stops it much sooner
                if done.is_set():
                    return
                try:
                    conn.request("GET", f"/r{i}", headers={"Host": "web"})
                    resp = conn.getresponse()
                    resp.read()
                    results.append(resp.status)
                except (OSError, http.client.HTTPException):
                    results.append(-1)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        finally:
            conn.close()

    loops = [threading.Thread(target=http1_loop) for _ in range(2)]
    for t in loops:
        t.start()
    h2 = subprocess.Popen(["h2load", "-D", "8", "-c", "2", "-m", "4", "-H", ":authority: web",
                           f"http://127.0.0.1:{port}/h2"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(results) >= 100, 30, what="load before the rotation")
        for m in (p.a, p.b):
            assert m.metric("meshd_identity_published_total") == 1
        new_b = _material(p.folder_b, authority, WEB)
        _material(p.folder_a, authority, CLIENT)
        for m in (p.a, p.b):
            m.wait_metric("meshd_identity_published_total", at_least=2)
        # a new handshake with B presents the new certificate (workers reload within 0.5 s)
        new_cert = ssl.PEM_cert_to_DER_cert(new_b.cert_pem.decode())
        good = _material(tmp_path / "probe", authority, CLIENT)

        def presents_new() -> bool:
            with socket.create_connection(("127.0.0.1", p.inbound_port), timeout=10) as raw, \
                    _client_context(authority, tmp_path, good).wrap_socket(raw) as tls:
                return tls.getpeercert(binary_form=True) == new_cert
        wait_for(presents_new, 20, what="B's new certificate on new connections")
        count = len(results)
        wait_for(lambda: len(results) >= count + 100, 30, what="load after the rotation")
    finally:
        done.set()
        for t in loops:
            t.join(30)
        out, _ = h2.communicate(timeout=60)
    report = out.decode(errors="replace")
    assert results and set(results) == {200}, [r for r in results if r != 200][:5]
    line = next(x for x in report.splitlines() if x.startswith("requests:"))
    total = int(line.split()[1])
    assert total > 0 and ", 0 failed, 0 errored" in line, report
    # the rotation was under way while requests flowed on the connections made before it
    assert _handshakes(p.b, "inbound", "ok") >= 1


SCANNED = """
[[listener]]
name = "strict"
listen = "127.0.0.1:{strict}"
direction = "inbound"
protocol = "auto"
forward = "{app}"
mtls = "strict"

[[listener]]
name = "permissive"
listen = "127.0.0.1:{permissive}"
direction = "inbound"
protocol = "auto"
forward = "{app}"
mtls = "permissive"
"""


def test_sslscan_finds_only_tls12_and_up_and_no_weak_cipher(mesh, backends, tmp_path,
                                                            authority):
    require_tool("sslscan")  # make test installs it (scripts/ensure-tools.sh)
    app = backends("app")
    folder = tmp_path / "id"
    _material(folder, authority, WEB)
    strict, permissive = free_port(), free_port()
    text, ports = mesh.config({}, workers=1, extra=identity_toml(folder), listeners=SCANNED.format(
        strict=strict, permissive=permissive, app=app.address))
    m = mesh.start(text, ports)
    for port in (strict, permissive):
        xml = tmp_path / f"scan-{port}.xml"
        # SIGPIPE stays ignored (as in this process): meshd closes the SSLv2 probe (not
        # a TLS record) at once, and sslscan's write to it must fail, not kill it
        out = subprocess.run(["sslscan", "--no-colour", f"--xml={xml}", f"127.0.0.1:{port}"],
                             capture_output=True, timeout=300, restore_signals=False)
        assert out.returncode == 0, out.stderr.decode()
        root = ElementTree.parse(xml).getroot()
        protocols = {f"{e.get('type')}{e.get('version')}": e.get("enabled")
                     for e in root.iter("protocol")}
        assert protocols == {"ssl2": "0", "ssl3": "0", "tls1.0": "0", "tls1.1": "0",
                             "tls1.2": "1", "tls1.3": "1"}, protocols
        ciphers = [(e.get("sslversion"), e.get("cipher") or "", e.get("strength"))
                   for e in root.iter("cipher")]
        assert ciphers, out.stdout.decode()
        for version, name, strength in ciphers:
            assert version in ("TLSv1.2", "TLSv1.3"), (version, name)
            for weak in ("RC4", "DES", "NULL", "EXP", "MD5", "CBC", "anon", "PSK"):
                assert weak not in name, (version, name)
            if version == "TLSv1.2":  # forward secret AEAD only (no SHA-1 MAC suites)
                assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name), name
            assert strength in ("strong", "acceptable"), (name, strength)
    # the permissive port shows its TLS 1.2 suites (the strict one needs a client
    # certificate before a TLS 1.2 handshake gets that far)
    assert any(v == "TLSv1.2" for v, _, _ in ciphers)
    assert m.metric("meshd_tls_handshake_total", 'listener="strict"') > 0


def test_plaintext_and_mtls_connections_to_one_peer_are_never_shared(mesh, backends, tmp_path,
                                                                     authority):
    """Two services meshed behind the same permissive inbound port, one with an identity
    and one without (a migration under way): each gets its own HTTP/2 connection, the
    plaintext one is never reused for the endpoint that must be mTLS (pool keys hold the
    TLS identity)."""
    app = backends("app")
    p = _pair(mesh, tmp_path, app.address, authority, mode="permissive", service="secure")
    text = p.a.config_path.read_text()
    plain = f'plain = [{{ address = "{app.address}", meshed = true, inbound_port = {p.inbound_port} }}]\n'
    assert "secure = [" in text
    text = text.replace("secure = [", plain + "secure = [", 1)
    p.a.stop()
    a = mesh.start(text, p.a.ports)
    assert _get(a, "/one", host="plain") == (200, b"app /one\n")
    assert _wait_handshakes(p.b, "inbound", "plaintext_permitted") == 1
    assert _get(a, "/two", host="secure") == (200, b"app /two\n")
    assert _wait_handshakes(p.b, "inbound", "ok") == 1
    assert _wait_handshakes(a, "outbound", "ok", direction="outbound") == 1
    for i in range(5):  # each on its own pooled connection from now on
        assert _get(a, f"/p{i}", host="plain")[0] == 200
        assert _get(a, f"/s{i}", host="secure")[0] == 200
    assert _handshakes(p.b, "inbound", "ok") == 1
    assert _handshakes(p.b, "inbound", "plaintext_permitted") == 1


def test_a_handshake_that_stalls_is_cut_at_header_read_timeout(mesh, backends, tmp_path,
                                                               authority):
    app = backends("app")
    p = _pair(mesh, tmp_path, app.address, authority,
              extra_b='[limits]\nheader_read_timeout = "1s"\n')
    with socket.create_connection(("127.0.0.1", p.inbound_port), timeout=20) as s:
        s.sendall(b"\x16\x03\x01")  # a TLS record begins, and nothing more comes
        assert s.recv(65536) == b""  # closed by meshd
    assert _wait_handshakes(p.b, "inbound", "timeout") == 1
    _log_line(p.b, "inbound: TLS handshake from 127.0.0.1:", "refused (timeout): not done "
              "within 1s (header_read_timeout)")
