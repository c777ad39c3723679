"""Workload identity: who this meshd is, whom it trusts, and who may call it.

An identity is an X.509 certificate whose URI SAN is a SPIFFE ID
(``spiffe://TRUST-DOMAIN/PATH``, ``meshd.identity.spiffe``). It comes from a provider
plugin (``meshd.identity.api``, entry-point group ``meshd.identity``): ``files``
(cert-manager, SPIRE helpers, Vault agents write files), ``meshd-ca`` (a lab CA,
``meshd ca``) and ``consul`` (Consul's Connect CA, in the consul plugin's distribution).

The control process runs the provider and publishes what it yields, checked, to two
private files (``paths``): the chain and key, and the roots. Workers build their TLS
contexts from those files and rebuild them when the files change, so new handshakes use
the new material while established connections keep theirs (rotation drops nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IdentityPaths:
    """Where the control process publishes the material and workers read it.

    ``pem``: the certificate chain (leaf first) followed by its private key, 0600;
    ``roots``: the trust anchors. The control process writes ``roots`` first and ``pem``
    last, each by write-to-temp-then-rename, so a worker that sees a new ``pem`` (its
    mtime and inode) reads roots at least as new."""

    pem: str
    roots: str


def paths(shm_dir: str, instance: str, master_pid: int) -> IdentityPaths:
    """The published identity files of one meshd (all generations of a master share them:
    a reload does not wait for a new certificate)."""
    base = os.path.join(shm_dir, f"meshd-{instance}-{master_pid}-identity")
    return IdentityPaths(pem=f"{base}.pem", roots=f"{base}-roots.pem")
