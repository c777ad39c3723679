"""`meshd ca init|issue|inspect` as a user runs them (the venv's `meshd` in a subprocess),
each result cross-checked with the openssl command line: what `init` makes is a CA, what
`issue` writes verifies against it with the SPIFFE ID as its one URI SAN, and `inspect`
agrees with openssl on fingerprints and serials and never prints key material."""

from __future__ import annotations

import datetime
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshd.identity import ca as ca_mod
from meshd.identity import ca_dir
from meshd.testing.harness import require_tool

MESHD = str(Path(sys.executable).with_name("meshd"))
TD = "lab.example"
WEB = f"spiffe://{TD}/service/web"


def meshd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESHD, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([require_tool("openssl"), *args], capture_output=True, text=True,
                          timeout=60)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca"
    result = meshd("ca", "init", "--dir", str(path), "--trust-domain", TD)
    assert result.returncode == 0, result.stderr
    return path


def issue(ca: Path, out: Path, identity: str = WEB, *extra: str) -> subprocess.CompletedProcess[str]:
    return meshd("ca", "issue", "--dir", str(ca), "--identity", identity, "--out", str(out), *extra)


def enddate(path: Path) -> datetime.datetime:
    text = openssl("x509", "-in", str(path), "-noout", "-enddate").stdout.strip()
    return datetime.datetime.strptime(text.split("=", 1)[1], "%b %d %H:%M:%S %Y GMT").replace(
        tzinfo=datetime.UTC)


def pem_body_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("-")]


# -- init ------------------------------------------------------------------------------------

def test_init_makes_a_ca_dir_openssl_reads_as_a_root(ca: Path) -> None:
    assert mode(ca) == 0o700 and mode(ca / "ca.key") == 0o600
    assert sorted(p.name for p in ca.iterdir()) == ["ca.crt", "ca.key"]   # no temp left
    text = openssl("x509", "-in", str(ca / "ca.crt"), "-text", "-noout").stdout
    assert "CA:TRUE, pathlen:0" in text
    assert f"URI:spiffe://{TD}" in text
    assert "Certificate Sign" in text
    assert openssl("verify", "-CAfile", str(ca / "ca.crt"), str(ca / "ca.crt")).stdout.endswith(
        ": OK\n")
    assert openssl("ec", "-in", str(ca / "ca.key"), "-noout", "-check").returncode == 0


def test_init_refuses_an_existing_ca_and_bad_input(ca: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in ca.iterdir()}
    again = meshd("ca", "init", "--dir", str(ca), "--trust-domain", TD)
    assert again.returncode == 1
    assert "already holds a CA" in again.stderr
    assert {p.name: p.read_bytes() for p in ca.iterdir()} == before

    bad_td = meshd("ca", "init", "--dir", str(tmp_path / "x"), "--trust-domain", "Lab.Example")
    assert bad_td.returncode == 2 and "not a trust domain" in bad_td.stderr
    assert not (tmp_path / "x").exists()

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    refused = meshd("ca", "init", "--dir", str(loose), "--trust-domain", TD)
    assert refused.returncode == 2
    assert "is mode 0755; a CA directory is 0700 (chmod 700" in refused.stderr
    assert list(loose.iterdir()) == []


# -- issue -----------------------------------------------------------------------------------

