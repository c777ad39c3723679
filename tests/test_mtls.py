"""TLS on listeners and mTLS between meshds, through real meshd processes: real
certificates (``meshd.identity.ca`` for SPIFFE identities, ``meshd.testing.certs`` for an
ordinary server certificate), curl and sslscan as clients, Python's ssl for handshakes
that must fail. Each refused case is proven by its counter
(``meshd_tls_handshake_total``) and its log line."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

from conftest import MeshFactory

from meshd.testing.certs import TestCA
from meshd.testing.harness import Meshd, wait_for

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
    from meshd.testing.harness import free_port
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
