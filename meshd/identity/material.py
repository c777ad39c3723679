"""The check every ``Material`` passes before the control process publishes it.

A provider hands over PEM bytes it read or was sent (files being rotated, a CA's
answer); publishing a wrong one would break every new handshake of every worker, so
it is refused here, with a reason a user can act on, and the last good one stays:

- the chain holds PEM certificates, the leaf first; the key loads, is not encrypted
  and is the leaf's (a rotation seen half-written: new certificate, old key);
- the leaf is not a CA and has exactly one URI SAN, a SPIFFE ID (the X509-SVID rule),
  in the trust domain (``Material.trust_domain``, else ``[identity] trust_domain``);
- it is valid now (not before its start, not after its end);
- the roots hold PEM certificates and the chain leads to one of them (each certificate
  signed by the next, the last by a root, or a root itself), so peers holding the
  same roots accept it.

The messages never quote key bytes (``cryptography``'s errors do not either).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from meshd.identity import spiffe
from meshd.identity.api import Material

MAX_CHAIN = 10   # certificates in a chain; a longer one is not a workload's


class MaterialError(ValueError):
    """Why a Material cannot be published. ``valid_from``: set (unix seconds) when the
    only fault is a leaf not valid yet (a clock behind the issuer's): the same material
    passes from then on."""

    def __init__(self, message: str, valid_from: float | None = None) -> None:
        super().__init__(message)
        self.valid_from = valid_from


@dataclass(frozen=True, slots=True)
class Checked:
    """What the check learned of a good Material (shown in logs, /identity, /metrics)."""

    spiffe_id: str
    not_after: float          # unix seconds: the leaf's notAfter
    not_before: float
    serial: str               # the leaf's serial number, hex
    trust_domain: str
    roots: tuple[str, ...]    # each root's subject, RFC 4514


def check(material: Material, trust_domain: str,
          now: datetime.datetime | None = None) -> Checked:
    """The leaf's SPIFFE ID and validity of ``material``; raises ``MaterialError``."""
    now = now or datetime.datetime.now(datetime.UTC)
    chain = _certificates(material.chain_pem, "the certificate chain")
    if len(chain) > MAX_CHAIN:
        raise MaterialError(f"the certificate chain holds {len(chain)} certificates "
                            f"(at most {MAX_CHAIN})")
    roots = _certificates(material.roots_pem, "the roots")
    leaf = chain[0]
    _check_key(material.key_pem, leaf)
    spiffe_id = _spiffe_id(leaf)
    domain = material.trust_domain or trust_domain
    if spiffe.trust_domain(spiffe_id) != domain:
        raise MaterialError(f"the leaf's SPIFFE ID {spiffe_id} is not in the trust domain "
                            f"{domain!r}")
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < start:
        _check_path(chain, roots)   # anything else wrong is said first
        raise MaterialError(f"the leaf ({spiffe_id}) is not valid before "
                            f"{start.isoformat()} (now {now.isoformat(timespec='seconds')})",
                            valid_from=start.timestamp())
    if now > end:
        raise MaterialError(f"the leaf ({spiffe_id}) expired at {end.isoformat()}")
    _check_path(chain, roots)
    return Checked(spiffe_id=spiffe_id, not_after=end.timestamp(), not_before=start.timestamp(),
                   serial=f"{leaf.serial_number:x}", trust_domain=domain,
                   roots=tuple(r.subject.rfc4514_string() for r in roots))


def _certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise MaterialError(f"{what}: no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise MaterialError(f"{what} does not load: {e}") from None


def _check_key(key_pem: bytes, leaf: x509.Certificate) -> None:
    if b"ENCRYPTED" in key_pem:
        raise MaterialError("the key is encrypted; meshd needs an unencrypted key "
                            "(readable by meshd only)")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # cryptography's message names the format problem, never the key's bytes
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MaterialError(f"the key does not load: {first}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise MaterialError("the key does not match the leaf certificate (a rotation "
                            "written half: certificate and key of different pairs?)")


def _spiffe_id(leaf: x509.Certificate) -> str:
    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise MaterialError("the leaf certificate is a CA certificate (basicConstraints "
                                "CA:TRUE); a workload's is not")
    except x509.ExtensionNotFound:
        pass
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise MaterialError(f"the leaf has {len(uris)} URI SANs; a workload certificate has "
                            f"exactly one, its SPIFFE ID (spiffe://TRUST-DOMAIN/PATH)")
    why = spiffe.problem(uris[0])
    if why:
        raise MaterialError(f"the leaf's URI SAN: {why}")
    return uris[0]


def _check_path(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> None:
    """Each certificate of ``chain`` is signed by the next one, and the last by a root
    (or is a root itself)."""
    root_fingerprints = {r.fingerprint(hashes.SHA256()) for r in roots}
    for i, cert in enumerate(chain):
        if cert.fingerprint(hashes.SHA256()) in root_fingerprints:
            return
        if any(_issued_by(cert, root) for root in roots):
            return
        if i + 1 < len(chain) and not _issued_by(cert, chain[i + 1]):
            raise MaterialError(f"certificate {i} of the chain is not signed by certificate "
                                f"{i + 1}")
    raise MaterialError("the chain does not lead to any of the roots (roots: "
                        + "; ".join(r.subject.rfc4514_string() or "(empty subject)"
                                    for r in roots) + ")")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
