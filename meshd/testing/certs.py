"""Throwaway X.509 certificates for tests on loopback (``cryptography``): a CA, and
certificates it signs for servers (DNS names and IP addresses as SANs) or clients.

    ca = TestCA.create(folder, "test-ca")
    server = ca.issue("web", dns=["web.test"], ips=["127.0.0.1"])   # server.cert, server.key
    ca.cert_file                                                     # the PEM to trust
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=1)
_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Issued:
    cert: str  # PEM file
    key: str   # PEM file (PKCS#8, unencrypted)


@dataclass(frozen=True)
class TestCA:
    folder: Path
    name: str
    cert_file: str
    _cert: Any
    _key: Any

    __test__ = False  # not a pytest test class

    @classmethod
    def create(cls, folder: Path, name: str = "meshd-test-ca") -> TestCA:
        folder.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        path = folder / f"{name}.crt"
        path.write_bytes(cert.public_bytes(_PEM))
        return cls(folder, name, str(path), cert, key)

    def issue(self, name: str, dns: tuple[str, ...] | list[str] = (),
              ips: tuple[str, ...] | list[str] = (), client: bool = False) -> Issued:
        """A certificate signed by this CA for ``dns`` names and ``ips`` (server auth),
        or for a client (client auth)."""
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self._cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + VALIDITY)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self._key.public_key()), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.folder / f"{self.name}-{name}.crt"
        key_path = self.folder / f"{self.name}-{name}.key"
        cert_path.write_bytes(cert.public_bytes(_PEM))
        key_path.write_bytes(key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Issued(str(cert_path), str(key_path))
