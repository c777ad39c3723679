"""A connection on a ``protocol = "auto"`` listener: detect its protocol
(``meshd.worker.serve.serve_connection`` then hands it over).

The connection's original destination port (SO_ORIGINAL_DST when iptables redirected
it, else the listener's own port) is looked up first: a port in the listener's
``opaque_ports`` skips detection and is tunneled as opaque TCP at once (counted as
``skipped``). Otherwise at most ``PEEK_LIMIT`` (1 KiB) bytes are read, within
``[limits] detect_timeout``, until ``meshd.proto.detect`` decides:

- HTTP/1: the HTTP/1 proxy, with the bytes read so far as its initial buffer;
- TLS or anything else: opaque TCP (``meshd.worker.client.tcp.serve_opaque``), the bytes
  read so far sent upstream first;
- the HTTP/2 preface: the HTTP/2 server (``meshd.worker.client.h2_server.serve_h2``), with the
  bytes read so far (the preface) as its initial input;
- the deadline passes without a decision (a client that waits for the server to speak
  first: SMTP, MySQL...): opaque TCP too, counted as ``timeout``. A partial request
  line is decided on what arrived: HTTP/1 when it has a method, a space and a target
  (the HTTP path then answers 408 or 414 rather than tunnel a near-HTTP request).

The bytes are read, not peeked: a peek returns at once while any byte is waiting, so
waiting for more would spin; the reader owns the bytes and hands them on instead.
Each result is counted on the listener's own row (see ``meshd.shm``, F_DETECT).

A ``MESHD-TUNNEL <port>`` line (a peer meshd's opaque TCP) is honoured only on an
inbound listener whose ``tunnel_ports`` lists the port, and never to one of meshd's own
ports, and once ``[identity]`` is set only from a peer authenticated by mTLS; else the
connection is closed without connecting anywhere, counted as ``tunnel_refused`` and
logged (``meshd.ratelog``: a burst per listener, then a count).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from meshd.config import Address, may_reach
from meshd.discovery.api import Endpoint
from meshd.proto.detect import PEEK_LIMIT, Detection, detect, parse_tunnel
from meshd.ratelog import Throttle
from meshd.shm import DETECT_RESULTS, F_DETECT, ROW_OVERFLOW
from meshd.worker.client.tcp import original_destination, peer_name, serve_opaque
from meshd.worker.peer import PLAINTEXT, Peer

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.context import Context

log = logging.getLogger("meshd.worker")
# Refused tunnels are a client's to trigger at will: their log lines are throttled per
# listener. Module state, one per worker process (as the logger it writes to).
_refusals = Throttle(log)


def detect_connection(ctx: Context, listener: ListenerConfig, client: socket.socket,
                      ) -> tuple[Detection | None, bytes, tuple[str, int] | None]:
    """(what the connection speaks, the bytes read to tell, its original destination when
    asked): ``meshd.worker.serve.serve_connection`` hands it on. None: the client reset
    the connection. A port in ``opaque_ports`` is OPAQUE without a byte read."""
    dst = original_destination(client)
    if dst is not None and dst[1] in listener.opaque_ports:
        _count(ctx, listener, "skipped")
        return Detection.OPAQUE, b"", dst
    prefix, result, timed_out = read_prefix(client, ctx.config.limits.detect_timeout)
    if result is None:  # the client reset the connection
        return None, prefix, dst
    if timed_out and result is Detection.OPAQUE:
        _count(ctx, listener, "timeout")
    elif result is not Detection.TUNNEL:  # counted by serve_tunnel: honoured or refused
        _count(ctx, listener, result.value)
    return result, prefix, dst


def serve_tunnel(ctx: Context, listener: ListenerConfig, client: socket.socket,
                 prefix: bytes, peer: Peer = PLAINTEXT) -> None:
    """A peer meshd's opaque tunnel: the header names a port on this host; the bytes go
    to that port of the inbound listener's ``forward`` host (never elsewhere: a peer
    cannot use the tunnel to reach other hosts), and only when the listener lists the
    port in ``tunnel_ports`` and it is none of meshd's own. Anything else is refused:
    closed without connecting anywhere, counted and logged (throttled)."""
    parsed = parse_tunnel(prefix)
    why = tunnel_refusal(ctx, listener, parsed)
    if not why and ctx.config.identity is not None and not peer.authenticated:
        why = "the peer is not authenticated (mTLS with a client certificate is required " \
              "once [identity] is set)"
    if why:
        _count(ctx, listener, "tunnel_refused")
        _refusals.info(f"{listener.name}: tunnel refused",
                       "%s: refused a meshd tunnel from %s: %s", listener.name,
                       peer_name(client), why)
        return
    assert parsed is not None and listener.forward is not None
    _count(ctx, listener, "tunnel")
    port, rest = parsed
    serve_opaque(ctx, listener, client, rest, None,
                 target=Endpoint(listener.forward.host, port), peer=peer)


def tunnel_refusal(ctx: Context, listener: ListenerConfig,
                   parsed: tuple[int, bytes] | None) -> str:
    """Why a tunnel header is refused ("" when it is honoured)."""
    if parsed is None:
        return "malformed header"
    if listener.direction != "inbound" or listener.forward is None:
        return "not an inbound listener"
    port = parsed[0]
    if port not in listener.tunnel_ports:
        return f"port {port} is not in the listener's tunnel_ports"
    # config.parse refused meshd's own ports already, save those the kernel picked (port 0)
    forward = listener.forward.host
    for admin in (ctx.config.admin.listen, ctx.config.admin.probe_listen):
        if admin is not None and admin.port == port and may_reach(forward, admin):
            return f"port {port} is meshd's admin or probe port"
    for lst, sock in ctx.listeners:
        try:
            host, bound = sock.getsockname()[:2]
        except OSError:  # closed by a drain
            continue
        if bound == port and may_reach(forward, Address(str(host), port)):
            return f"port {port} is meshd's own listener {lst.name!r}"
    return ""


def read_prefix(sock: socket.socket, timeout: float) -> tuple[bytes, Detection | None, bool]:
    """(bytes read, the detection, whether the deadline passed first). Reads at most
    PEEK_LIMIT bytes and waits at most ``timeout``; the detection is None when the
    socket failed (reset)."""
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            result = detect(buf, final=False)
            if result is not Detection.NEED_MORE:
                return buf, result, False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return buf, detect(buf, final=True), True
            sock.settimeout(remaining)
            try:
                data = sock.recv(PEEK_LIMIT - len(buf))
            except TimeoutError:
                continue
            if not data:  # the client half-closed: what it sent is all there is
                return buf, detect(buf, final=True), False
            buf += data
    except OSError:
        return buf, None, False
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass


def _count(ctx: Context, listener: ListenerConfig, result: str) -> None:
    row = ctx.snapshot.row(listener.name, "")
    ctx.stripe.add(ROW_OVERFLOW if row is None else row,
                      F_DETECT + DETECT_RESULTS.index(result))
