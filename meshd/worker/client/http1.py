"""HTTP/1.1 reverse proxying of one client connection (runs in its own greenlet).

For each request on a keep-alive connection: read and parse the head (bounded size,
deadline), route it (outbound: Host -> service -> endpoint; inbound: the listener's
``forward`` address), and hand it to its call (``meshd.worker.call``) as its client
side, ``Http1Side``: an attempt over HTTP/1.1 sends the request with hop-by-hop headers
removed and our own framing; one to an HTTP/2 upstream (a service with ``protocol =
"h2"``, a peer meshd's inbound listener, which also gets ``meshd-orig-proto``) sends it
translated (``meshd.proto.translate.h2_request``: pseudo-headers, the body as DATA, its
trailers as HEADERS). The body streams both ways without being held whole (a separate
greenlet sends the request body so an upstream that answers while it reads never
deadlocks us); the response goes back framed by ``response_framing`` whatever the
upstream spoke, and the outcome is counted in this worker's shared-memory stripe.
Errors before the response head answers the client with the error's status and a
one-line reason; after it, the connection is closed.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from gevent import Timeout

from meshd.discovery.api import Endpoint
from meshd.errors import (
    BadRequest,
    HeadersTooLarge,
    ProxyError,
    RequestTimeout,
    UpstreamError,
    UriTooLong,
)
from meshd.proto import forwarded, http1
from meshd.proto.translate import h2_request, response_framing, strip_meshd_error
from meshd.shm import F_READ_BYTES, F_REQUESTS, F_WRITE_BYTES, ROW_UNKNOWN
from meshd.worker import observe
from meshd.worker.call import (
    Call,
    count_route_request,
    error_answer,
    quiet,
    record_response,
    require_endpoints,
    route,
)
from meshd.worker.client.body import ClientGone, RequestBody
from meshd.worker.client.tcp import redirected_destination
from meshd.worker.peer import PLAINTEXT, Peer
from meshd.worker.routing import Policy
from meshd.worker.sockio import peer_address, recv, recv_after_wait, sendall
from meshd.worker.tunnel import Tunnel
from meshd.worker.upstream.exchange import Http1Exchange, UpstreamExchange
from meshd.worker.upstream.http1 import UpstreamConn

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.fleet.rewrite import Rewrite
    from meshd.worker.context import Context

log = logging.getLogger("meshd.worker")

# A head's read (with whatever of the body came along) stays under glibc's 128 KiB mmap
# threshold: a larger one, with the heap's top short of it, is an mmap, then an mremap
# as the bytes shrink to what came, then a munmap, per read (docs/perf/two-hop.md).
READ_SIZE = 65536
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
H2_PRI = b"PRI * HTTP/2.0\r\n\r\n"  # the first part of the HTTP/2 preface
DEFAULT_TIMEOUT = 10.0
BODY_IDLE_TIMEOUT = 60.0


class Idle(Exception):
    """A keep-alive connection ended between requests (EOF, idle timeout or drain)."""


class HttpConnection:
    def __init__(self, worker: Context, listener: ListenerConfig, sock: socket.socket,
                 peer: Peer = PLAINTEXT) -> None:
        self.worker = worker
        self.listener = listener
        self.sock = sock
        self.peer = peer               # who the client is (mTLS), for authorization and labels
        self.buf = bytearray()
        self.limits = worker.config.limits
        self.idle_since = 0.0          # > 0 while waiting for the next request

    # -- the request loop ---------------------------------------------------------------

    def serve(self) -> bytes | None:
        """Requests until the connection ends. Returns what was read when the first head
        is the HTTP/2 preface (``meshd.worker.serve`` goes on with HTTP/2), else None."""
        first = True
        while True:
            try:
                head = self._read_head(first)
            except Idle:
                return None
            except ProxyError as e:
                refused_at = time.monotonic()
                self._answer_error(e, close=True)
                if self.worker.access_log is not None:
                    self._log_rejected(bytes(self.buf), e.status, refused_at)
                return None
            if first and head == H2_PRI:  # HTTP/2 with prior knowledge (RFC 9113 §3.3)
                initial = head + bytes(self.buf)
                self.buf.clear()
                return initial
            first = False
            started = time.monotonic()
            try:
                req = http1.parse_request_head(head, max_request_line=self.limits.request_line_bytes,
                                               max_headers=self.limits.header_count)
                # (an origin-form target, "/...", is never absolute: not asked)
                absolute = None if req.target[:1] == b"/" else http1.split_absolute_form(req.target)
                if absolute is not None:  # the target's authority wins over Host
                    req.host, req.target = absolute
                    req.headers = [(k, v) for k, v in req.headers if k.lower() != b"host"]
                    req.headers.append((b"Host", absolute[0]))
            except ProxyError as e:
                self._answer_error(e, close=True)
                if self.worker.access_log is not None:
                    self._log_rejected(head, e.status, started)
                return None
            try:
                keep = self._proxy(req, started)
            except ClientGone:
                return None
            if not keep:
                return None
            # Draining: a response that already went out with keep-alive promised the
            # client one more request; it gets answered (with Connection: close), or the
            # connection is closed once it has been idle for a grace period.

    def _read_head(self, first: bool) -> bytes:
        """The next request head. Raises Idle when the client leaves between requests."""
        buf = self.buf
        sock = self.sock
        limit = self.limits.header_bytes
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return self._take_head(end)
        self.idle_since = time.monotonic()
        timeout = self.limits.client_idle_timeout if not buf else self.limits.header_read_timeout
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if buf:
                        raise RequestTimeout("request header read timed out")
                    raise Idle()
                try:
                    # After a response the client has yet to send its next request: wait
                    # for it, then read (no failed read first, see sockio.recv_after_wait).
                    data = recv(sock, READ_SIZE, remaining) if first or buf else \
                        recv_after_wait(sock, READ_SIZE, remaining)
                except TimeoutError:
                    continue
                except OSError:
                    raise Idle() from None
                if not data:
                    if buf and not first:
                        raise BadRequest("connection closed inside a request head")
                    raise Idle()
                if not buf:
                    # The head's own deadline starts with its first byte.
                    self.idle_since = 0.0
                    deadline = time.monotonic() + self.limits.header_read_timeout
                start = max(0, len(buf) - 3)
                buf += data
                line_limit = self.limits.request_line_bytes
                if len(buf) > line_limit + 4 and buf.find(b"\n", 0, line_limit + 4) < 0:
                    raise UriTooLong(f"request line longer than {line_limit} bytes")
                end = buf.find(b"\r\n\r\n", start)
                if end >= 0:
                    if end + 4 > limit:
                        raise HeadersTooLarge()
                    return self._take_head(end)
                if len(buf) > limit:
                    raise HeadersTooLarge()
        finally:
            self.idle_since = 0.0

    def _take_head(self, end: int) -> bytes:
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        return head

    # -- one request --------------------------------------------------------------------

    def _proxy(self, req: http1.RequestHead, started: float) -> bool:
        """Proxy one request. Returns whether the client connection stays open."""
        worker = self.worker
        stripe = worker.stripe
        mode = self.listener.forwarded
        if mode != "keep":
            req.headers = forwarded.apply(req.headers, mode, self._peer_address())
        traced = None
        if worker.tracer is not None:  # the upstream's head carries meshd's span as parent
            req.headers, traced = worker.tracer.begin(req.headers)
        # CONNECT names its destination in the target (authority-form, RFC 9110 §9.3.6)
        authority = req.target if req.method == b"CONNECT" else req.host
        service, endpoints, row, policy = route(worker, self.listener, req.method, authority,
                                                req.target, req.headers, self._redirected,
                                                self.peer)
        self._row = row
        stripe.add(row, F_REQUESTS)
        # -1: no [[route]] (not asked then: a call less per request)
        route_at = count_route_request(worker, self.listener, policy) if policy.route_key else -1
        self.response_started = False
        self._idle_timeout = policy.idle_timeout
        body: RequestBody | None = None
        status = 502
        call: _Call | None = None
        try:
            gate = worker.authz
            if gate.covers(self.listener):  # before anything reaches the application
                gate.http(worker, self.listener, self.peer, req.method, req.target, req.headers)
            if not endpoints or policy.reject:  # else require_endpoints has nothing to say
                endpoints = require_endpoints(service, endpoints, policy, worker.snapshot)
            if req.method == b"CONNECT":
                status = self._connect(service, endpoints, policy)
                return False
            has_body = req.chunked or bool(req.content_length)  # req.has_body
            if has_body and req.expect_continue:
                self._send(CONTINUE)
            if has_body:
                # kept for replay whatever the method: a stream a peer refused, or a
                # request whose first write failed, goes again (meshd.balance.retry)
                body = RequestBody(self, req, True)
            call = _Call(worker, service, endpoints, policy, started + policy.timeout, row,
                         req.method, req.headers, self._peer_address)
            call.body = body
            # a fleet route's filters change what goes upstream, not what is logged
            sent = req if policy.rewrite is None else policy.rewrite.http1(req)
            status, keep = call.run(worker, Http1Side(self, sent, body))
            return keep
        except ProxyError as e:
            status = e.status
            if self.response_started:  # mid-body: the client learns from the closed connection
                name = self.listener.name
                quiet.warning(f"{name}: {type(e).__name__} mid-response",
                              "%s: %s after the response started; closing", name, e.reason)
                return False
            # A body not read (the request refused before it) cannot stay in the stream;
            # a client that sent "Connection: close" (or HTTP/1.0) waits for the close.
            return self._answer_error(e, close=not req.keep_alive
                                      or req.has_body and (body is None or not body.done))
        finally:
            record_response(worker, row, route_at, status, time.monotonic() - started,
                            status >= 500)
            if traced is not None or worker.observing:  # access log, tap, span
                observe.request(worker, self.listener, self._peer_address, self.peer, service,
                                policy.route, req.method, authority, req.target, status, call,
                                started, req.headers, None, traced, self.received, self.sent)
            self.received = self.sent = 0  # the next request's (or refused head's) from 0

    def _log_rejected(self, head: bytes, status: int, started: float) -> None:
        assert self.worker.access_log is not None
        self.worker.access_log.rejected(self.listener, self._peer_address(),
                                        self.peer.client_id, head, status, started, self.sent)
        self.sent = 0

    def _peer_address(self) -> bytes:
        if self._peer is None:
            self._peer = peer_address(self.sock)
        return self._peer

    def _redirected(self) -> tuple[str, int] | None:
        """The connection's original destination when iptables redirected it (asked once)."""
        if self._redirected_to is None:
            self._redirected_to = [redirected_destination(self.sock)]
        return self._redirected_to[0]

    def _upstream_head(self, req: http1.RequestHead) -> bytes:
        headers = http1.strip_hop_by_hop(req.headers, req.connection_tokens)
        if req.expect_continue:
            headers = [(k, v) for k, v in headers if k.lower() != b"expect"]
        framing: list[tuple[bytes, bytes]] = []
        h2c = self.listener.h2c_upgrade
        upgrade = _upgrade_protocols(req, h2c) if req.upgrade else b""
        if upgrade:  # e.g. WebSocket; h2c only where the listener allows it (RFC 9113 §3.1)
            connection = b"Upgrade"
            if h2c and b"http2-settings" in req.connection_tokens:
                connection = b"Upgrade, HTTP2-Settings"
                framing += [(k, v) for k, v in req.headers if k.lower() == b"http2-settings"]
            framing += [(b"Connection", connection), (b"Upgrade", upgrade)]
        if req.chunked:
            framing.append((b"Transfer-Encoding", b"chunked"))
        elif req.content_length is not None:
            framing.append((b"Content-Length", b"%d" % req.content_length))
        return http1.serialize_request_head(req.method, req.target, headers, framing)

    def recv_body(self, size: int) -> bytes:
        """Request body bytes (``meshd.worker.client.body.BodySource``), each read
        within the route's idle timeout."""
        try:
            with Timeout(self._idle_timeout, RequestTimeout("request body read timed out")):
                data = self.sock.recv(size)
        except OSError:
            raise ClientGone() from None
        if not data:
            raise ClientGone()
        return data

    def _informational(self, resp: http1.ResponseHead) -> None:
        """A 1xx head other than 100 goes to the client as it is (our own 100 Continue
        went already, if it asked)."""
        self._send(http1.serialize_response_head(resp.status, resp.reason,
                                                 strip_meshd_error(resp.headers)))

    def _relay_response(self, req: http1.RequestHead, ex: UpstreamExchange,
                        status: int, rewrite: Rewrite | None = None) -> bool:
        """Send the response to the client, whatever the upstream spoke: its head and
        trailers as the exchange translates them, framed by ``response_framing``.
        Returns whether the client connection stays."""
        reason, fields, length, chunked = ex.http1_head()
        if rewrite is not None:  # a fleet route's response header filter
            fields = rewrite.response(fields, False)
        method = req.method
        has_body = http1.response_has_body(method, status)
        extra, chunk_out, keep = response_framing(method, status, req.version,
                                                  req.keep_alive and not self.worker.draining,
                                                  length, chunked, has_body)
        if not has_body:
            ex.skip_body()  # HEAD, 204, 304
        out = [http1.serialize_response_head(status, reason, fields, extra)]
        self.response_started = True
        body = 0  # bytes in ``out`` not yet counted as sent (meshd.worker.observe)
        if has_body:
            idle = self._idle_timeout
            while (data := ex.read(idle)) is not None:
                out.append(http1.encode_chunk(data) if chunk_out else data)
                body += len(data)
                if ex.complete:  # the next read would say so: not asked (a call less)
                    break
                self._send(b"".join(out))
                self.sent += body
                out, body = [], 0
            if chunk_out:
                kept = ex.http1_trailers()
                out.append(http1.encode_trailers(kept) if kept else http1.LAST_CHUNK)
        if out:
            self._send(b"".join(out))
            self.sent += body
        return keep

    # -- tunnels ------------------------------------------------------------------------

    def _switch_protocols(self, req: http1.RequestHead, resp: http1.ResponseHead,
                          conn: UpstreamConn, idle_timeout: float) -> None:
        """The upstream accepted an upgrade (WebSocket): pass its 101 on, then tunnel."""
        if not _upgrade_protocols(req, self.listener.h2c_upgrade):
            raise UpstreamError(f"{conn.endpoint} switched protocols without being asked")
        upgrade = b", ".join(v for k, v in resp.headers if k.lower() == b"upgrade")
        headers = strip_meshd_error(http1.strip_hop_by_hop(resp.headers, resp.connection_tokens))
        extra = [(b"Connection", b"Upgrade")] + ([(b"Upgrade", upgrade)] if upgrade else [])
        self.response_started = True
        self._send(http1.serialize_response_head(101, resp.reason, headers, extra))
        self._tunnel(conn.sock, bytes(conn.buf), idle_timeout)
        conn.buf.clear()

    def _connect(self, service: str, endpoints: tuple[Endpoint, ...], policy: Policy) -> int:
        """CONNECT service:port: a TCP tunnel to one of the service's endpoints, after 200."""
        worker = self.worker
        snap = worker.snapshot
        svc = worker.config.services.get(service)
        index, ep_row = worker.balancer.pick(service, endpoints, snap.endpoint_rows, svc)
        ep = endpoints[index]
        worker.balancer.started(ep_row)
        failed = True
        conn = None
        try:
            conn = worker.pool.connect(ep, policy.connect_timeout, ep_row)
            failed = False
            self.response_started = True
            self._send(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            self._tunnel(conn.sock, b"", policy.idle_timeout)
            return 200
        finally:
            worker.balancer.finished(ep_row, None, failed, svc)
            if conn is not None:
                conn.close()

    def _tunnel(self, upstream: socket.socket, upstream_leftover: bytes, idle_timeout: float) -> None:
        leftover = bytes(self.buf)
        self.buf.clear()
        limits = self.limits
        tunnel = Tunnel(self.sock, upstream, min(idle_timeout, limits.tcp_idle_timeout),
                        limits.write_timeout)
        try:
            tunnel.run(leftover, upstream_leftover)
        finally:  # what it carried each way is the request's "body" (meshd.worker.observe)
            self.received += tunnel.bytes_up
            self.sent += tunnel.bytes_down
        stripe, row = self.worker.stripe, self._row
        stripe.add(row, F_READ_BYTES, tunnel.bytes_up)
        stripe.add(row, F_WRITE_BYTES, tunnel.bytes_down)

    # -- to the client ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """To the client; one that accepts no byte for ``write_timeout`` is dropped
        (ClientGone: the upstream connection of a response in progress is closed, not
        pooled, and its max_connections / max_pending slot freed)."""
        try:
            sendall(self.sock, data, self.limits.write_timeout)
        except TimeoutError:
            quiet.info(f"{self.listener.name}: write timeout",
                               "%s: dropped a client that accepted no bytes for %gs",
                               self.listener.name, self.limits.write_timeout)
            raise ClientGone() from None
        except OSError:
            raise ClientGone() from None

    def _answer_error(self, err: ProxyError, close: bool) -> bool:
        """Answer with the error's status and reason. Returns whether to keep the connection."""
        extra, body = error_answer(err, self.listener)
        close = close or self.worker.draining
        if close:
            extra.append((b"Connection", b"close"))
        try:
            self._send(http1.serialize_response_head(err.status, b"", [], extra) + body)
        except ClientGone:
            return False
        self.sent += len(body)
        return not close

    _idle_timeout = BODY_IDLE_TIMEOUT
    _peer: bytes | None = None
    _redirected_to: list[tuple[str, int] | None] | None = None  # None: not asked yet
    _row = ROW_UNKNOWN
    response_started = False
    # The current request's body bytes, from the client (RequestBody, a tunnel) and to it
    # (the response relay, meshd's error answer, a tunnel): meshd.worker.observe
    received = 0
    sent = 0


class _Call(Call):
    """An HTTP/1.1 request across its attempts, and its body (``body``: set by its
    maker right after ``Call.__init__``, which it does not extend: a call less)."""

    __slots__ = ("body",)
    body: RequestBody | None

    def body_replayable(self) -> bool:
        body = self.body
        return body is None or body.replayable or not body.started


class Http1Side:
    """The HTTP/1.1 client side of one call (``meshd.worker.call.ClientSide``): the
    request goes out as an HTTP/1.1 head (built for the first attempt that goes
    HTTP/1.1) or translated to HTTP/2 (``h2_request``), the body from ``RequestBody``
    whatever the upstream speaks; the response comes back in HTTP/1.1 framing, or a 101
    starts a tunnel."""

    grpc = False

    def __init__(self, conn: HttpConnection, req: http1.RequestHead,
                 body: RequestBody | None) -> None:
        self.conn = conn
        self.req = req
        self.body = body
        self.has_body = body is not None
        self._head: bytes | None = None

    @property
    def response_started(self) -> bool:
        return self.conn.response_started

    def http1_exchange(self, call: Call, conn: UpstreamConn) -> Http1Exchange:
        if self._head is None:
            self._head = self.conn._upstream_head(self.req)
        limits = self.conn.limits
        req = self.req
        return Http1Exchange(self.conn.worker.pool, conn, self._head, req.method,
                             self.send_body if self.has_body else None,
                             call.policy.connect_timeout, limits.header_bytes,
                             limits.header_count, self.conn._informational, upgrade=True,
                             chunked=req.chunked, length=req.content_length)

    def h2_head(self, https: bool, meshed: bool) -> tuple[list[tuple[bytes, bytes]], bool]:
        return h2_request(self.req, https, meshed), True

    def send_body(self, ex: UpstreamExchange) -> bool:
        assert self.body is not None
        return self.body.send(ex)

    def respond(self, call: Call, ex: UpstreamExchange, status: int) -> tuple[int, bool]:
        conn = self.conn
        if status == 101:  # only an HTTP/1.1 exchange made with upgrade=True has one
            assert isinstance(ex, Http1Exchange) and ex.resp is not None
            try:
                conn._switch_protocols(self.req, ex.resp, ex.conn, call.policy.idle_timeout)
            finally:
                ex.conn.close()
            return 101, False
        keep = conn._relay_response(self.req, ex, status, call.policy.rewrite)
        if not ex.finish():
            return status, False  # the client's body was not all read
        return status, keep

    def client_fault(self, e: BaseException) -> BaseException | None:
        error = self.body.error if self.body is not None else None
        if error is None or self.conn.response_started:
            return None
        return error if isinstance(error, ProxyError) else ClientGone()


def _upgrade_protocols(req: http1.RequestHead, h2c: bool = False) -> bytes:
    """The protocols a request asks to upgrade to, h2c left out unless the listener
    allows it ("" when none)."""
    if not req.upgrade:
        return b""
    kept = [p.strip() for p in req.upgrade.split(b",")
            if p.strip() and (h2c or p.strip().lower().split(b"/")[0] != b"h2c")]
    return b", ".join(kept)
