"""Byte tunnels: both directions of a connection pair copied until both have ended.

Used by opaque TCP (``meshd.worker.client.tcp``: tcp listeners, auto-detected opaque and
TLS connections, meshd-to-meshd tunnels) and by the tunnels after an HTTP/1.1 upgrade
(101) or a CONNECT (200). Each direction is a ``meshd.worker.relay.pump``: a message is
read into a buffer the worker shares and sent (two system calls), bulk is spliced socket
-> pipe -> socket inside the kernel; an upstream over TLS is read and written through its
TLS socket instead.

Bytes already read (the client's or the upstream's leftover buffer) go first. A
direction that reaches EOF half-closes its destination, so a peer that finishes writing
still gets its answer. The tunnel ends, and its caller closes both sockets, when:

- both directions have ended (a half-closed pair is closed once the other side ends too);
- either side resets, or a side accepts no bytes for ``write_timeout``
  (``[limits] write_timeout``): both are shut down at once;
- neither side moved a byte for ``idle_timeout`` (``[limits] tcp_idle_timeout``, or a
  service's shorter ``idle_timeout`` for HTTP tunnels, as nginx's proxy_read_timeout does
  for WebSockets). This also bounds how long a half-closed pair may stay open: a client
  that keeps its side open, silent, after the upstream closed is closed after it.

The idle deadline costs one timer wake-up per ``idle_timeout`` while bytes move: the
pumps only stamp the time, and the waiting greenlet looks at the stamp when its wait ends.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import gevent

from meshd.worker.relay import pump
from meshd.worker.sockio import sendall


class Tunnel:
    def __init__(self, client: socket.socket, upstream: socket.socket, idle_timeout: float,
                 write_timeout: float | None = None,
                 count_up: Callable[[int], None] | None = None,
                 count_down: Callable[[int], None] | None = None) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        self.count_up = count_up      # told of each chunk, as it moves (live byte counters)
        self.count_down = count_down
        self.last_activity = time.monotonic()
        self.bytes_up = 0     # client -> upstream
        self.bytes_down = 0   # upstream -> client
        self.idled = False    # ended by the idle deadline

    def run(self, client_leftover: bytes = b"", upstream_leftover: bytes = b"") -> None:
        try:
            if client_leftover:
                sendall(self.upstream, client_leftover, self.write_timeout)
                self._up(len(client_leftover))
            if upstream_leftover:
                sendall(self.client, upstream_leftover, self.write_timeout)
                self._down(len(upstream_leftover))
        except OSError:
            return
        up = gevent.spawn(pump, self.client, self.upstream, self._up, self.write_timeout)
        down = gevent.spawn(pump, self.upstream, self.client, self._down, self.write_timeout)
        try:
            while not (up.dead and down.dead):
                left = self.last_activity + self.idle_timeout - time.monotonic()
                if left <= 0:
                    self.idled = True
                    return
                gevent.joinall([up, down], timeout=left, count=2)
        finally:
            gevent.killall([up, down])

    def _up(self, n: int) -> None:
        self.last_activity = time.monotonic()
        self.bytes_up += n
        if self.count_up is not None:
            self.count_up(n)

    def _down(self, n: int) -> None:
        self.last_activity = time.monotonic()
        self.bytes_down += n
        if self.count_down is not None:
            self.count_down(n)
