"""What a listener does with a client's ``X-Forwarded-For`` and ``Forwarded`` fields
(``[[listener]] forwarded``), sans-IO.

Behind meshd every request comes from meshd's own address (127.0.0.1 on an inbound
listener), so an application that trusts loopback proxies believes whatever address
the client wrote in these fields. An inbound listener therefore replaces them by
default with the address of the peer meshd accepted the connection from:

- ``replace``: the client's ``X-Forwarded-For`` and ``Forwarded`` fields are removed;
  ``X-Forwarded-For: <peer>`` and ``Forwarded: for=<peer>`` (RFC 7239 §4, an IPv6
  address quoted and bracketed: ``for="[::1]"``) are added.
- ``append``: the peer is appended to the client's fields (one field each, the
  client's values first, joined with ", "; the fields are added when the client sent
  none). Only the last element is meshd's word.
- ``keep``: the fields pass untouched (the default on outbound listeners).

Only the client's address is set: no ``proto``, ``host`` or ``by`` parameter and no
``X-Forwarded-Proto``/``-Host`` (meshd does not terminate TLS on inbound listeners, so
there is nothing to say about the scheme that the application does not know).
"""

from __future__ import annotations

from collections.abc import Sequence

Headers = Sequence[tuple[bytes, bytes]]

XFF = b"x-forwarded-for"
FORWARDED = b"forwarded"
MODES = ("replace", "append", "keep")


def forwarded_node(peer: bytes) -> bytes:
    """The RFC 7239 node of an address: IPv6 quoted and in brackets."""
    return b'"[%s]"' % peer if b":" in peer else peer


def apply(headers: Headers, mode: str, peer: bytes, h2: bool = False,
          ) -> list[tuple[bytes, bytes]]:
    """``headers`` with the forwarding fields as ``mode`` says, for a connection from
    ``peer`` (its IP address; b"" when unknown: the client's fields are then dropped
    by replace and left as they are by append). ``h2``: the added names lower-case
    (HTTP/2), else ``X-Forwarded-For``/``Forwarded``. Other fields keep their order;
    the forwarding fields go last."""
    if mode == "keep":
        return list(headers)
    xff_name, fwd_name = (XFF, FORWARDED) if h2 else (b"X-Forwarded-For", b"Forwarded")
    out: list[tuple[bytes, bytes]] = []
    xff: list[bytes] = []
    fwd: list[bytes] = []
    for k, v in headers:
        name = k.lower()
        if name == XFF:
            xff.append(v)
        elif name == FORWARDED:
            fwd.append(v)
        else:
            out.append((k, v))
    if mode == "replace":
        xff, fwd = [], []
    elif not peer:  # append, the peer unknown: nothing to add, nothing to change
        return list(headers)
    xff = [v for v in xff if v.strip()]
    fwd = [v for v in fwd if v.strip()]
    if peer:
        xff.append(peer)
        fwd.append(b"for=" + forwarded_node(peer))
    if xff:
        out.append((xff_name, b", ".join(xff)))
    if fwd:
        out.append((fwd_name, b", ".join(fwd)))
    return out
