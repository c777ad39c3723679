"""A real meshd with ``[identity] provider = "meshd-ca"`` on a CA directory made by the
real ``meshd ca init``: it publishes a leaf whose one URI SAN is the configured identity
(openssl verifies the published file against ca.crt), renews it before it expires, and a
CA rotation done with the CLI (a second root appended to ca.crt, its key in ca.key) reaches
the published roots and the next leaf. No key byte reaches the log."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

from meshd.identity import ca_dir
from meshd.identity import paths as identity_paths
from meshd.testing.harness import Meshd, free_port, http_get, read_head, require_tool, wait_for
from meshd.testing.identity_files import key_lines

MESHD = str(Path(sys.executable).with_name("meshd"))
TD = "lab.example"
WEB = f"spiffe://{TD}/service/web"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([MESHD, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def openssl(*args: str) -> str:
    proc = subprocess.run([require_tool("openssl"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def identity(m: Meshd) -> dict[str, Any]:
    host, _, port = (m.admin or "").rpartition(":")
    status, _, body = http_get(host, int(port), "/identity")
    assert status == 200, (status, body)
    return json.loads(body)


def published(m: Meshd, shm_dir: Path) -> tuple[Path, Path]:
    instance = re.search(r'instance = "([^"]+)"', m.config_path.read_text())
    assert instance
    p = identity_paths(str(shm_dir), instance[1], m.pid)
    return Path(p.pem), Path(p.roots)


def toml(ca: Path, **extra: str) -> str:
    lines = ["[identity]", 'provider = "meshd-ca"', f'trust_domain = "{TD}"', f'dir = "{ca}"',
             'service = "web"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def test_a_meshd_publishes_renews_and_rotates_a_meshd_ca_identity(mesh, backends,
                                                                  tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    cli("ca", "init", "--dir", str(ca), "--trust-domain", TD)
    a = backends("a")
    # a 1-minute leaf renewed after 5% of its life: a renewal every 3 s
    m = mesh.run({"web": [a.address]}, workers=2,
                 extra=toml(ca, ttl='"1m"', renew_at="0.05"))
    info = identity(m)
    assert info["local_id"] == WEB and info["provider"] == "meshd-ca"
    assert info["roots"] == [f"CN=meshd root {TD},O=meshd"]
    pem, roots = published(m, mesh.shm_dir)
    assert openssl("verify", "-CAfile", str(ca / "ca.crt"), str(pem)) == f"{pem}: OK\n"
    san = openssl("x509", "-in", str(pem), "-noout", "-ext", "subjectAltName")
    assert re.findall(r"URI:\S+", san) == [f"URI:{WEB}"]
    shown = cli("ca", "inspect", str(pem)).stdout
    assert f"spiffe id:          {WEB}\n" in shown and "matches:            certificate 1" in shown
    assert roots.read_bytes() == (ca / "ca.crt").read_bytes()

    # renewal: a new leaf is published well before the first expires
    first = info["serial"]
    wait_for(lambda: identity(m)["serial"] != first, timeout=30)
    assert m.metric("meshd_identity_published_total") >= 2

    # a CA rotation as a user does it with the CLI
    new = tmp_path / "new"
    cli("ca", "init", "--dir", str(new), "--trust-domain", TD)
    both = (ca / "ca.crt").read_bytes() + (new / "ca.crt").read_bytes()
    ca_dir.write_new(str(ca / "ca.crt"), both, 0o644, force=True)
    ca_dir.write_new(str(ca / "ca.key"), (new / "ca.key").read_bytes(), 0o600, force=True)
    wait_for(lambda: len(identity(m)["roots"]) == 2, timeout=30)
    wait_for(lambda: roots.read_bytes() == both, timeout=10)
    # the leaf published with the two roots is the new CA's alone
    wait_for(lambda: subprocess.run(
        [require_tool("openssl"), "verify", "-CAfile", str(new / "ca.crt"), str(pem)],
        capture_output=True).returncode == 0, timeout=30)
    log = m.log()
    assert "meshd-ca: the CA in" in log and "changed (2 roots)" in log
    assert "PRIVATE KEY" not in log
    for d in (ca, new):
        for line in key_lines((d / "ca.key").read_bytes()):
            assert line not in log


def test_meshd_check_names_the_identity_keys_of_a_bad_meshd_ca_setup(mesh, backends,
                                                                     tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    cli("ca", "init", "--dir", str(ca), "--trust-domain", "other.example")
    (ca / "ca.key").chmod(0o640)
    a = backends("a")
    text, _ = mesh.config({"web": [a.address]}, workers=1)
    path = tmp_path / "bad.toml"
    path.write_text(text + toml(ca, ttl='"10s"').replace('service = "web"\n', ""))
    out = subprocess.run([MESHD, "check", "-c", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"{path}: identity.ttl: must be at least 60s, got '10s'",
        f"{path}: identity.dir: {ca / 'ca.key'} is mode 0640; a private key must be 0600 "
        f"(chmod 600 {ca / 'ca.key'})",
        f"{path}: identity.service: required outside Kubernetes (or give identity): the "
        f"identity is spiffe://{TD}/service/NAME"]
    (ca / "ca.key").chmod(0o600)
    path.write_text(text + toml(ca))
    out = subprocess.run([MESHD, "check", "-c", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"{path}: identity.dir: the CA in {ca} is for trust domain 'other.example', "
        f"[identity] trust_domain is '{TD}'"]


STRICT_INBOUND = """
[[listener]]
name = "in"
listen = "127.0.0.1:{port}"
direction = "inbound"
forward = "{app}"
mtls = "strict"
"""


def mtls_get(port: int, ca_file: Path, cert: Path, key: Path) -> tuple[bytes, dict[str, Any]]:
    """GET / over TLS with a client certificate, the server's chain verified against
    ``ca_file`` (no host name: a SPIFFE leaf names a workload, not a host)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(str(ca_file))
    context.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        head = read_head(tls)
        return head, tls.getpeercert()


