"""A small certificate authority: a trust anchor and short-lived SPIFFE leaf certificates.

Built on ``cryptography`` (pyOpenSSL's own certificate-building API is deprecated in
favour of it). Keys are ECDSA P-256. The CA certificate is a self-signed root (path
length 0); a leaf has one URI SAN (its SPIFFE ID), is valid from a minute ago (clock
skew) for ``ttl``, and is usable for both TLS server and client authentication, as a
sidecar's certificate is on both ends of a hop.

Used by ``meshd ca`` (files in a directory), the ``meshd-ca`` provider (leaves issued in
memory and rotated) and by tests for their certificates.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_LEAF_TTL = 24 * 3600.0
DEFAULT_CA_TTL = 365 * 24 * 3600.0
SKEW = datetime.timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"Issued(cert={len(self.cert_pem)} bytes, key=<hidden>)"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_ca(trust_domain: str, ttl: float = DEFAULT_CA_TTL,
           now: datetime.datetime | None = None) -> Issued:
    """A self-signed root for ``trust_domain`` (its URI SAN is ``spiffe://TD``)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"meshd root {trust_domain}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW)
            .not_valid_after(now + datetime.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))


def issue(ca: Issued, spiffe_id: str, ttl: float = DEFAULT_LEAF_TTL,
          now: datetime.datetime | None = None,
          not_before: datetime.datetime | None = None) -> Issued:
    """A leaf certificate for ``spiffe_id`` signed by ``ca``, with a fresh key.
    ``not_before`` overrides the start (tests make expired or not-yet-valid ones). A leaf
    never outlives a CA that is valid at its start: no peer would accept it after that."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key")
    key = new_key()
    start = not_before if not_before is not None else now - SKEW
    end = start + SKEW + datetime.timedelta(seconds=ttl)
    if start < ca_cert.not_valid_after_utc < end:
        end = ca_cert.not_valid_after_utc
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))
