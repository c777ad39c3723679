"""Byte tunnels after an HTTP/1.1 upgrade (101) or a CONNECT (200): both directions
copied until both have ended.

Each direction runs in its own greenlet: bytes already read past the HTTP head (the
client's or the upstream's leftover buffer) go first, then recv -> sendall. A direction
that reaches EOF half-closes its destination (SHUT_WR), so a peer that finishes writing
still gets its answer. The tunnel ends when both directions have, when either side
resets, or when neither side moved a byte for ``idle_timeout`` (nginx's
proxy_read_timeout does the same for WebSockets).
"""

from __future__ import annotations

import socket
import time

import gevent

from meshd.worker.sockio import sendall

READ_SIZE = 65536
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
        up = gevent.spawn(self._copy, self.client, self.upstream, client_leftover, True)
        down = gevent.spawn(self._copy, self.upstream, self.client, upstream_leftover, False)
        try:
            while not (up.dead and down.dead):
                gevent.joinall([up, down], timeout=IDLE_CHECK, count=2)
                if time.monotonic() - self.last_activity > self.idle_timeout:
                    break
        finally:
            gevent.killall([up, down])

    def _copy(self, src: socket.socket, dst: socket.socket, first: bytes, upward: bool) -> None:
        try:
            if first:
                sendall(dst, first)
                self._count(len(first), upward)
            while True:
                data = src.recv(READ_SIZE)
                if not data:
                    break
                sendall(dst, data)
                self._count(len(data), upward)
        except OSError:
            # A reset on one side: the other side must learn too, at once.
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _count(self, n: int, upward: bool) -> None:
        self.last_activity = time.monotonic()
        if upward:
            self.bytes_up += n
        else:
            self.bytes_down += n
