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

The authority (Host, :authority) of HTTP requests is a fourth field, after the three
above (a plaintext key spells tls "false" then)::

    "web\x1ffalse\x1f\x1fweb:8080"              authority="web:8080", plaintext
    "web\x1ftrue\x1fspiffe://td/sa/x\x1fweb"     authority="web", mTLS

A key without it (the three forms above) is the service's row for requests whose
authority has no row of its own: rendered ``authority="_other"``. The Host is the
client's to choose, so authority rows are given only on demand (a worker's
``AUTHORITY_REQUEST`` datagram for the base key and a ``valid_authority``), at most
``MAX_AUTHORITY_ROWS`` per listener; requests before their row is published and past
the cap count under ``_other`` (those past the cap also in
``meshd_label_overflow_total{label="authority"}``).

A ``[[route]]``'s own rows (Linkerd's ``route_*`` families) have keys of their own,
``ROUTE`` then the route's name, assigned up front from the config to every HTTP
outbound listener the route applies to, at most ``MAX_ROUTE_ROWS`` per listener, with
one more, the route ``OVERFLOW`` (``route="_overflow"``), for the rest.

The routes of a config source (``meshd.fleet``) get rows too, when the control process
applies the part that holds them (``RowTable.fleet_routes``), within the same cap, on
every HTTP outbound listener that may route their service. A fleet route's name is
unique only with its service (an HTTPRoute may attach to several Services), so its key
adds the service, Linkerd's ``dst``, after the name::

    "\x1eservice-router/web#0\x1fweb"           route="service-router/web#0", dst="web"

(a ``[[route]]`` key has no ``dst`` field: its host is in the config).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from meshd.discovery.api import Endpoint

SEP = "\x1f"
ROUTE = "\x1e"             # a route row's key: ROUTE + the route's name
OTHER = "other"
MIXED = "mixed"
NO_AUTHORITY = "_other"    # the authority label of a row without one (see above)
OVERFLOW = "_overflow"     # the route label of requests past MAX_ROUTE_ROWS
MAX_CLIENT_IDS = 100       # client identities with their own rows, per inbound listener
MAX_AUTHORITY_ROWS = 100   # rows with an authority, per listener
MAX_ROUTE_ROWS = 100       # [[route]] rows, per listener
MAX_ROUTE_NAME = 600       # characters of a fleet route's name that may get a row
MAX_AUTHORITY = 255        # bytes of an authority that may get a row of its own
ROW_REQUEST = b"\x00row\x00"  # a worker's datagram: ROW_REQUEST + listener + b"\0" + client_id
# A worker's datagram: AUTHORITY_REQUEST + listener + b"\0" + base key + b"\0" + authority
AUTHORITY_REQUEST = b"\x00authority\x00"
# A host name or address, with a port: what a row may be named after (lower case; never
# "_other" or "_overflow", the fixed values).
_AUTHORITY = re.compile(r"[a-z0-9][a-z0-9_.\-]*(:[0-9]{1,5})?|\[[0-9a-f:.]+\](:[0-9]{1,5})?")


class Parts(NamedTuple):
    """What a row key says."""
    service: str
    tls: str          # "false" | "true" | "mixed"
    peer_id: str
    authority: str    # "" for the service's row of requests without an authority row
    route: str        # a route row's route name ("" for every other row)
    dst: str = ""     # a fleet route row's service ("" for every other row)


def key(service: str, tls: bool | str, peer_id: str = "") -> str:
    """The row key of ``service`` for traffic with ``tls`` (True/"true", False/"false"
    or "mixed") and the peer's identity."""
    if tls is False or tls == "false":
        return service
    return f"{service}{SEP}{'true' if tls is True else tls}{SEP}{peer_id}"


def split(row_key: str) -> tuple[str, str, str]:
    """(service, tls, peer identity) of a row key."""
    p = parts(row_key)
    return p.service, p.tls, p.peer_id


def parts(row_key: str) -> Parts:
    """Everything a row key says (see the module docstring)."""
    if row_key.startswith(ROUTE):
        name, sep, dst = row_key[1:].rpartition(SEP)
        return (Parts("", "false", "", "", name, dst) if sep
                else Parts("", "false", "", "", row_key[1:]))
    service, sep, rest = row_key.partition(SEP)
    if not sep:
        return Parts(service, "false", "", "", "")
    tls, _, rest = rest.partition(SEP)
    peer_id, _, authority = rest.partition(SEP)
    return Parts(service, tls, peer_id, authority, "")


def with_authority(base_key: str, authority: str) -> str:
    """The key of the row of ``base_key``'s requests naming ``authority``."""
    service, tls, peer_id = split(base_key)
    return f"{service}{SEP}{tls}{SEP}{peer_id}{SEP}{authority}"


def route_key(route: str) -> str:
    return ROUTE + route


def fleet_route_key(route: str, dst: str) -> str:
    """The row key of a config source's route ``route`` of service ``dst``."""
    return f"{ROUTE}{route}{SEP}{dst}"


def fleet_route_name_ok(route: str) -> bool:
    """May a fleet route's name label a row: not empty, at most MAX_ROUTE_NAME
    characters, no control characters (the store's to choose, like a Host)."""
    return 0 < len(route) <= MAX_ROUTE_NAME and route.isprintable()


OVERFLOW_KEY = ROUTE + OVERFLOW   # the row of routes without one of their own


def authority_of(raw: bytes | None) -> str:
    """The authority a request names, as a row would be named after it: lower case, and
    "" when it may not have a row (absent, too long, or not a host[:port])."""
    if not raw or len(raw) > MAX_AUTHORITY:
        return ""
    text = raw.decode("latin-1").lower()
    return text if _AUTHORITY.fullmatch(text) else ""


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


def authority_groups(rows: Mapping[str, Mapping[str, int]]) -> dict[int, tuple[int, ...]]:
    """Base row -> the rows of its authorities, for every listener of a row map (the
    retry budget is a service's, not an authority's)."""
    groups: dict[int, list[int]] = {}
    for by_key in rows.values():
        for k, row in by_key.items():
            p = parts(k)
            if p.authority:
                base = by_key.get(key(p.service, p.tls, p.peer_id))
                if base is not None:
                    groups.setdefault(base, []).append(row)
    return {base: tuple(rows) for base, rows in groups.items()}
