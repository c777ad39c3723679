"""What a certificate, chain or key file holds, in lines a person reads (``meshd ca
inspect``).

For each certificate: subject, issuer, SPIFFE URI SAN(s) and other names, validity and
the time left, serial, SHA-256 fingerprint (openssl's format, to compare with ``openssl
x509 -fingerprint -sha256``), key type and the SHA-256 of its public key; for a CA that it
is one and its path length; in a chain, whether each certificate is signed by the next.
For a private key: that it is one, its type and size and the SHA-256 of its public key
(which matches the certificate's), never a byte of the key itself. Input is bounded (a
file of at most 1 MiB, at most 64 PEM blocks); nothing here raises on odd input but
``InspectError``.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from meshd.identity.ca_dir import is_ca

MAX_BYTES = 1 << 20
MAX_BLOCKS = 64
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_KEY_BLOCKS = (b"PRIVATE KEY", b"EC PRIVATE KEY", b"RSA PRIVATE KEY", b"DSA PRIVATE KEY",
               b"ENCRYPTED PRIVATE KEY")
_UNREADABLE = (ValueError, TypeError, OverflowError, UnsupportedAlgorithm)
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class InspectError(Exception):
    """The input holds nothing this module can show (the message says what it is not)."""


@dataclass(frozen=True, slots=True)
class _Key:
    kind: str          # "EC P-256", "RSA 2048", ... or "" when encrypted
    public_sha256: str  # "" when encrypted


def describe(data: bytes, now: datetime.datetime | None = None) -> list[str]:
    """The lines describing ``data`` (PEM certificates and keys, or one DER certificate)."""
    with warnings.catch_warnings():   # e.g. "a serial that is not positive": shown as it is
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return _describe(data, now)


def _describe(data: bytes, now: datetime.datetime | None) -> list[str]:
    now = now or datetime.datetime.now(datetime.UTC)
    if len(data) > MAX_BYTES:
        raise InspectError(f"larger than {MAX_BYTES} bytes: not a certificate or key file")
    certs: list[x509.Certificate] = []
    keys: list[_Key] = []
    others: list[str] = []
    blocks = 0
    for match in _PEM.finditer(data):
        blocks += 1
        if blocks > MAX_BLOCKS:
            raise InspectError(f"more than {MAX_BLOCKS} PEM blocks")
        label, whole = match[1], match[0]
        if label == b"CERTIFICATE":
            try:
                certs.append(x509.load_pem_x509_certificate(whole))
            except (ValueError, x509.InvalidVersion):
                others.append("a CERTIFICATE block that does not parse")
        elif label in _KEY_BLOCKS:
            keys.append(_load_key(whole, pem=True))
        else:
            others.append(f"a {label.decode()} block (not inspected)")
    if not blocks:
        certs, keys = _der(data)
    if not certs and not keys:
        raise InspectError("holds no certificate or private key (PEM, or a DER certificate)")
    lines: list[str] = []
    if certs:
        lines.append(f"{len(certs)} certificate{'s' if len(certs) > 1 else ''}"
                     + (" (a chain: leaf first)" if len(certs) > 1 else ""))
    for i, cert in enumerate(certs):
        nxt = certs[i + 1] if i + 1 < len(certs) else None
        lines.extend(_certificate(cert, i, len(certs), nxt, now))
    for key in keys:
        lines.extend(_key_lines(key, certs))
    lines.extend(f"also: {o}" for o in others)
    return lines


def fingerprint(der: bytes) -> str:
    """SHA-256 of ``der`` as openssl prints fingerprints (``AB:CD:...``)."""
    return _colon_hex(hashlib.sha256(der).digest())


def key_kind(key: object) -> str:
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"EC {_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA {key.key_size}"
    if isinstance(key, (dsa.DSAPrivateKey, dsa.DSAPublicKey)):
        return f"DSA {key.key_size}"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "Ed25519"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "Ed448"
    return type(key).__name__


def span(seconds: float) -> str:
    """A duration in its two largest units: "364d23h", "23h59m", "4m10s", "59s"."""
    s = int(abs(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [(d, "d"), (h, "h"), (m, "m"), (s, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return "".join(f"{v}{u}" for v, u in parts[:2])


def _certificate(cert: x509.Certificate, i: int, n: int, nxt: x509.Certificate | None,
                 now: datetime.datetime) -> list[str]:
    head = f"certificate {i + 1} of {n}" if n > 1 else "certificate"
    out = [f"{head}:"]

    def add(name: str, value: Callable[[], str | list[str]]) -> None:
        # cryptography parses lazily: a damaged field raises when read, not when loaded.
        try:
            got = value()
        except _UNREADABLE as e:
            got = f"(unreadable: {str(e)[:80]})"
        for v in [got] if isinstance(got, str) else got:
            out.append(f"  {name + ':':<20}{v}")

    add("subject", lambda: cert.subject.rfc4514_string() or "(empty)")
    add("issuer", lambda: cert.issuer.rfc4514_string() or "(empty)")
    add("spiffe id", lambda: [v for k, v in _names(cert) if k == "spiffe id"] or "none")
    for kind in ("uri", "dns", "ip"):
        add(kind, lambda kind=kind: [v for k, v in _names(cert) if k == kind])   # type: ignore[misc]
    add("not before", lambda: _when(cert.not_valid_before_utc))
    add("not after", lambda: _when(cert.not_valid_after_utc))
    add("validity", lambda: _validity(cert, now))
    add("serial", lambda: _serial(cert.serial_number))
    add("sha256", lambda: fingerprint(cert.public_bytes(serialization.Encoding.DER)))
    add("key", lambda: key_kind(cert.public_key()))
    add("public key sha256", lambda: fingerprint(_spki(cert)))
    add("ca", lambda: _ca(cert))
    if _self_signed(cert):
        add("signed by", lambda: "itself (self-signed root)")
    elif nxt is not None:
        add("signed by", lambda: f"certificate {i + 2}" if _signed_by(cert, nxt)
            else f"NOT certificate {i + 2} (the chain is out of order or broken here)")
    return out


def _validity(cert: x509.Certificate, now: datetime.datetime) -> str:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return f"not yet valid (starts in {span((start - now).total_seconds())})"
    if now > end:
        return f"EXPIRED {span((now - end).total_seconds())} ago"
    return f"valid, {span((end - now).total_seconds())} left"


def _ca(cert: x509.Certificate) -> str:
    if not is_ca(cert):
        return "no"
    path_len = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    return f"yes, path length {'unlimited' if path_len is None else path_len}"


def _self_signed(cert: x509.Certificate) -> bool:
    try:
        return cert.issuer == cert.subject and _signed_by(cert, cert)
    except _UNREADABLE:
        return False


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_lines(key: _Key, certs: list[x509.Certificate]) -> list[str]:
    if not key.kind:
        return ["private key (encrypted; not decrypted, nothing of it shown)"]
    out = ["private key (its contents are never shown):",
           f"  {'type:':<20}{key.kind}",
           f"  {'public key sha256:':<20}{key.public_sha256}"]
    for i, cert in enumerate(certs):
        try:
            spki = _spki(cert)
        except _UNREADABLE:
            continue
        if fingerprint(spki) == key.public_sha256:
            which = f"certificate {i + 1}" if len(certs) > 1 else "the certificate"
            out.append(f"  {'matches:':<20}{which}")
            break
    else:
        if certs:
            out.append(f"  {'matches:':<20}NO certificate in this file")
    return out


def _load_key(data: bytes, pem: bool) -> _Key:
    load = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    try:
        key = load(data, password=None)
    except TypeError:             # encrypted: a password is needed
        return _Key("", "")
    except (ValueError, UnsupportedAlgorithm):
        raise InspectError("holds a private key block that does not parse") from None
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return _Key(key_kind(key), fingerprint(spki))


def _der(data: bytes) -> tuple[list[x509.Certificate], list[_Key]]:
    try:
        return [x509.load_der_x509_certificate(data)], []
    except (ValueError, x509.InvalidVersion):
        pass
    try:
        return [], [_load_key(data, pem=False)]
    except InspectError:
        return [], []


def _names(cert: x509.Certificate) -> list[tuple[str, str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[tuple[str, str]] = []
    out += [("spiffe id" if str(v).startswith("spiffe://") else "uri", str(v))
            for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [("dns", str(v)) for v in san.get_values_for_type(x509.DNSName)]
    out += [("ip", str(v)) for v in san.get_values_for_type(x509.IPAddress)]
    return out


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _serial(n: int) -> str:
    sign, n = ("-", -n) if n < 0 else ("", n)   # RFC 5280 forbids it; old certificates have it
    return sign + _colon_hex(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))


def _colon_hex(b: bytes) -> str:
    return ":".join(f"{x:02X}" for x in b)


def _when(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")
