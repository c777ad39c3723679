"""Opaque TCP proxying: where an opaque connection goes; its bytes pass through both
ways in a ``meshd.worker.tunnel.Tunnel`` (splice where the platform has it), counted per
direction, until both sides have ended, a side stops accepting bytes for ``[limits]
write_timeout``, or no byte moved either way for ``[limits] tcp_idle_timeout``.

The destination of an opaque connection: an inbound listener's ``forward`` address; an
outbound listener's ``service`` (balanced over its endpoints); otherwise, on an outbound
listener without a service, the connection's original destination when iptables
redirected it to the listener (SO_ORIGINAL_DST). With none of these the connection is
closed. Bytes a protocol-detecting listener already read go upstream first.

An endpoint that discovery marks meshed (with an ``inbound_port``) is reached through
the meshd in front of it: the connection goes to that inbound port, and one line,
``MESHD-TUNNEL <port>\r\n`` (``meshd.proto.detect``), names the endpoint's own port
before the client's bytes; the peer's auto inbound listener reads it and tunnels the
rest to that port of its ``forward`` host, when its ``tunnel_ports`` lists the port
(``meshd.worker.client.auto``); nothing else may be named: the host is always the
peer's own. When this meshd has ``[identity]`` and discovery gives the endpoint an
identity, the connection is mTLS first (``meshd.worker.upstream.mesh_tls``, the server's
identity checked) and the line goes inside it; the peer honours tunnels only from an
authenticated peer once it has ``[identity]``.
"""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import TYPE_CHECKING

from meshd import rowkeys
from meshd.config import DEFAULT_SERVICE
from meshd.discovery.api import Endpoint
from meshd.errors import NoEndpoints, NoService, ProxyError
from meshd.proto.detect import tunnel_header
from meshd.ratelog import Throttle
from meshd.shm import F_READ_BYTES, F_WRITE_BYTES, ROW_OVERFLOW
from meshd.worker.call import inbound_row
from meshd.worker.peer import PLAINTEXT, Peer
from meshd.worker.sockio import address_name
from meshd.worker.tunnel import Tunnel
from meshd.worker.upstream.mesh_tls import mesh_target

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.snapshot import Snapshot
    from meshd.worker.context import Context
    from meshd.worker.upstream.http1 import UpstreamConn
    from meshd.worker.upstream.tls import TlsTarget

log = logging.getLogger("meshd.worker")
# Any client can open connections that fail (no destination, unknown service, refused
# upstream): those lines are rate-limited per listener and kind.
quiet = Throttle(log)

# linux/netfilter_ipv4.h SO_ORIGINAL_DST (level SOL_IP); IP6T_SO_ORIGINAL_DST has the same
# number at level SOL_IPV6.
SO_ORIGINAL_DST = 80


def serve_opaque(worker: Context, listener: ListenerConfig, client: socket.socket,
                 initial: bytes = b"", original_dst: tuple[str, int] | None = None,
                 target: Endpoint | None = None, peer: Peer = PLAINTEXT) -> None:
    """Tunnel ``client`` to the listener's destination (see the module docstring),
    ``initial`` (bytes already read from the client) sent first. ``original_dst``: the
    connection's original destination if the caller already asked for it; ``target``:
    a destination decided by the caller (a peer meshd's tunnel header); ``peer``: who
    the client is (mTLS), for authorization: a refused peer is closed unconnected."""
    gate = worker.authz
    if gate.covers(listener) and not gate.tcp(worker, listener, peer):
        return
    connected = _connect(worker, listener, client, original_dst, target, peer)
    if connected is None:
        return
    upstream, row, header = connected
    stripe = worker.stripe
    limits = worker.config.limits
    try:
        tunnel = Tunnel(client, upstream.sock, limits.tcp_idle_timeout, limits.write_timeout,
                        partial(stripe.add, row, F_READ_BYTES),  # per message: no frame of
                        partial(stripe.add, row, F_WRITE_BYTES))  # our own (C's partial)
        tunnel.run(header + initial)
        if tunnel.idled:
            log.debug("%s: closed an opaque connection from %s idle for %gs",
                      listener.name, peer_name(client), limits.tcp_idle_timeout)
    finally:
        upstream.close()


