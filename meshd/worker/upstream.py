"""Upstream connections of a worker.

``Pool`` keeps idle keep-alive connections per endpoint,
LIFO so the warmest is reused, drops ones the upstream closed while idle, and connects
with a deadline when none is left. Open connections are counted per endpoint row in
shared memory (through ``counter``) so ``max_connections`` holds over all workers: a
connection counts while a request uses it, not while it idles in a pool (an idle one in
another worker must not keep this worker from connecting).
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from gevent.monkey import get_original

from meshd.discovery.api import Endpoint
from meshd.errors import EndpointsBusy, UpstreamError, UpstreamTimeout
from meshd.proto import http1
from meshd.worker.sockio import sendall

MAX_IDLE_PER_ENDPOINT = 128
READ_SIZE = 262144
RECHECK_AFTER = 1.0
_original_poll = get_original("select", "poll")


Counter = Callable[[int, int], None]  # (endpoint row, +1 opened / -1 closed)


def _no_count(row: int, delta: int) -> None:
    pass


class UpstreamConn:
    __slots__ = ("sock", "buf", "endpoint", "reused", "idle_since", "row", "_counter", "in_use")

    def __init__(self, sock: socket.socket, endpoint: Endpoint, row: int = -1,
                 counter: Counter = _no_count) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.endpoint = endpoint
        self.reused = False
        self.idle_since = 0.0
        self.row = row
        self._counter = counter
        self.in_use = False
        self.use()

    def use(self) -> None:
        if not self.in_use:
            self.in_use = True
            self._counter(self.row, 1)

    def unuse(self) -> None:
        if self.in_use:
            self.in_use = False
            self._counter(self.row, -1)

    def close(self) -> None:
        self.unuse()  # counted once, however often closed
        try:
            self.sock.close()
        except OSError:
            pass


class Pool:
    def __init__(self, idle_timeout: float = 60.0, counter: Counter = _no_count,
                 connections: Callable[[int], int] | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.counter = counter
        self.connections = connections  # row -> open connections of all workers
        self._idle: dict[tuple[str, int], list[UpstreamConn]] = {}

    def acquire(self, ep: Endpoint, connect_timeout: float, check: bool = True,
                idle_timeout: float | None = None, row: int = -1, limit: int = 0) -> UpstreamConn:
        """A pooled connection to ``ep``, or a new one. ``check=False`` skips the
        liveness probe (a system call) for connections idle under RECHECK_AFTER: the
        caller can resend a bodiless request if the upstream closed it meanwhile.
        With ``limit``, a new connection is refused (``EndpointsBusy``) when all
        workers together hold that many to the endpoint."""
        stack = self._idle.get(ep.address)
        now = time.monotonic()
        max_idle = self.idle_timeout if idle_timeout is None else idle_timeout
        while stack:
            conn = stack.pop()
            idle = now - conn.idle_since
            if idle < max_idle and (
                    (not check and idle < RECHECK_AFTER) or _still_open(conn.sock)):
                conn.reused = True
                conn.use()
                return conn
            conn.close()
        if limit and row >= 0 and self.connections is not None and self.connections(row) >= limit:
            raise EndpointsBusy(f"{ep} has {limit} open connections (max_connections)")
        return self.connect(ep, connect_timeout, row)

    def connect(self, ep: Endpoint, connect_timeout: float, row: int = -1) -> UpstreamConn:
        family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE: answer 502 with the reason rather than fail the worker
            raise UpstreamError(f"connect to {ep}: no socket: {e.strerror or e}") from None
        sock.settimeout(connect_timeout)
        try:
            sock.connect(ep.address)
        except TimeoutError:
            sock.close()
            raise UpstreamTimeout(f"connect to {ep} timed out") from None
        except OSError as e:
            sock.close()
            raise UpstreamError(f"connect to {ep} failed: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return UpstreamConn(sock, ep, row, self.counter)

    def exchange_bodiless(self, conn: UpstreamConn, head: bytes, connect_timeout: float,
                          read: Callable[[UpstreamConn], http1.ResponseHead],
                          ) -> tuple[UpstreamConn, http1.ResponseHead]:
        """Send a bodiless request head and ``read`` the response head: (the connection
        it went on, the head). A pooled connection the upstream closed as it was reused
        (``acquire`` skips the liveness probe for bodiless requests) gets the request
        again on a new connection: it had no body and got no answer, so that is safe."""
        try:
            try:
                sendall(conn.sock, head)
            except OSError as e:
                raise UpstreamError(f"sending to {conn.endpoint}: {e.strerror or e}") from None
            return conn, read(conn)
        except UpstreamError:
            if not conn.reused:
                raise
            conn.close()
            conn = self.connect(conn.endpoint, connect_timeout, conn.row)
            sendall(conn.sock, head)
            return conn, read(conn)

    def release(self, conn: UpstreamConn) -> None:
        if conn.buf:  # the upstream sent more than the response: not reusable
            conn.close()
            return
        stack = self._idle.setdefault(conn.endpoint.address, [])
        if len(stack) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.unuse()
        stack.append(conn)

    def close_all(self) -> None:
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()


def read_response_head(conn: UpstreamConn, try_deadline: float, deadline: float,
                       limit: int, max_headers: int) -> http1.ResponseHead:
    """The next response head on ``conn`` (an informational 1xx one included: the caller
    decides what to do with it), waiting until ``try_deadline`` (the attempt's; the
    whole request's is ``deadline``, which names the timeout in the error)."""
    buf = conn.buf
    end = buf.find(b"\r\n\r\n")
    while end < 0:
        if len(buf) > limit:
            raise UpstreamError("response head from upstream too large")
        remaining = try_deadline - time.monotonic()
        if remaining <= 0:
            which = "timeout" if try_deadline >= deadline else "try_timeout"
            raise UpstreamTimeout(f"no response from {conn.endpoint} within the {which}")
        conn.sock.settimeout(remaining)
        try:
            data = conn.sock.recv(READ_SIZE)
        except TimeoutError:
            continue
        except OSError as e:
            raise UpstreamError(f"connection to {conn.endpoint} failed: {e.strerror or e}") from None
        finally:
            conn.sock.settimeout(None)
        if not data:
            raise UpstreamError(f"{conn.endpoint} closed the connection before responding")
        start = max(0, len(buf) - 3)
        buf += data
        end = buf.find(b"\r\n\r\n", start)
    head = bytes(buf[: end + 4])
    del buf[: end + 4]
    return http1.parse_response_head(head, max_headers=max_headers)


def _still_open(sock: socket.socket) -> bool:
    """An idle connection is usable when it is not readable: readable means EOF (the
    upstream closed it) or bytes nobody asked for. Asked with the unpatched poll, which
    answers at once (gevent's cooperative recv would wait for readability instead)."""
    poller = _original_poll()
    poller.register(sock.fileno(), select.POLLIN)
    return not poller.poll(0)
