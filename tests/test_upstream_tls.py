"""TLS toward upstreams (``[service.NAME.tls]``) through a real meshd: real certificates
(``meshd.testing.certs``), an HTTPS HTTP/1.1 backend (gevent.pywsgi, ALPN http/1.1),
nginx serving HTTP/2 over TLS (ALPN h2), and grpcio with TLS credentials. Clients are
http.client, curl (HTTP/1.1 and --http2-prior-knowledge) and grpcio."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from meshd.config import parse
from meshd.errors import ConfigError
from meshd.testing.certs import Issued, TestCA
from meshd.testing.harness import (
    free_port,
    http_get,
    port_open,
    read_head,
    terminate,
    wait_for,
)
from meshd.testing.nginx import NGINX, Nginx
from meshd.testing.tcp_server import TcpServer


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, object]:
    ca = TestCA.create(tmp_path / "pki", "ca")
    other = TestCA.create(tmp_path / "pki", "other-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", dns=["web.test"], ips=["127.0.0.1"]),
        "stranger": other.issue("stranger", dns=["web.test"], ips=["127.0.0.1"]),
        "client": ca.issue("client", client=True),
        "other": other,
    }


def tls_table(service: str, **keys: object) -> str:
    lines = [f"[service.{service}.tls]"]
    for k, v in keys.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def curl(*args: str, timeout: float = 10) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) from curl with -si."""
    out = subprocess.run(["curl", "-si", "--max-time", str(timeout), *args],
                         capture_output=True, timeout=timeout + 5)
    text = out.stdout.decode(errors="replace")
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    assert lines, f"curl failed: {out.stderr.decode()}"
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


# -- nginx over TLS with ALPN h2 -------------------------------------------------------------

H2_LOCATION = """add_header x-proto $server_protocol always;
return 200 "proto=$server_protocol scheme=$scheme host=$host\\n";"""


def nginx_h2_server(workdir: Path, issued: Issued, port: int | None = None) -> Nginx:
    """nginx serving HTTPS with HTTP/2 (ALPN h2), answering its $server_protocol."""
    return Nginx(workdir, "ssl http2", H2_LOCATION, port=port,
                 server_lines=f"ssl_certificate {issued.cert};\n"
                              f"ssl_certificate_key {issued.key};")


@pytest.fixture
def nginx_h2(tmp_path: Path, pki: dict[str, object]) -> Iterator[Nginx]:
    # `make test` installs nginx (scripts/ensure-tools.sh); missing, the test fails
    server = nginx_h2_server(tmp_path, pki["server"]).start()  # type: ignore[arg-type]
    yield server
    server.stop()


# -- HTTP/1.1 over TLS -----------------------------------------------------------------------