def _connect(worker: Context, listener: ListenerConfig, client: socket.socket,
             original_dst: tuple[str, int] | None, target: Endpoint | None = None,
             peer: Peer = PLAINTEXT) -> tuple[UpstreamConn, int, bytes] | None:
    """The upstream connection, the metric row of its bytes and a header to send first
    (a meshed endpoint is reached through its meshd's inbound port, told the target
    port in one line); None (logged) when there is no destination or it cannot be
    reached."""
    snap = worker.snapshot
    timeout = DEFAULT_SERVICE.connect_timeout  # a listener's fixed forward has no service
    header = b""
    row_key: str | None = None  # with [identity]: by the endpoints' identity (meshd.rowkeys)
    tls: TlsTarget | None = None  # mTLS to a meshed endpoint's meshd
    try:
        if target is not None:
            assert listener.forward is not None
            service = str(listener.forward)
            ep = target
        elif listener.direction == "inbound":
            assert listener.forward is not None
            service = str(listener.forward)
            ep = Endpoint(listener.forward.host, listener.forward.port)
        elif listener.service:
            service = listener.service
            endpoints = worker.resolve(service)
            if endpoints is None:
                raise NoService(worker.snapshot.unknown_reason(service))
            if not endpoints:
                raise NoEndpoints(f"service {service!r} has no endpoints")
            svc = worker.config.services.get(service)
            row_key = rowkeys.outbound_key(worker.config.identity is not None, service,
                                           endpoints)
            i, _row = worker.balancer.pick(service, endpoints, snap.endpoint_rows, svc)
            ep = endpoints[i]
            if svc is not None:
                timeout = svc.connect_timeout
            if ep.meshed and ep.inbound_port:
                header = tunnel_header(ep.port)
                tls = mesh_target(worker, ep, _metric_row(snap, listener.name,
                                                          row_key or service))
                ep = Endpoint(ep.host, ep.inbound_port)
        else:
            service = ""
            dst = original_dst or original_destination(client)
            if dst is None or dst == _local_address(client):
                quiet.info(f"{listener.name}: no destination",
                           "%s: no destination for an opaque connection from %s: the listener "
                           "has no service and the connection was not redirected to it "
                           "(SO_ORIGINAL_DST is the listener's own address); closing it",
                           listener.name, peer_name(client))
                return None
            ep = Endpoint(dst[0], dst[1])
        upstream = worker.pool.connect(ep, timeout, tls=tls)
    except ProxyError as e:
        quiet.warning(f"{listener.name}: {type(e).__name__}", "%s: %s", listener.name, e.reason)
        return None
    if listener.direction == "inbound":  # by the peer too (meshd.rowkeys)
        return upstream, inbound_row(worker, listener, service, peer), header
    return upstream, _metric_row(snap, listener.name, row_key or service), header


def _metric_row(snap: Snapshot, listener: str, row_key: str) -> int:
    """The metric row of an opaque connection: its (listener, service) -- with
    ``[identity]``, its row key (``meshd.rowkeys``) -- else the listener's own."""
    row = snap.row(listener, row_key)
    if row is None:
        row = snap.row(listener, "")
    return ROW_OVERFLOW if row is None else row


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client connected to: SO_ORIGINAL_DST when netfilter redirected the
    connection (iptables REDIRECT/DNAT), else the socket's local address. None when the
    socket has no address any more (the client is gone)."""
    local = _local_address(sock)
    if local is None:
        return None
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    except OSError:  # no conntrack entry (not redirected) or no netfilter at all
        pass
    return local


def redirected_destination(sock: socket.socket) -> tuple[str, int] | None:
    """The original destination of a connection iptables redirected to its listener;
    None when it was not redirected (the client connected to the listener itself)."""
    dst = original_destination(sock)
    return None if dst is None or dst == _local_address(sock) else dst


def _local_address(sock: socket.socket) -> tuple[str, int] | None:
    try:
        addr = sock.getsockname()
    except OSError:
        return None
    return str(addr[0]), int(addr[1])


def peer_name(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "a client that is gone"
    return address_name((str(addr[0]), addr[1]))
