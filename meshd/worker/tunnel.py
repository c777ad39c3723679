"""Byte tunnels after an HTTP/1.1 upgrade (101) or a CONNECT (200): both directions
copied (``meshd.worker.tcp_proxy.pump``: splice where the platform has it) until both
have ended. An upstream over TLS (a WebSocket to a service with ``[service.X.tls]``)
is read and written through its TLS socket instead (recv/sendall, no splice).

Bytes already read past the HTTP head (the client's or the upstream's leftover buffer)
go first. A direction that reaches EOF half-closes its destination, so a peer that
finishes writing still gets its answer. The tunnel ends when both directions have,
when either side resets, or when neither side moved a byte for ``idle_timeout``
(nginx's proxy_read_timeout does the same for WebSockets).
"""

from __future__ import annotations

import socket
import time

import gevent

from meshd.worker.sockio import sendall
from meshd.worker.tcp_proxy import pump

IDLE_CHECK = 1.0


class Tunnel:
    def __init__(self, client: socket.socket, upstream: socket.socket,
                 idle_timeout: float) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.last_activity = time.monotonic()
        self.bytes_up = 0     # client -> upstream
        self.bytes_down = 0   # upstream -> client

    def run(self, client_leftover: bytes = b"", upstream_leftover: bytes = b"") -> None:
        try:
            if client_leftover:
                sendall(self.upstream, client_leftover)
                self._up(len(client_leftover))
            if upstream_leftover:
                sendall(self.client, upstream_leftover)
                self._down(len(upstream_leftover))
        except OSError:
            return
        up = gevent.spawn(pump, self.client, self.upstream, self._up)
        down = gevent.spawn(pump, self.upstream, self.client, self._down)
        try:
            while not (up.dead and down.dead):
                gevent.joinall([up, down], timeout=IDLE_CHECK, count=2)
                if time.monotonic() - self.last_activity > self.idle_timeout:
                    break
        finally:
            gevent.killall([up, down])

    def _up(self, n: int) -> None:
        self.last_activity = time.monotonic()
        self.bytes_up += n

    def _down(self, n: int) -> None:
        self.last_activity = time.monotonic()
        self.bytes_down += n