def test_issue_writes_a_leaf_openssl_verifies_with_the_spiffe_id(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "web"
    result = issue(ca, out, WEB, "--ttl", "2h")
    assert result.returncode == 0, result.stderr
    crt, key = tmp_path / "web.crt", tmp_path / "web.key"
    assert mode(key) == 0o600
    assert crt.read_text().count("BEGIN CERTIFICATE") == 2          # leaf, then the CA
    assert openssl("verify", "-CAfile", str(ca / "ca.crt"), str(crt)).stdout == f"{crt}: OK\n"
    for purpose in ("sslserver", "sslclient"):
        openssl("verify", "-purpose", purpose, "-CAfile", str(ca / "ca.crt"), str(crt))
    text = openssl("x509", "-in", str(crt), "-text", "-noout").stdout
    assert re.findall(r"URI:\S+", text) == [f"URI:{WEB}"]
    assert "CA:FALSE" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    left = enddate(crt) - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(hours=1, minutes=55) < left <= datetime.timedelta(hours=2)
    # the key is the leaf's
    assert (openssl("pkey", "-in", str(key), "-pubout").stdout
            == openssl("x509", "-in", str(crt), "-noout", "-pubkey").stdout)
    # a client with an unrelated CA does not verify it
    other = tmp_path / "other"
    assert meshd("ca", "init", "--dir", str(other), "--trust-domain", TD).returncode == 0
    assert openssl("verify", "-CAfile", str(other / "ca.crt"), str(crt), check=False
                   ).returncode != 0
    for line in pem_body_lines(key):
        assert line not in result.stdout + result.stderr


def test_issue_never_overwrites_unless_forced(ca: Path, tmp_path: Path) -> None:
    out = tmp_path / "web"
    assert issue(ca, out).returncode == 0
    crt, key = tmp_path / "web.crt", tmp_path / "web.key"
    first = (crt.read_bytes(), key.read_bytes())
    again = issue(ca, out)
    assert again.returncode == 1
    assert "already exist; --force replaces" in again.stderr
    assert (crt.read_bytes(), key.read_bytes()) == first
    key.unlink()                                   # one of the two is enough to refuse
    assert issue(ca, out).returncode == 1 and not key.exists()
    forced = issue(ca, out, WEB, "--force")
    assert forced.returncode == 0, forced.stderr
    assert crt.read_bytes() != first[0] and mode(key) == 0o600
    openssl("verify", "-CAfile", str(ca / "ca.crt"), str(crt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "web.crt", "web.key"]


@pytest.mark.parametrize(("args", "message"), [
    (("--identity", "https://lab.example/web"), "is not a SPIFFE ID"),
    (("--identity", "spiffe://other.example/service/web"),
     "is not in the CA's trust domain 'lab.example'"),
    (("--identity", f"spiffe://{TD}/service/../x"), "'.' or '..' path segment"),
    (("--ttl", "30s"), "must be between 1m and"),
    (("--ttl", "1d"), "expected a duration with a unit"),
])
def test_issue_refuses_bad_options_with_exit_2(ca: Path, tmp_path: Path, args: tuple[str, ...],
                                               message: str) -> None:
    argv = {"--identity": WEB, "--ttl": "24h"}
    argv[args[0]] = args[1]
    result = meshd("ca", "issue", "--dir", str(ca), "--out", str(tmp_path / "x"),
                   *[a for kv in argv.items() for a in kv])
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "x.crt").exists() and not (tmp_path / "x.key").exists()


def test_issue_refuses_an_unusable_ca_dir(ca: Path, tmp_path: Path) -> None:
    missing = issue(tmp_path / "nope", tmp_path / "x")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    os.chmod(ca / "ca.key", 0o640)
    loose = issue(ca, tmp_path / "x")
    assert loose.returncode == 2
    assert f"{ca / 'ca.key'} is mode 0640; a private key must be 0600" in loose.stderr
    os.chmod(ca / "ca.key", 0o600)
    (ca / "ca.key").unlink()
    os.symlink(tmp_path / "elsewhere.key", ca / "ca.key")
    link = issue(ca, tmp_path / "x")
    assert link.returncode == 2 and "symbolic link is not followed" in link.stderr
    assert not list(tmp_path.glob("x.*"))


def test_issue_from_an_expired_ca_fails_and_a_leaf_ends_with_its_ca(tmp_path: Path) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    old = tmp_path / "old"
    old.mkdir(mode=0o700)
    made = ca_mod.new_ca(TD, ttl=86400, now=past)
    ca_dir.write_new(str(old / "ca.key"), made.key_pem, 0o600)
    ca_dir.write_new(str(old / "ca.crt"), made.cert_pem, 0o644)
    expired = issue(old, tmp_path / "x")
    assert expired.returncode == 1
    assert "not now: make a new one" in expired.stderr

    short = tmp_path / "short"
    assert meshd("ca", "init", "--dir", str(short), "--trust-domain", TD, "--ttl", "2h"
                 ).returncode == 0
    clamped = issue(short, tmp_path / "web", WEB, "--ttl", "48h")
    assert clamped.returncode == 0
    assert "warning: the leaf ends with the CA" in clamped.stderr
    assert enddate(tmp_path / "web.crt") == enddate(short / "ca.crt")


# -- inspect ---------------------------------------------------------------------------------

def test_inspect_a_chain_agrees_with_openssl(ca: Path, tmp_path: Path) -> None:
    assert issue(ca, tmp_path / "web").returncode == 0
    crt = tmp_path / "web.crt"
    result = meshd("ca", "inspect", str(crt))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"{crt}: 2 certificates (a chain: leaf first)\ncertificate 1 of 2:\n")
    leaf, root = out.split("certificate 2 of 2:\n")
    assert f"spiffe id:          {WEB}\n" in leaf
    assert re.search(r"validity: +valid, 23h5\dm left\n", leaf)
    assert "ca:                 no\n" in leaf and "signed by:          certificate 2\n" in leaf
    assert "key:                EC P-256\n" in leaf
    assert f"spiffe id:          spiffe://{TD}\n" in root
    assert "ca:                 yes, path length 0\n" in root
    assert "signed by:          itself (self-signed root)\n" in root
    # fingerprints and serials as openssl prints them, of each certificate in the file
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n",
                      crt.read_text(), re.DOTALL)
    for part, pem in zip((leaf, root), pems, strict=True):
        one = tmp_path / "one.pem"
        one.write_text(pem)
        fp = openssl("x509", "-in", str(one), "-noout", "-fingerprint", "-sha256").stdout
        assert f"sha256:             {fp.strip().split('=', 1)[1]}\n" in part
        serial = openssl("x509", "-in", str(one), "-noout", "-serial").stdout.strip()
        shown = re.search(r"serial: +(\S+)\n", part)
        assert shown and shown[1].replace(":", "") == serial.split("=", 1)[1]


