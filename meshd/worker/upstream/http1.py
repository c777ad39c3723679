"""Upstream connections of a worker.

``Pool`` keeps idle keep-alive connections per endpoint,
LIFO so the warmest is reused, drops ones the upstream closed while idle, and connects
with a deadline when none is left. ``reap`` (the worker's reaper, every ``REAP_EVERY``)
closes the idle ones past their ``idle_timeout`` and the ones the upstream closed or
wrote to while idle (one ``poll`` over all of them): none is kept for ever, and none
stays in CLOSE_WAIT. Open connections are counted per endpoint row in
shared memory (through ``counter``) so ``max_connections`` holds over all workers: a
connection counts while a request uses it, not while it idles in a pool (an idle one in
another worker must not keep this worker from connecting).

A service with ``[service.NAME.tls]`` passes its ``TlsTarget``: its connections are
TLS (pooled apart from plaintext ones to the same address), and a new one carries in
``alpn`` what the endpoint selected, so the caller can hand an "h2" one to the HTTP/2
pool. ``sockio`` reads and writes TLS sockets through their own calls.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gevent.monkey import get_original

from meshd.discovery.api import Endpoint
from meshd.errors import EndpointsBusy, NotSent, UpstreamError, UpstreamTimeout
from meshd.proto import http1
from meshd.shm import F_IDLE_REAPED, Stripe
from meshd.worker.sockio import raw_socket, recv, recv_after_wait, sendall, shutdown

if TYPE_CHECKING:
    from meshd.worker.upstream.tls import TlsTarget

MAX_IDLE_PER_ENDPOINT = 128
# A read (a head with whatever of the body came along, or body bytes) stays under
# glibc's 128 KiB mmap threshold: a larger one, with the heap's top short of it, is an
# mmap, then an mremap as the bytes shrink to what came, then a munmap, per read (seen
# under HTTP/2 load: 3 of 5.2 system calls per request; docs/perf/two-hop.md).
READ_SIZE = 65536
RECHECK_AFTER = 1.0
REAP_EVERY = 0.5     # the worker's reaper looks at idle upstream connections this often
REAP_BATCH = 4096    # idle connections one reap looks at, at most (the rest next time)
_original_poll = get_original("select", "poll")


# (endpoint row, +1 opened / -1 closed): called for rows >= 0 only (a connection to an
# endpoint without a row counts nowhere), so that it can be the stripe's own method.
Counter = Callable[[int, int], None]


def _no_count(row: int, delta: int) -> None:
    pass


PoolKey = tuple[str, int, str]  # host, port, the TLS target's service ("": plaintext)


def pool_key(ep: Endpoint, tls: TlsTarget | None) -> PoolKey:
    return (ep.host, ep.port, tls.service if tls is not None else "")


class UpstreamConn:
    __slots__ = ("sock", "buf", "endpoint", "reused", "idle_since", "row", "_counter", "in_use",
                 "tls", "alpn", "request_sent", "max_idle", "metric_row", "key")

    def __init__(self, sock: socket.socket, endpoint: Endpoint, row: int = -1,
                 counter: Counter = _no_count, tls: TlsTarget | None = None,
                 alpn: str = "") -> None:
        self.sock = sock
        self.tls = tls
        self.alpn = alpn  # what ALPN selected, on a new TLS connection ("" otherwise)
        self.buf = bytearray()
        self.endpoint = endpoint
        self.reused = False
        self.idle_since = 0.0
        self.row = row
        self._counter = counter
        self.in_use = False
        # Set by whoever sends the request's last byte (head of a bodiless request, last
        # piece of a body); ``Pool.release`` closes a connection without it: a request
        # that ended short would make the upstream read the next request as its body.
        self.request_sent = False
        self.max_idle = 0.0  # the idle_timeout of its last request (0: the pool's)
        self.metric_row = -1  # the (listener, service) row of its last request (events)
        self.key = pool_key(endpoint, tls)  # where the pool keeps it idle
        self.use()

    def use(self) -> None:
        if not self.in_use:
            self.in_use = True
            if self.row >= 0:
                self._counter(self.row, 1)

    def unuse(self) -> None:
        if self.in_use:
            self.in_use = False
            if self.row >= 0:
                self._counter(self.row, -1)

    def sendall(self, data: bytes) -> None:
        sendall(self.sock, data)

    def send_first(self, data: bytes) -> int:
        """One send of the first bytes of a request: how many the kernel took (at least
        one; the caller sends the rest), or ``NotSent`` when it took none (the connection
        was reset or closed: nothing of the request went, so it may be sent again
        whatever its method)."""
        try:
            return int(self.sock.send(data))
        except OSError as e:
            raise NotSent(f"write failed before sending to {self.endpoint}: "
                          f"{e.strerror or e}") from None

    def send_request(self, data: bytes) -> None:
        """All of a bodiless request (``send_first``, inline: a call less per request;
        then the rest)."""
        sock: Any = self.sock
        try:
            if self.tls is None:
                try:  # the raw non-blocking socket first: no gevent send frame
                    sent = raw_socket(sock).send(data)
                except BlockingIOError:  # no room yet: gevent's send waits for some
                    sent = sock.send(data)
            else:
                sent = sock.send(data)
        except OSError as e:
            raise NotSent(f"write failed before sending to {self.endpoint}: "
                          f"{e.strerror or e}") from None
        if sent < len(data):
            sendall(sock, data[sent:])

    def read_body(self, idle_timeout: float, required: bool = True) -> bytes:
        """Response body bytes: what is buffered, else one read within ``idle_timeout``.
        At EOF b"", or ``UpstreamError`` when ``required`` (the body is not complete)."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        try:
            data = recv(self.sock, READ_SIZE, idle_timeout)
        except TimeoutError:
            raise UpstreamTimeout("response body stalled") from None
        except OSError as e:
            raise UpstreamError(f"reading from {self.endpoint}: {e.strerror or e}") from None
        if not data and required:
            raise UpstreamError(f"{self.endpoint} closed the connection inside the response body")
        return data

    def shutdown(self) -> None:
        """Shut the connection down both ways (a waiting reader sees EOF)."""
        shutdown(self.sock, socket.SHUT_RDWR)

    def detach(self) -> Any:
        """Hand the socket to someone else (the HTTP/2 pool): no longer counted here."""
        self.unuse()
        sock = self.sock
        self.buf.clear()
        return sock

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
        # The worker's stripe: idle connections reaped are counted on the row of their
        # last request (meshd.shm UPSTREAM_EVENTS "idle_reaped").
        self.events: Stripe | None = None
        self._idle: dict[PoolKey, list[UpstreamConn]] = {}

    def acquire(self, ep: Endpoint, connect_timeout: float, check: bool = True,
                idle_timeout: float | None = None, row: int = -1, limit: int = 0,
                tls: TlsTarget | None = None) -> UpstreamConn:
        """A pooled connection to ``ep``, or a new one. ``check=False`` skips the
        liveness probe (a system call) for connections idle under RECHECK_AFTER: the
        caller can resend a bodiless request if the upstream closed it meanwhile.
        With ``limit``, a new connection is refused (``EndpointsBusy``) when all
        workers together hold that many to the endpoint. ``tls``: the service's TLS
        target (connections over TLS, pooled apart)."""
        stack = self._idle.get(pool_key(ep, tls))
        if stack:
            now = time.monotonic()
            max_idle = self.idle_timeout if idle_timeout is None else idle_timeout
            while stack:
                conn = stack.pop()
                idle = now - conn.idle_since
                if idle < max_idle and (
                        (not check and idle < RECHECK_AFTER) or _still_open(conn)):
                    conn.reused = True
                    conn.use()
                    return conn
                conn.close()
        if limit and row >= 0 and self.connections is not None and self.connections(row) >= limit:
            raise EndpointsBusy(f"{ep} has {limit} open connections (max_connections)")
        return self.connect(ep, connect_timeout, row, tls)

    def connect(self, ep: Endpoint, connect_timeout: float, row: int = -1,
                tls: TlsTarget | None = None) -> UpstreamConn:
        family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE: answer 502 with the reason rather than fail the worker
            raise UpstreamError(f"connect to {ep}: no socket: {e.strerror or e}") from None
        sock.settimeout(connect_timeout)
        started = time.monotonic() if tls is not None else 0.0
        try:
            sock.connect(ep.address)
        except TimeoutError:
            sock.close()
            raise UpstreamTimeout(f"connect to {ep} timed out") from None
        except OSError as e:
            sock.close()
            raise UpstreamError(f"connect to {ep} failed: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is None:
            # Every wait on it from here on names its own timeout (sockio's reads, the
            # writers'), none inherits the connect timeout.
            sock.settimeout(None)
            return UpstreamConn(sock, ep, row, self.counter)
        left = connect_timeout - (time.monotonic() - started)  # the handshake shares it
        tls_sock, selected = tls.handshake(sock, ep.address, left)
        return UpstreamConn(tls_sock, ep, row, self.counter, tls, selected)

    def exchange_bodiless(self, conn: UpstreamConn, head: bytes, connect_timeout: float,
                          read: Callable[[UpstreamConn], http1.ResponseHead],
                          ) -> tuple[UpstreamConn, http1.ResponseHead]:
        """Send a bodiless request head and ``read`` the response head: (the connection
        it went on, the head). A pooled connection the upstream closed as it was reused
        (``acquire`` skips the liveness probe for bodiless requests) gets the request
        again on a new connection: it had no body and got no answer, so that is safe."""
        try:
            try:
                conn.send_request(head)
            except OSError as e:
                raise UpstreamError(f"sending to {conn.endpoint}: {e.strerror or e}") from None
            conn.request_sent = True
            return conn, read(conn)
        except UpstreamError:
            if not conn.reused:
                raise
            conn.close()
            conn = self.connect(conn.endpoint, connect_timeout, conn.row, conn.tls)
            if conn.alpn == "h2":  # the endpoint switched to HTTP/2 (remembered for the retry)
                conn.close()
                raise UpstreamError(f"{conn.endpoint} now selects ALPN h2 over TLS") from None
            conn.send_request(head)
            conn.request_sent = True
            return conn, read(conn)

    def release(self, conn: UpstreamConn) -> None:
        """Keep ``conn`` for the next request, unless it cannot carry one cleanly: the
        upstream sent more than the response, or the request was not sent in full (its
        body ended short: the upstream would take the next request's bytes for the rest
        of it, request smuggling)."""
        if conn.buf or not conn.request_sent:
            conn.close()
            return
        conn.request_sent = False  # for the next request on it
        conn.alpn = ""
        stack = self._idle.get(conn.key)
        if stack is None:
            stack = self._idle[conn.key] = []
        elif len(stack) >= MAX_IDLE_PER_ENDPOINT:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.unuse()
        stack.append(conn)

    def idle_count(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    def reap(self, now: float) -> int:
        """Close the idle connections past their idle timeout, and those the upstream
        closed (EOF: CLOSE_WAIT otherwise) or sent bytes nobody asked for while idle;
        forget endpoints left without any. At most REAP_BATCH connections are looked at
        per call (the rest at the next); how many were closed."""
        closed = 0
        looked = 0
        kept: list[UpstreamConn] = []
        for key, stack in list(self._idle.items()):
            if looked >= REAP_BATCH:
                break
            looked += len(stack)
            keep = []
            for conn in stack:
                if now - conn.idle_since >= (conn.max_idle or self.idle_timeout):
                    conn.close()
                    closed += 1
                    if self.events is not None and conn.metric_row >= 0:
                        self.events.add(conn.metric_row, F_IDLE_REAPED)
                else:
                    keep.append(conn)
            stack[:] = keep
            kept.extend(keep)
            if not stack:
                del self._idle[key]
        gone = _closed_while_idle(kept)
        for conn in gone:
            key = conn.key
            left = self._idle.get(key)
            if left is not None and conn in left:
                left.remove(conn)
                if not left:
                    del self._idle[key]
            conn.close()
        return closed + len(gone)

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
    end = buf.find(b"\r\n\r\n") if buf else -1
    while end < 0:
        if len(buf) > limit:
            raise UpstreamError("response head from upstream too large")
        remaining = try_deadline - time.monotonic()
        if remaining <= 0:
            which = "timeout" if try_deadline >= deadline else "try_timeout"
            raise UpstreamTimeout(f"no response from {conn.endpoint} within the {which}")
        try:
            # Wait, then read: nothing can be there yet the first time round.
            data = recv_after_wait(conn.sock, READ_SIZE, remaining)
        except TimeoutError:
            continue
        except OSError as e:
            raise UpstreamError(f"connection to {conn.endpoint} failed: {e.strerror or e}") from None
        if not data:
            raise UpstreamError(f"{conn.endpoint} closed the connection before responding")
        start = len(buf) - 3
        buf += data
        end = buf.find(b"\r\n\r\n", start if start > 0 else 0)
    head = bytes(buf[: end + 4])
    del buf[: end + 4]
    return http1.parse_response_head(head, max_headers=max_headers)


def _closed_while_idle(conns: list[UpstreamConn]) -> list[UpstreamConn]:
    """Those of ``conns`` that are not usable any more, found with one ``poll`` (readable
    means EOF or unasked bytes; a TLS one is asked again, as ``_still_open`` does)."""
    if not conns:
        return []
    poller = _original_poll()
    by_fd = {}
    for conn in conns:
        try:
            fd = conn.sock.fileno()
        except OSError:
            continue
        if fd < 0:
            continue
        by_fd[fd] = conn
        poller.register(fd, select.POLLIN)
    gone = []
    for fd, _ in poller.poll(0):
        found = by_fd.get(fd)
        if found is not None and (found.tls is None or not _still_open(found)):
            gone.append(found)
    return gone


def _still_open(conn: UpstreamConn) -> bool:
    """An idle connection is usable when it is not readable: readable means EOF (the
    upstream closed it) or bytes nobody asked for. Asked with the unpatched poll, which
    answers at once (gevent's cooperative recv would wait for readability instead).

    Over TLS a readable socket may hold only TLS records without data (TLS 1.3 session
    tickets arrive after the handshake): a non-blocking read consumes them and tells
    "nothing yet" (still open) from EOF or data (not usable)."""
    sock = conn.sock
    poller = _original_poll()
    poller.register(sock.fileno(), select.POLLIN)
    readable = bool(poller.poll(0))
    if conn.tls is None:
        return not readable
    tls: Any = sock
    if tls.pending():
        return False
    if not readable:
        return True
    tls.settimeout(0.0)
    try:
        tls.recv(1)  # data or EOF: either way not a connection to send a request on
        return False
    except ssl.SSLWantReadError:
        return True
    except OSError:
        return False
    finally:
        tls.settimeout(None)