def test_http1_client_to_a_tls_http1_upstream(mesh, backends, pki):
    ca, server = pki["ca"], pki["server"]
    b = backends("secure", tls=(server.cert, server.key))
    m = mesh.run({"web": [b.address]}, extra=tls_table("web", ca_file=ca.cert_file))
    port = m.ports["outbound"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        seen = []
        for method, path, body in [("GET", "/proto", None), ("POST", "/proto", b"x" * 10),
                                   ("GET", "/proto", None)]:
            conn.request(method, path, body=body, headers={"Host": "web"})
            resp = conn.getresponse()
            text = resp.read().decode()
            assert resp.status == 200, text
            proto, scheme, client_port = text.split()
            assert (proto, scheme) == ("HTTP/1.1", "https")
            seen.append(client_port)
        # one pooled TLS connection served all three (the POST checked it was still open,
        # past the TLS 1.3 session tickets the server sent after the handshake)
        assert len(set(seen)) == 1, seen
        # request bodies over TLS: Content-Length, chunked, and one larger than a TLS record
        big = bytes(range(256)) * 1024
        conn.request("POST", "/echo", body=big, headers={"Host": "web"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == big
        conn.request("POST", "/echo", body=iter([b"ab", b"cd" * 5000]),
                     headers={"Host": "web"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"ab" + b"cd" * 5000
        conn.request("GET", "/bytes?n=300000", headers={"Host": "web"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"x" * 300000
    finally:
        conn.close()


def test_http2_client_to_a_tls_http1_upstream(mesh, backends, pki):
    ca, server = pki["ca"], pki["server"]
    b = backends("secure", tls=(server.cert, server.key))
    m = mesh.run({"web": [b.address]}, extra=tls_table("web", ca_file=ca.cert_file))
    url = f"http://127.0.0.1:{m.ports['outbound']}"
    status, _, body = curl("--http2-prior-knowledge", "-H", "Host: web", url + "/proto")
    assert status == 200 and body.split()[:2] == ["HTTP/1.1", "https"]
    status, _, body = curl("--http2-prior-knowledge", "-H", "Host: web",
                           "--data-binary", "hello over tls", url + "/echo")
    assert status == 200 and body == "hello over tls"


# -- ALPN h2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["http1", "h2"])
def test_the_first_request_learns_alpn_h2(mesh, pki, nginx_h2, first):
    """One worker: the first request's new TLS connection (from the HTTP/1.1 pool)
    selects h2 and moves to the HTTP/2 pool, for an HTTP/1.1 client and an HTTP/2 one."""
    m = mesh.run({"web": [f"127.0.0.1:{nginx_h2.port}"]}, workers=1,
                 extra=tls_table("web", ca_file=pki["ca"].cert_file))
    url = f"http://127.0.0.1:{m.ports['outbound']}/"
    args = ["--http2-prior-knowledge"] if first == "h2" else []
    for _ in range(3):
        status, headers, body = curl(*args, "-H", "Host: web", url)
        assert status == 200, body
        assert body.startswith("proto=HTTP/2.0 scheme=https host=web")


def test_clients_reach_an_upstream_that_selects_h2(mesh, pki, nginx_h2):
    ca = pki["ca"]
    m = mesh.run({"web": [f"127.0.0.1:{nginx_h2.port}"]},
                 extra=tls_table("web", ca_file=ca.cert_file))
    port = m.ports["outbound"]
    for _ in range(3):  # the first learns ALPN h2 (its connection moves to the h2 pool)
        status, headers, body = http_get("127.0.0.1", port, "/", {"Host": "web"})
        assert status == 200, body
        assert body.decode().startswith("proto=HTTP/2.0 scheme=https host=web")
        assert headers["x-proto"] == "HTTP/2.0"
    url = f"http://127.0.0.1:{port}/"
    for _ in range(2):
        status, headers, body = curl("--http2-prior-knowledge", "-H", "Host: web", url)
        assert status == 200, body
        assert body.startswith("proto=HTTP/2.0 ")
        status, headers, body = curl("-H", "Host: web", url)  # HTTP/1.1 client via curl
        assert status == 200 and body.startswith("proto=HTTP/2.0 ")


def test_a_new_connection_refreshes_what_alpn_selected(mesh, backends, pki, tmp_path):
    """The endpoint's server changes on the same port: HTTPS HTTP/1.1, then nginx with
    h2, then HTTP/1.1 again. Requests follow, without an error reaching the client."""
    assert NGINX is not None, "nginx is not installed (make test installs nginx-light)"
    ca, server = pki["ca"], pki["server"]
    port = free_port()
    m = mesh.run({"web": [f"127.0.0.1:{port}"]}, workers=1,
                 extra="[service.web]\nretries = 2\n" + tls_table("web", ca_file=ca.cert_file))
    out = m.ports["outbound"]

    def proto() -> str:
        status, headers, body = http_get("127.0.0.1", out, "/proto", {"Host": "web"})
        assert status == 200, headers.get("meshd-error")
        return body.decode().split()[0].removeprefix("proto=")

    b = backends("secure", port=port, tls=(server.cert, server.key))
    assert proto() == "HTTP/1.1"
    b.stop()
    nginx = nginx_h2_server(tmp_path, server, port).start()
    try:
        assert proto() == "HTTP/2.0"  # the pooled HTTP/1.1 connection is gone; the new one says h2
        assert proto() == "HTTP/2.0"
    finally:
        nginx.stop()
    backends("secure-again", port=port, tls=(server.cert, server.key))
    assert proto() == "HTTP/1.1"  # remembered h2, a new connection says http/1.1: retried


def test_protocol_h2_offers_only_h2(mesh, pki, nginx_h2):
    ca = pki["ca"]
    extra = '[service.web]\nprotocol = "h2"\n' + tls_table("web", ca_file=ca.cert_file)
    m = mesh.run({"web": [f"127.0.0.1:{nginx_h2.port}"]}, extra=extra)
    status, _, body = http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})
    assert status == 200 and body.startswith(b"proto=HTTP/2.0 ")


def test_protocol_h2_against_an_http1_only_server_is_502(mesh, backends, pki):
    ca, server = pki["ca"], pki["server"]
    b = backends("secure", tls=(server.cert, server.key))
    extra = ('[service.web]\nprotocol = "h2"\nretries = 0\n'
             + tls_table("web", ca_file=ca.cert_file))
    m = mesh.run({"web": [b.address]}, extra=extra)
    status, headers, body = http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})
    assert status == 502
    assert f"{b.address} did not select ALPN h2" in headers["meshd-error"]
    status, headers, _ = curl("--http2-prior-knowledge", "-H", "Host: web",
                              f"http://127.0.0.1:{m.ports['outbound']}/")
    assert status == 502 and "did not select ALPN h2" in headers["meshd-error"]


# -- verification ----------------------------------------------------------------------------

def _endpoint(m, address: str, service: str = "web") -> dict:
    _, _, raw = http_get("127.0.0.1", m.ports["admin"], "/endpoints")
    eps = json.loads(raw)["services"][service]["endpoints"]
    return next(e for e in eps if e["address"] == address)


def test_wrong_ca_is_a_connect_failure_retried_elsewhere(mesh, backends, pki):
    ca, stranger, server = pki["ca"], pki["stranger"], pki["server"]
    bad = backends("bad", tls=(stranger.cert, stranger.key))
    alone = mesh.run({"web": [bad.address]}, extra=tls_table("web", ca_file=ca.cert_file))
    status, headers, body = http_get("127.0.0.1", alone.ports["outbound"], "/", {"Host": "web"})
    assert status == 502
    reason = headers["meshd-error"]
    assert f"TLS handshake with {bad.address} failed" in reason
    assert "certificate verify failed" in reason
    good = backends("good", tls=(server.cert, server.key))
    extra = '[service.web]\nbalancer = "round_robin"\n' + tls_table("web", ca_file=ca.cert_file)
    m = mesh.run({"web": [bad.address, good.address]}, workers=1, extra=extra)
    for _ in range(6):
        status, headers, body = http_get("127.0.0.1", m.ports["outbound"], "/",
                                         {"Host": "web"})
        assert status == 200, headers
        assert headers["x-backend"] == "good"
    failed = _endpoint(m, bad.address)
    assert failed["failures"] >= 2 and failed["successes"] == 0
    assert _endpoint(m, good.address)["successes"] >= 6


def test_a_ca_file_gone_before_first_use_is_not_the_endpoints_fault(mesh, backends, pki,
                                                                   tmp_path):
    """Workers build a service's context on first use: a file removed after the config
    was loaded fails the request with the reason, without counting against the endpoint."""
    server = pki["server"]
    ca_copy = tmp_path / "ca-copy.crt"
    ca_copy.write_bytes(Path(pki["ca"].cert_file).read_bytes())
    b = backends("secure", tls=(server.cert, server.key))
    m = mesh.run({"web": [b.address]}, workers=1, extra=tls_table("web", ca_file=str(ca_copy)))
    ca_copy.unlink()
    status, headers, _ = http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})
    assert status == 502
    assert headers["meshd-error"].startswith("TLS toward service web cannot be set up: "
                                             f"cannot read {ca_copy}")
    assert _endpoint(m, b.address)["failures"] == 0


def test_server_name_is_sent_and_verified(mesh, backends, pki):
    ca, server = pki["ca"], pki["server"]
    b = backends("secure", tls=(server.cert, server.key))
    m = mesh.run({"web": [b.address], "wrong": [b.address]},
                 extra=tls_table("web", ca_file=ca.cert_file, server_name="web.test")
                 + tls_table("wrong", ca_file=ca.cert_file, server_name="elsewhere.test")
                 + "[service.wrong]\nretries = 0\n")
    port = m.ports["outbound"]
    status, _, body = http_get("127.0.0.1", port, "/proto", {"Host": "web"})
    assert status == 200 and body.split()[:2] == [b"HTTP/1.1", b"https"]
    status, headers, _ = http_get("127.0.0.1", port, "/", {"Host": "wrong"})
    assert status == 502
    assert f"TLS handshake with {b.address} failed" in headers["meshd-error"]
    assert "elsewhere.test" in headers["meshd-error"]  # "Hostname mismatch ... 'elsewhere.test'"


def test_verify_false_accepts_any_certificate_and_warns(mesh, backends, pki):
    stranger = pki["stranger"]  # signed by a CA meshd is never told about
    b = backends("secure", tls=(stranger.cert, stranger.key))
    m = mesh.run({"web": [b.address]}, extra=tls_table("web", verify=False))
    status, _, body = http_get("127.0.0.1", m.ports["outbound"], "/proto", {"Host": "web"})
    assert status == 200 and body.split()[1] == b"https"
    assert "service.web.tls.verify = false" in m.log()


def test_client_certificate_is_presented(mesh, pki):
    """The mTLS seam: cert_file/key_file are loaded and presented when asked. The server
    here is Python's own, requiring a client certificate signed by the CA."""
    ca, server, client = pki["ca"], pki["server"], pki["client"]
    port = free_port()
    script = textwrap.dedent(f"""\
        import http.server, ssl
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                cn = dict(x[0] for x in self.connection.getpeercert()["subject"])["commonName"]
                body = cn.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *a):
                pass
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain({server.cert!r}, {server.key!r})
        ctx.load_verify_locations({ca.cert_file!r})
        ctx.verify_mode = ssl.CERT_REQUIRED
        srv = http.server.HTTPServer(("127.0.0.1", {port}), H)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.serve_forever()
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open("127.0.0.1", port), what="mTLS server")
        m = mesh.run({"web": [f"127.0.0.1:{port}"], "anon": [f"127.0.0.1:{port}"]},
                     extra=tls_table("web", ca_file=ca.cert_file, cert_file=client.cert,
                                     key_file=client.key)
                     + tls_table("anon", ca_file=ca.cert_file) + "[service.anon]\nretries = 0\n")
        status, _, body = http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})
        assert (status, body) == (200, b"client")
        status, _, _ = http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "anon"})
        assert status == 502  # no client certificate: the server refuses the handshake
    finally:
        terminate(proc)


class UpgradeServer:
    """A TLS server that accepts any Upgrade with 101, then answers each chunk in upper
    case until the client's stream ends (``ended`` set), then closes."""

    def __init__(self, issued: Issued) -> None:
        import ssl
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(issued.cert, issued.key)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.requests: list[bytes] = []
        self.ended = threading.Event()
        self.server = TcpServer(self._serve)
        self.port = self.server.port

    def _serve(self, raw) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(10)
                head, marker, rest = read_head(conn).partition(b"\r\n\r\n")
                if not marker:
                    return
                self.requests.append(head)
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\n\r\n" + rest.upper())
                while data := conn.recv(65536):
                    conn.sendall(data.upper())
                self.ended.set()
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()


def test_websocket_to_a_tls_upstream_is_tunneled(mesh, pki):
    import socket
    ca, server = pki["ca"], pki["server"]
    up = UpgradeServer(server)
    try:
        m = mesh.run({"web": [f"127.0.0.1:{up.port}"]},
                     extra=tls_table("web", ca_file=ca.cert_file))
        with socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10) as c:
            c.sendall(b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nearly")
            got = b""
            while b"EARLY" not in got:
                data = c.recv(65536)
                assert data, got
                got += data
            assert got.startswith(b"HTTP/1.1 101 ")
            big = b"abc" * 100000  # many TLS records each way
            c.sendall(big)
            back = b""
            while len(back) < len(big):
                data = c.recv(65536)
                assert data
                back += data
            assert back == big.upper()
            # The end of the client's stream reaches the server (as the end of the TCP
            # stream: no close_notify), which closes; so does the tunnel.
            c.shutdown(socket.SHUT_WR)
            assert up.ended.wait(5)
            assert c.recv(65536) == b""
        assert up.requests and b"upgrade: websocket" in up.requests[0].lower()
    finally:
        up.close()


# -- gRPC ------------------------------------------------------------------------------------

SERVICE = "meshd.test.Echo"


@pytest.fixture
def grpc_tls_backend(pki):
    server_cert = pki["server"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"tls:" + request
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=None, response_serializer=None)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    creds = grpc.ssl_server_credentials([(Path(server_cert.key).read_bytes(),
                                          Path(server_cert.cert).read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield port
    server.stop(0)


def test_grpc_unary_over_tls(mesh, pki, grpc_tls_backend):
    ca = pki["ca"]
    m = mesh.run({"echo": [f"127.0.0.1:{grpc_tls_backend}"]},
                 extra=tls_table("echo", ca_file=ca.cert_file))
    with grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",
                               options=[("grpc.default_authority", "echo")]) as ch:
        unary = ch.unary_unary(f"/{SERVICE}/Unary")
        assert unary(b"hello", timeout=10) == b"tls:hello"
        big = b"z" * 300000
        assert unary(big, timeout=10) == b"tls:" + big


def test_grpc_to_a_tls_endpoint_that_selected_http1_is_502(mesh, backends, pki, tmp_path):
    ca, server = pki["ca"], pki["server"]
    b = backends("secure", tls=(server.cert, server.key))
    extra = "[service.web]\nretries = 0\n" + tls_table("web", ca_file=ca.cert_file)
    m = mesh.run({"web": [b.address]}, workers=1, extra=extra)
    url = f"http://127.0.0.1:{m.ports['outbound']}/meshd.test.Echo/Unary"
    message = tmp_path / "empty.grpc"
    message.write_bytes(b"\x00\x00\x00\x00\x00")  # one empty message
    grpc_args = ("--http2-prior-knowledge", "-H", "Host: web", "-H",
                 "content-type: application/grpc", "-H", "te: trailers",
                 "--data-binary", f"@{message}")
    # unknown yet: the handshake tells http/1.1; then remembered, no connection made
    for _ in range(2):
        status, headers, _ = curl(*grpc_args, url)
        assert status == 502
        assert "HTTP/2 needed" in headers["meshd-error"] or "gRPC needs HTTP/2" in headers[
            "meshd-error"]
        assert "selected ALPN http/1.1" in headers["meshd-error"]
    # the endpoint is healthy for HTTP/1.1 all along, and was never counted as failed
    status, _, body = http_get("127.0.0.1", m.ports["outbound"], "/proto", {"Host": "web"})
    assert status == 200
    assert _endpoint(m, b.address)["failures"] == 0


# -- config ----------------------------------------------------------------------------------

BASE = {"listener": [{"name": "out", "listen": "127.0.0.1:0"}]}


def _problems(tls: object, **service: object) -> dict[str, str]:
    data = dict(BASE, service={"web": {**service, "tls": tls}})
    with pytest.raises(ConfigError) as e:
        parse(data)
    return dict(e.value.problems)


def test_config_tls_values(pki):
    ca, client = pki["ca"], pki["client"]
    cfg = parse(dict(BASE, service={"web": {"tls": {}}}))
    tls = cfg.services["web"].tls
    assert tls is not None and tls.verify and tls.ca_file is None and tls.server_name is None
    cfg = parse(dict(BASE, service={"web": {"tls": {"enabled": False, "ca_file": "/nope"}}}))
    assert cfg.services["web"].tls is None
    assert parse(dict(BASE, service={"web": {}})).services["web"].tls is None
    cfg = parse(dict(BASE, service={"web": {"tls": {
        "ca_file": ca.cert_file, "server_name": "web.test", "cert_file": client.cert,
        "key_file": client.key}}}))
    tls = cfg.services["web"].tls
    assert tls is not None and tls.server_name == "web.test" and tls.key_file == client.key


def test_config_tls_errors_name_the_key(pki, tmp_path):
    client, server = pki["client"], pki["server"]
    missing = str(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert _problems({"ca_file": missing})["service.web.tls.ca_file"].startswith(
        f"cannot read {missing}: No such file")
    assert _problems({"ca_file": str(junk)})["service.web.tls.ca_file"].startswith(
        f"no PEM CA certificate in {junk}")
    assert "required with cert_file" in _problems(
        {"cert_file": client.cert})["service.web.tls.key_file"]
    assert "cannot load the client certificate" in _problems(
        {"cert_file": client.cert, "key_file": server.key})["service.web.tls.cert_file"]
    assert "cannot read" in _problems(
        {"cert_file": client.cert, "key_file": missing})["service.web.tls.key_file"]
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(Path(client.key).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(  # OpenSSL would prompt for its password
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    assert "is encrypted" in _problems(
        {"cert_file": client.cert, "key_file": str(encrypted)})["service.web.tls.key_file"]
    assert "expected true or false" in _problems({"verify": "no"})["service.web.tls.verify"]
    assert "expected true or false" in _problems({"enabled": 1})["service.web.tls.enabled"]
    assert "host name or IP" in _problems({"server_name": "bad name"})[
        "service.web.tls.server_name"]
    assert _problems({"verfy": False})["service.web.tls.verfy"] == "unknown key"
    assert "expected a table" in _problems(True)["service.web.tls"]


def test_meshd_check_refuses_bad_tls(tmp_path):
    missing = tmp_path / "no-ca.pem"
    path = tmp_path / "meshd.toml"
    path.write_text(textwrap.dedent(f"""\
        [[listener]]
        name = "out"
        listen = "127.0.0.1:0"
        [service.web.tls]
        ca_file = "{missing}"
        server_name = "-bad-"
        """))
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(path)],
                         capture_output=True, timeout=30)
    assert out.returncode == 2, out
    err = out.stderr.decode() + out.stdout.decode()
    assert f"{path}: service.web.tls.ca_file: cannot read {missing}" in err
    assert f"{path}: service.web.tls.server_name: expected a host name or IP address" in err


def test_one_context_per_service_per_worker(pki):
    """A worker's TLS targets are built on first use and kept: one cooperative context per
    service, shared by its connections; services without a tls table get none."""
    import gevent.ssl

    from meshd.worker.upstream.tls import UpstreamTls

    cfg = parse(dict(BASE, service={"web": {"tls": {"ca_file": pki["ca"].cert_file}},
                                    "grpc": {"protocol": "h2", "tls": {}},
                                    "plain": {}}))
    tls = UpstreamTls(cfg)
    web = tls.target("web")
    assert web is not None and tls.target("web") is web
    assert isinstance(web.context, gevent.ssl.SSLContext)
    assert not web.require_h2 and tls.target("grpc").require_h2
    assert tls.target("plain") is None and tls.target("unknown") is None
