"""One client connection, from accept to close: which side serves it.

``serve_connection`` owns the switch between protocols, in one place: a ``tcp``
listener tunnels every connection (``client.tcp``); an ``auto`` listener reads the first
bytes (``client.auto.detect_connection``) and hands the connection to HTTP/1.1, HTTP/2,
a peer meshd's tunnel or opaque TCP; an ``http`` listener serves HTTP/1.1, and a
connection whose first request head is the HTTP/2 preface (prior knowledge, RFC 9113
§3.3) goes on as HTTP/2. A listener that terminates TLS (``mtls`` other than "off", or
``[listener.tls]``) first goes through ``client.inbound_tls``, which hands the decrypted
stream (or the plaintext it lets through) to the same switch with the client's ``Peer``. The HTTP/2 modules (and the ``h2`` library) load on first use.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import gevent

from meshd.proto.detect import Detection
from meshd.worker.client.auto import detect_connection, serve_tunnel
from meshd.worker.client.http1 import HttpConnection
from meshd.worker.client.inbound_tls import serve_tls_listener, terminates
from meshd.worker.client.tcp import serve_opaque
from meshd.worker.peer import PLAINTEXT, Peer

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.context import Context


def serve_connection(ctx: Context, listener: ListenerConfig, client: socket.socket) -> None:
    """Serve ``client`` until it is done (in its own greenlet; the caller closes it)."""
    if terminates(listener):  # mTLS or [listener.tls]: TLS first, then the same switch
        serve_tls_listener(ctx, listener, client)
        return
    serve_detected(ctx, listener, client, PLAINTEXT)


def serve_detected(ctx: Context, listener: ListenerConfig, client: socket.socket,
                   peer: Peer) -> None:
    """Serve ``client`` as its listener's protocol says; every handler gets ``peer``."""
    prefix = b""
    if listener.protocol == "tcp":
        serve_opaque(ctx, listener, client, peer=peer)
        return
    if listener.protocol == "auto":
        result, prefix, dst = detect_connection(ctx, listener, client)
        if result is None:  # the client reset the connection
            return
        if result is Detection.HTTP2:
            _serve_h2(ctx, listener, client, prefix, peer)
            return
        if result is Detection.TUNNEL:
            serve_tunnel(ctx, listener, client, prefix, peer=peer)
            return
        if result is not Detection.HTTP1:
            # TLS (tunneled: meshd does not terminate the application's TLS) or opaque
            serve_opaque(ctx, listener, client, prefix, dst, peer=peer)
            return
    conn = HttpConnection(ctx, listener, client, peer=peer)
    conn.buf += prefix
    me = gevent.getcurrent()
    ctx.connections[me] = conn  # the drain closes it while idle
    preface = conn.serve()
    if preface is not None:  # HTTP/2 with prior knowledge on an http listener
        ctx.connections[me] = None
        _serve_h2(ctx, listener, client, preface, peer)


def _serve_h2(ctx: Context, listener: ListenerConfig, client: socket.socket,
              initial: bytes, peer: Peer) -> None:
    from meshd.worker.client.h2_server import serve_h2  # h2 loads on first use
    serve_h2(ctx, listener, client, initial, peer=peer)