def test_inspect_a_key_shows_its_type_and_public_fingerprint_only(ca: Path,
                                                                  tmp_path: Path) -> None:
    assert issue(ca, tmp_path / "web").returncode == 0
    key, crt = tmp_path / "web.key", tmp_path / "web.crt"
    result = meshd("ca", "inspect", str(key))
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(f"{key}: private key (its contents are never shown):\n")
    assert "type:               EC P-256\n" in result.stdout
    cert_out = meshd("ca", "inspect", str(crt)).stdout
    fp = re.search(r"public key sha256: +(\S+)", result.stdout)
    assert fp and f"public key sha256:  {fp[1]}" in cert_out.split("certificate 2")[0]
    # a published pem (chain, then key), a loose key and an RSA key from openssl
    both = tmp_path / "both.pem"
    both.write_bytes(crt.read_bytes() + key.read_bytes())
    both.chmod(0o644)
    combined = meshd("ca", "inspect", str(both))
    assert "matches:            certificate 1\n" in combined.stdout
    assert "holds a private key and is mode 0644; keep keys 0600" in combined.stderr
    rsa = tmp_path / "rsa.key"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", str(rsa))
    rsa_out = meshd("ca", "inspect", str(rsa))
    assert "type:               RSA 2048\n" in rsa_out.stdout
    for path, res in ((key, result), (key, combined), (rsa, rsa_out)):
        text = res.stdout + res.stderr
        assert "PRIVATE KEY-----" not in text
        for line in pem_body_lines(path):
            assert line not in text


def test_inspect_says_expired_and_broken_chains_and_refuses_other_files(ca: Path,
                                                                        tmp_path: Path) -> None:
    authority = ca_dir.load(str(ca))
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    a = ca_mod.issue(authority.signing, WEB, ttl=3600, not_before=past)
    b = ca_mod.issue(authority.signing, f"spiffe://{TD}/service/b")
    chain = tmp_path / "broken.crt"
    chain.write_bytes(a.cert_pem + b.cert_pem)
    out = meshd("ca", "inspect", str(chain)).stdout
    assert re.search(r"validity: +EXPIRED 1d\d+h ago\n", out)
    assert "NOT certificate 2 (the chain is out of order or broken here)" in out
    der = tmp_path / "ca.der"
    openssl("x509", "-in", str(ca / "ca.crt"), "-outform", "DER", "-out", str(der))
    assert "ca:                 yes, path length 0" in meshd("ca", "inspect", str(der)).stdout

    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    refused = meshd("ca", "inspect", str(junk))
    assert refused.returncode == 2 and "holds no certificate or private key" in refused.stderr
    missing = meshd("ca", "inspect", str(tmp_path / "nope.crt"))
    assert missing.returncode == 2 and "No such file" in missing.stderr


def test_inspect_of_damaged_certificates_and_keys_raises_only_inspect_error() -> None:
    """cryptography parses lazily: a damaged field raises when read. inspect shows it as
    unreadable, or refuses the file, and never fails otherwise (a fixed seed: repeatable)."""
    import base64
    import random

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from meshd.identity import inspect

    authority = ca_mod.new_ca(TD)
    leaf = ca_mod.issue(authority, WEB)
    cert_der = x509.load_pem_x509_certificate(leaf.cert_pem).public_bytes(
        serialization.Encoding.DER)
    key_der = serialization.load_pem_private_key(leaf.key_pem, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    rng = random.Random(14)
    shown = 0
    for i in range(3000):
        label, src = (b"CERTIFICATE", cert_der) if i % 2 else (b"PRIVATE KEY", key_der)
        damaged = bytearray(src)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        pem = (b"-----BEGIN " + label + b"-----\n" + base64.encodebytes(bytes(damaged))
               + b"-----END " + label + b"-----\n")
        for data in (pem, bytes(damaged)):
            try:
                lines = inspect.describe(data)
            except inspect.InspectError:
                continue
            shown += 1
            assert lines and all(isinstance(line, str) for line in lines)
    assert shown > 100       # most damage leaves something to show
