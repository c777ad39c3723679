"""The keys of metric rows: which (service, tls, peer identity) a row counts.

A metric row is found by (listener, key) in the snapshot's row map (``Snapshot.rows``).
The key of a row counting plaintext traffic is the service name alone, as it always was;
a row counting mTLS traffic adds the peer's identity after a separator that neither a
service name nor a SPIFFE ID can hold::

    "web"                                       tls="false"
    "web\\x1ftrue\\x1fspiffe://td/ns/x/sa/web"     tls="true", the peer's SPIFFE ID
    "web\\x1ftrue\\x1f"                           tls="true", no client certificate
    "web\\x1ftrue\\x1fother"                      tls="true", an identity without a row
    "web\\x1fmixed\\x1f"                          outbound: endpoints differ (see below)

The peer is the client (``client_id``) on an inbound listener and the endpoint's expected
server identity (``server_id``) on an outbound one.

Who assigns them (the control process, ``meshd.control.discovery``): outbound rows up front
from the snapshot, since each endpoint's identity is known there; inbound rows of a client
identity when a worker first sees it (a datagram on the control socket, ``ROW_REQUEST``),
at most ``MAX_CLIENT_IDS`` identities per listener -- the rest, and requests that come
before their row is published (one snapshot poll), count under ``client_id="other"``.

An outbound request's row is chosen before its endpoint is picked (the request counter
moves on arrival): when a service's endpoints do not all share one (tls, identity) --
a migration to mTLS in progress -- its requests count under ``tls="mixed"``.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshd.discovery.api import Endpoint

SEP = "\x1f"
OTHER = "other"
MIXED = "mixed"
MAX_CLIENT_IDS = 100       # client identities with their own rows, per inbound listener
ROW_REQUEST = b"\x00row\x00"  # a worker's datagram: ROW_REQUEST + listener + b"\0" + client_id


def key(service: str, tls: bool | str, peer_id: str = "") -> str:
    """The row key of ``service`` for traffic with ``tls`` (True/"true", False/"false"
    or "mixed") and the peer's identity."""
    if tls is False or tls == "false":
        return service
    return f"{service}{SEP}{'true' if tls is True else tls}{SEP}{peer_id}"


def split(row_key: str) -> tuple[str, str, str]:
    """(service, tls, peer identity) of a row key."""
    service, sep, rest = row_key.partition(SEP)
    if not sep:
        return service, "false", ""
    tls, _, peer_id = rest.partition(SEP)
    return service, tls, peer_id


def upstream_identity(identity_on: bool, ep: Endpoint) -> str:
    """The server identity mTLS to ``ep`` expects ("" for plaintext): with ``[identity]``
    set, a meshed endpoint (reached through its meshd's inbound port) that discovery
    gives an identity (IDENTITY.md decision 4)."""
    if identity_on and ep.meshed and ep.inbound_port and ep.identity:
        return ep.identity
    return ""


def outbound_key(identity_on: bool, service: str, endpoints: Sequence[Endpoint]) -> str:
    """The row key of a request to ``service`` over ``endpoints``."""
    if not identity_on or not endpoints:
        return service
    first = upstream_identity(True, endpoints[0])
    for ep in endpoints[1:]:
        if upstream_identity(True, ep) != first:
            return key(service, MIXED)
    return key(service, bool(first), first)


def inbound_key(service: str, tls: bool, client_id: str) -> str:
    return key(service, tls, client_id)