def test_meshd_ca_certificates_on_both_ends_of_an_mtls_handshake(mesh, backends,
                                                                 tmp_path: Path) -> None:
    """The server's certificate from the provider, the client's from `meshd ca issue`:
    a strict inbound listener serves the client; a client of another CA with the same
    root name is refused (the key, not the name, decides)."""
    ca = tmp_path / "ca"
    cli("ca", "init", "--dir", str(ca), "--trust-domain", TD)
    cli("ca", "issue", "--dir", str(ca), "--identity", WEB, "--out", str(tmp_path / "web"))
    app, port = backends("app"), free_port()
    text, ports = mesh.config({}, workers=1, listeners=STRICT_INBOUND.format(
        port=port, app=app.address), extra=toml(ca).replace('"web"', '"api"'))
    m = mesh.start(text, ports)
    head, server = mtls_get(port, ca / "ca.crt", tmp_path / "web.crt", tmp_path / "web.key")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert server["subjectAltName"] == (("URI", f"spiffe://{TD}/service/api"),)
    m.wait_metric("meshd_tls_handshake_total",
                  'listener="in",direction="inbound",result="ok"', 1)

    other = tmp_path / "other"
    cli("ca", "init", "--dir", str(other), "--trust-domain", TD)   # same name, another key
    cli("ca", "issue", "--dir", str(other), "--identity", WEB, "--out", str(tmp_path / "x"))
    try:   # TLS 1.3: the server's verdict on the client comes after the client's handshake
        head, _ = mtls_get(port, ca / "ca.crt", tmp_path / "x.crt", tmp_path / "x.key")
    except (ssl.SSLError, ConnectionError):
        head = b""
    assert head == b"", "a client of another CA was served"
    m.wait_metric("meshd_tls_handshake_total",
                  'listener="in",direction="inbound",result="verify_failed"', 1)
    # and the client refuses a server of another CA
    try:
        mtls_get(port, other / "ca.crt", tmp_path / "x.crt", tmp_path / "x.key")
        raise AssertionError("the client accepted a server of another CA")
    except ssl.SSLCertVerificationError:
        pass
