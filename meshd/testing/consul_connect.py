"""Consul Connect in the Consul test server: the CA (roots and leaf certificates), the
intentions and the authorize decision, answered as Consul's agent documents them.

Owned here, used by ``meshd.testing.consul_server`` under its lock (it calls these from
its handler threads and its test controls; nothing here does I/O):

- ``roots_json()``: ``GET /v1/agent/connect/ca/roots``: ``ActiveRootID``, ``TrustDomain``
  and ``Roots`` (``ID``, ``Name``, ``SerialNumber``, ``SigningKeyID``, ``NotBefore``,
  ``NotAfter``, ``RootCert``, ``IntermediateCerts``, ``Active``, ...). Consul's trust
  domain is ``<cluster-uuid>.consul``.
- ``leaf(service)``: ``GET /v1/agent/connect/ca/leaf/<service>``: ``SerialNumber``,
  ``CertPEM``, ``PrivateKeyPEM``, ``Service``, ``ServiceURI``
  (``spiffe://<trust-domain>/ns/default/dc/<dc>/svc/<service>``), ``ValidAfter``,
  ``ValidBefore``, ``CreateIndex``, ``ModifyIndex``. As the agent's leaf cache does, a
  leaf is renewed at a random point between 60 % and 90 % of its lifetime, and re-issued
  when the active root changes.
- ``rotate(reissue)``: a CA rotation, simplified: a new root becomes active, the old one
  stays in ``Roots`` (inactive) and leaves are re-issued under the new one, at once or
  (``reissue=False``) when the test calls ``reissue()`` — Consul spreads the re-signing
  after a rotation over a jitter window and bridges it with a cross-signed intermediate;
  here the test orders the steps instead (roots first, leaves later).
- ``authorize(body, ...)``: ``POST /v1/agent/connect/authorize``, ``{"Authorized",
  "Reason"}``: the client's service from its ``ClientCertURI`` against the intentions of
  ``Target`` (exact names before ``*``), else the default (Consul's ACL default policy;
  allow when ACLs are off). As in Consul, the trust domain of the URI is not checked.
- intentions by name (``PUT`` / ``GET`` / ``DELETE /v1/connect/intentions/exact``).

Certificates are real (``meshd.identity.ca`` on ``cryptography``); every change bumps the
server's raft index through ``bump`` so blocking queries wake.
"""

from __future__ import annotations

import datetime
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from meshd.identity import ca

DEFAULT_LEAF_TTL = 72 * 3600.0       # Consul's default leaf_cert_ttl
ROOT_TTL = 10 * 365 * 24 * 3600.0    # Consul's built-in CA root: 10 years
RENEW_WINDOW = (0.6, 0.9)            # the agent renews a leaf within this part of its life
_SERVICE_URI = re.compile(
    r"spiffe://([a-z0-9._-]+)(?:/ap/([^/]+))?/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)")
_ACTIONS = ("allow", "deny")


class ConnectError(ValueError):
    """A request Consul answers with 400 and this text."""


@dataclass
class Root:
    id: str
    name: str
    serial: int
    signing_key_id: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    issued: ca.Issued
    active: bool
    create_index: int
    modify_index: int

    def json(self, trust_domain: str) -> dict[str, Any]:
        return {"ID": self.id, "Name": self.name, "SerialNumber": self.serial,
                "SigningKeyID": self.signing_key_id, "ExternalTrustDomain": trust_domain,
                "NotBefore": _rfc3339(self.not_before), "NotAfter": _rfc3339(self.not_after),
                "RootCert": self.issued.cert_pem.decode(), "IntermediateCerts": None,
                "Active": self.active, "PrivateKeyType": "ec", "PrivateKeyBits": 256,
                "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


@dataclass
class Leaf:
    service: str
    uri: str
    serial: str                      # colon-hex, as Consul writes it
    issued: ca.Issued
    valid_after: datetime.datetime
    valid_before: datetime.datetime
    root_id: str
    renew_at: float                  # time.time() when the agent would renew it
    create_index: int
    modify_index: int

    def json(self) -> dict[str, Any]:
        return {"SerialNumber": self.serial, "CertPEM": self.issued.cert_pem.decode(),
                "PrivateKeyPEM": self.issued.key_pem.decode(), "Service": self.service,
                "ServiceURI": self.uri, "ValidAfter": _rfc3339(self.valid_after),
                "ValidBefore": _rfc3339(self.valid_before),
                "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


@dataclass
class Intention:
    source: str
    destination: str
    action: str
    description: str
    create_index: int
    modify_index: int

    @property
    def precedence(self) -> int:
        """Consul's: exact names outrank ``*`` (destination first)."""
        return {(False, False): 9, (True, False): 8, (False, True): 6}.get(
            (self.source == "*", self.destination == "*"), 5)

    def json(self) -> dict[str, Any]:
        return {"ID": "", "Description": self.description, "SourceNS": "default",
                "SourceName": self.source, "DestinationNS": "default",
                "DestinationName": self.destination, "SourceType": "consul",
                "Action": self.action, "Precedence": self.precedence, "Meta": {},
                "CreateIndex": self.create_index, "ModifyIndex": self.modify_index}


class Connect:
    """The Connect state of one test cluster (call with the server's lock held)."""

    def __init__(self, datacenter: str, bump: Callable[[], int],
                 leaf_ttl: float = DEFAULT_LEAF_TTL, cluster_id: str = "") -> None:
        self.datacenter = datacenter
        self.cluster_id = cluster_id or str(uuid.uuid4())
        self.trust_domain = f"{self.cluster_id}.consul"
        self.leaf_ttl = leaf_ttl
        self._bump = bump
        self.roots: list[Root] = []
        self.roots_index = 0
        self.leaves: dict[str, Leaf] = {}
        self.intentions: dict[tuple[str, str], Intention] = {}
        self.issued = 0                  # leaf certificates signed so far
        self._new_root()

    # -- the CA ---------------------------------------------------------------------

    @property
    def active(self) -> Root:
        return next(r for r in self.roots if r.active)

    def roots_json(self) -> dict[str, Any]:
        return {"ActiveRootID": self.active.id, "TrustDomain": self.trust_domain,
                "Roots": [r.json(self.trust_domain) for r in self.roots]}

    def rotate(self, reissue: bool = True) -> Root:
        """A new active root; the old ones stay listed, inactive. ``reissue``: every leaf
        is signed again under the new root now (else at ``reissue()`` or its renewal)."""
        root = self._new_root()
        if reissue:
            self.reissue()
        return root

    def prune(self) -> None:
        """Drop inactive roots (Consul does once their leaves have expired)."""
        if any(not r.active for r in self.roots):
            self.roots = [r for r in self.roots if r.active]
            self.roots_index = self._bump()

    def reissue(self, services: list[str] | None = None) -> None:
        """Sign the named leaves (default: all) again, under the active root."""
        for name in list(self.leaves) if services is None else services:
            self._issue(name)

    def leaf(self, service: str) -> Leaf:
        """The service's current leaf: issued on first use, renewed when due."""
        leaf = self.leaves.get(service)
        if leaf is None or time.time() >= leaf.renew_at:
            leaf = self._issue(service)
        return leaf

    def leaf_index(self, service: str) -> int:
        return self.leaf(service).modify_index

    def uri(self, service: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/default/dc/{self.datacenter}/svc/{service}"

    def _new_root(self) -> Root:
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        serial = len(self.roots) + 1
        issued, cert = _root_cert(self.trust_domain, self.cluster_id, now)
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        index = self._bump()
        for r in self.roots:
            if r.active:
                r.active, r.modify_index = False, index
        root = Root(_colon_hex(cert.fingerprint(hashes.SHA1())), "Consul CA Primary Cert",
                    serial, _colon_hex(ski), now - ca.SKEW, now + datetime.timedelta(
                        seconds=ROOT_TTL), issued, True, index, index)
        self.roots.append(root)
        self.roots_index = index
        return root

    def _issue(self, service: str) -> Leaf:
        root = self.active
        issued_at = time.time()
        issued = ca.issue(root.issued, self.uri(service), ttl=self.leaf_ttl)
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        old = self.leaves.get(service)
        index = self._bump()
        self.issued += 1
        leaf = Leaf(service, self.uri(service), _colon_hex(_serial_bytes(cert.serial_number)),
                    issued, cert.not_valid_before_utc, cert.not_valid_after_utc, root.id,
                    issued_at + self.leaf_ttl * random.uniform(*RENEW_WINDOW),
                    old.create_index if old else index, index)
        self.leaves[service] = leaf
        return leaf

    # -- intentions and authorize -----------------------------------------------------

    def set_intention(self, source: str, destination: str, action: str,
                      description: str = "") -> None:
        if action not in _ACTIONS:
            raise ConnectError(f'Invalid intention action: "{action}" (allow or deny)')
        if not source or not destination:
            raise ConnectError("source and destination are required")
        old = self.intentions.get((source, destination))
        index = self._bump()
        self.intentions[(source, destination)] = Intention(
            source, destination, action, description, old.create_index if old else index, index)

    def delete_intention(self, source: str, destination: str) -> None:
        if self.intentions.pop((source, destination), None) is not None:
            self._bump()

    def authorize(self, body: Mapping[str, Any], default_allow: bool) -> dict[str, Any]:
        target = body.get("Target")
        uri = body.get("ClientCertURI")
        if not isinstance(target, str) or not target:
            raise ConnectError("Target service must be specified")
        if not isinstance(uri, str) or not uri:
            raise ConnectError("ClientCertURI must be specified")
        found = _SERVICE_URI.fullmatch(uri)
        if found is None:
            raise ConnectError("ClientCertURI not a valid Connect identifier")
        source = found[5]
        matches = sorted((i for i in self.intentions.values()
                          if i.destination in (target, "*") and i.source in (source, "*")),
                         key=lambda i: -i.precedence)
        if matches:
            ixn = matches[0]
            return {"Authorized": ixn.action == "allow",
                    "Reason": f"Matched L4 intention: {ixn.source} => {ixn.destination} "
                              f"({ixn.action})"}
        return {"Authorized": default_allow, "Reason": "Default behavior configured by ACLs"}


def _root_cert(trust_domain: str, cluster_id: str,
               now: datetime.datetime) -> tuple[ca.Issued, x509.Certificate]:
    """A root shaped like Consul's built-in CA's: its own common name per root (so two
    roots in one bundle never share a subject), URI SAN ``spiffe://<trust-domain>``."""
    key = ca.new_key()
    tag = "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=7))
    name = x509.Name([x509.NameAttribute(
        NameOID.COMMON_NAME, f"pri-{tag}.consul.ca.{cluster_id[:8]}.consul")])
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - ca.SKEW)
            .not_valid_after(now + datetime.timedelta(seconds=ROOT_TTL))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(key, hashes.SHA256()))
    return ca.Issued(cert.public_bytes(serialization.Encoding.PEM), ca.key_pem(key)), cert


def _serial_bytes(serial: int) -> bytes:
    return serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def _rfc3339(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
