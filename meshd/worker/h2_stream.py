"""One HTTP/2 request stream from a client, proxied (``meshd.worker.h2_server`` owns the
connection and hands each stream here in its own greenlet).

``H2ToHttp1`` routes the stream like an HTTP/1.1 request (``meshd.worker.dispatch``) and
exchanges it with an HTTP/1.1 upstream, translating both ways: pseudo headers to a
request line and Host, split cookies joined (RFC 9113 §8.2.3), the body streamed with
Content-Length when the client gave one and chunked otherwise, the response's
hop-by-hop fields dropped and its chunked trailers sent as HTTP/2 trailers. gRPC, a
service with ``protocol = "h2"`` and meshed endpoints go to an HTTP/2 upstream instead
(``_exchange_h2``): headers, DATA, trailers and resets pass as they are.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event
import gevent.queue
import h2.errors

from meshd.errors import HeadersTooLarge, ProxyError, UpstreamError
from meshd.proto import forwarded, http1
from meshd.shm import F_REQUESTS
from meshd.worker.dispatch import (
    MESHD_ERROR,
    ORIG_PROTO,
    Call,
    RetryNow,
    error_kind,
    is_grpc,
    may_retry,
    public_reason,
    require_endpoints,
    route,
    status_kind,
)
from meshd.worker.http_proxy import quiet
from meshd.worker.upstream import read_response_head

if TYPE_CHECKING:
    from meshd.worker.h2_server import H2ServerConnection
    from meshd.worker.h2_upstream import H2Stream
    from meshd.worker.tasks import Task
    from meshd.worker.upstream import UpstreamConn
    from meshd.worker.upstream_tls import TlsTarget

log = logging.getLogger("meshd.worker")


# Connection-specific fields (RFC 9113 §8.2.2) and the ones meshd frames itself.
_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                  b"upgrade", b"te", b"host", b"content-length", b"http2-settings",
                  ORIG_PROTO])
# HTTP/2 to HTTP/2: what h2 validation already refuses, and our own marker.
_H2_DROP = frozenset([b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                      b"upgrade", b"http2-settings", ORIG_PROTO])
# A response from an upstream other than a peer meshd: meshd-error is meshd's alone.
_H2_DROP_RESPONSE = _H2_DROP | {MESHD_ERROR}


class StreamGone(gevent.GreenletExit):
    """The client reset the stream or the connection went away (a GreenletExit: a
    stream task cancelled with it ends quietly, or does not start)."""


_NO_BODY: gevent.queue.Queue[bytes | None] = gevent.queue.Queue(maxsize=1)


class Stream:
    __slots__ = ("id", "headers", "bodiless", "body", "ended", "trailers", "window", "reset",
                 "task", "length", "received")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], bodiless: bool,
                 length: int | None = None) -> None:
        self.id = stream_id
        self.headers = headers
        self.bodiless = bodiless  # HEADERS came with END_STREAM
        # The declared content-length (None: none) and the DATA received so far: the
        # server resets a stream whose DATA total disagrees (RFC 9113 §8.1.1).
        self.length = length
        self.received = 0
        # DATA as it arrives, None at the end (no queue for a request without a body)
        self.body: gevent.queue.Queue[bytes | None] = _NO_BODY if bodiless else gevent.queue.Queue()
        self.ended = False
        self.trailers: list[tuple[bytes, bytes]] = []
        self.window: gevent.event.Event | None = None  # made when flow control blocks a send
        self.reset = False
        self.task: Task | None = None  # the task proxying it (meshd.worker.tasks)


class H2ToHttp1:
    """One HTTP/2 request stream exchanged with an HTTP/1.1 upstream."""

    def __init__(self, server: H2ServerConnection, stream: Stream) -> None:
        self.server = server
        self.stream = stream
        self.worker = server.worker
        self.response_started = False

    def run(self) -> None:
        worker = self.worker
        server = self.server
        started = time.monotonic()
        mode = server.listener.forwarded
        if mode != "keep":
            self.stream.headers = forwarded.apply(self.stream.headers, mode, server.peer(), h2=True)
        pseudo = {k: v for k, v in self.stream.headers if k.startswith(b":")}
        method = pseudo.get(b":method", b"GET")
        target = pseudo.get(b":path", b"/")
        fields = _join_cookies([(k, v) for k, v in self.stream.headers if not k.startswith(b":")])
        self.grpc = is_grpc(fields)
        authority = pseudo.get(b":authority") or next((v for k, v in fields if k == b"host"), None)
        status = 502
        service, endpoints, row, policy = route(worker, server.listener, method, authority,
                                                target, fields, server.redirected)
        worker.stripe.add(row, F_REQUESTS)
        try:
            # [limits] header_count holds for HTTP/2 requests as for HTTP/1.1 ones: within
            # header_bytes, empty fields would be a few thousand (found by make fuzz).
            if len(fields) > server.limits.header_count:
                raise HeadersTooLarge(f"more than {server.limits.header_count} header fields")
            if method == b"CONNECT":
                raise _NotSupported("CONNECT over HTTP/2 is not supported")
            endpoints = require_endpoints(service, endpoints, policy, worker.snapshot)
            call = Call(worker, service, endpoints, policy, started + policy.timeout, row,
                        method, fields, server.peer)
            head = self._upstream_head(method, target, authority, fields)
            status = call.run(worker, lambda more: self._exchange(call, head, more))
        except ProxyError as e:
            status = e.status
            if self.response_started:
                # The upstream's own RST_STREAM code when it reset the stream (CANCEL
                # reaches a gRPC client as CANCELLED), else INTERNAL_ERROR.
                server.reset_stream(self.stream, self.upstream_reset
                                    or h2.errors.ErrorCodes.INTERNAL_ERROR)
            else:
                self._answer_error(e)
        except StreamGone:
            status = 499 if not self.response_started else status
            raise
        finally:
            worker.stripe.record_response(row, status, time.monotonic() - started, status >= 500)

    def _upstream_head(self, method: bytes, target: bytes, authority: bytes | None,
                       fields: list[tuple[bytes, bytes]]) -> bytes:
        headers = [(k, v) for k, v in fields if k not in _HOP]
        framing = [(b"Host", authority or b"")]
        # Content-Length only as the server verified it (h2_server holds the DATA total to
        # it): a bodiless request never announces a body the upstream would wait for.
        length = self.stream.length
        if length is not None and not (self.stream.bodiless and length):
            framing.append((b"Content-Length", b"%d" % length))
        elif not self.stream.bodiless:
            self.chunked = True
            framing.append((b"Transfer-Encoding", b"chunked"))
        return http1.serialize_request_head(method, target, headers, framing)

    def _exchange(self, call: Call, head: bytes, attempts_left: bool) -> int:
        worker = self.worker
        policy = call.policy
        balancer = worker.balancer
        ep, ep_row, sent_at, try_deadline = call.start_attempt(worker)
        proto, address, tls = call.protocol(worker, ep, ep_row, self.grpc, attempts_left)
        conn = None
        if proto == "http1":
            conn = call.acquire(worker, ep, ep_row, sent_at, not self.stream.bodiless, tls,
                                attempts_left)
        if conn is None:  # HTTP/2: gRPC, a meshed peer, protocol = "h2", or ALPN chose h2
            return self._exchange_h2(call, attempts_left, ep_row, address, proto == "meshed",
                                     sent_at, try_deadline, tls)
        failed = True
        rtt: float | None = None
        sender = None
        try:
            body_sent = self.stream.bodiless
            limits = self.server.limits
            if body_sent:
                conn, resp = worker.pool.exchange_bodiless(
                    conn, head, policy.connect_timeout,
                    lambda c: _read_response_head(c, try_deadline, call.deadline,
                                                  limits.header_bytes, limits.header_count))
            else:
                call.replay = False  # the body is not kept: no retry once it started
                sender = gevent.spawn(self._send_body, conn, head, self.chunked, policy.idle_timeout)
                resp = _read_response_head(conn, try_deadline, call.deadline,
                                           limits.header_bytes, limits.header_count)
            rtt = time.monotonic() - sent_at
            kind = status_kind(resp.status)
            failed = kind in policy.failure_on
            if failed and body_sent and may_retry(worker, call, kind, attempts_left):
                raise RetryNow()
            self._relay_response(resp, conn, policy.idle_timeout, self.stream.headers)
            if sender is not None:
                sender.join()
                if not sender.successful() or sender.value is not True:
                    conn.close()
                    return resp.status
            if resp.keep_alive and self._upstream_clean:
                worker.pool.release(conn)
            else:
                conn.close()
            return resp.status
        except BaseException as e:
            if sender is not None:
                sender.kill()
            conn.close()
            if isinstance(e, (RetryNow, StreamGone)):
                if isinstance(e, StreamGone):
                    failed = False
                raise
            if isinstance(e, (OSError, ProxyError)) and not self.response_started:
                kind = error_kind(e)
                failed = kind in policy.failure_on
                if may_retry(worker, call, kind, attempts_left):
                    raise RetryNow() from None
                if isinstance(e, OSError):
                    raise UpstreamError(f"connection to {conn.endpoint} failed: {e.strerror or e}") from None
            raise
        finally:
            balancer.finished(ep_row, rtt, failed, call.svc)

    def _exchange_h2(self, call: Call, attempts_left: bool, ep_row: int, address: tuple[str, int],
                     meshed: bool, sent_at: float, try_deadline: float,
                     tls: TlsTarget | None = None) -> int:
        """The stream to an HTTP/2 upstream (gRPC, ``protocol = "h2"``, or a peer meshd):
        headers, DATA and trailers pass as they are, resets travel both ways."""
        worker, server, stream, policy = self.worker, self.server, self.stream, call.policy
        balancer = worker.balancer
        headers = [(k, v) for k, v in stream.headers if k not in _H2_DROP]
        if tls is not None:  # the upstream is reached over TLS: its URI scheme is https
            headers = [(k, b"https" if k == b":scheme" else v) for k, v in headers]
        if meshed:
            headers.append((ORIG_PROTO, b"HTTP/2"))
        failed = True
        rtt: float | None = None
        sender = None
        up = call.open_h2(worker, address, headers, stream.bodiless, sent_at, tls, ep_row,
                          attempts_left)
        try:
            if not stream.bodiless:
                call.replay = False  # the body is not kept: no retry once it started
                sender = gevent.spawn(self._send_body_h2, up, policy.idle_timeout)
            head = up.response(try_deadline)
            rtt = time.monotonic() - sent_at
            status = int(dict(head).get(b":status", b"502"))
            kind = status_kind(status)
            failed = kind in policy.failure_on
            if failed and stream.bodiless and may_retry(worker, call, kind, attempts_left):
                up.reset()
                raise RetryNow()
            drop = _H2_DROP if meshed else _H2_DROP_RESPONSE  # a peer meshd's meshd-error stays
            out = [(k, v) for k, v in head if k not in drop]
            self.response_started = True
            data = up.read(policy.idle_timeout)
            if data is None and not up.trailers:
                # A head that ended the stream (gRPC's trailers-only answer): one HEADERS
                # frame with END_STREAM, not an empty DATA after it.
                server.send_headers(stream, out, end=True)
                return status
            server.send_headers(stream, out, flush=False)
            while data is not None:
                server.send_data(stream, data, policy.idle_timeout)
                data = up.read(policy.idle_timeout)
            trailers = [(k, v) for k, v in (up.trailers or []) if k not in drop]
            server.end_stream(stream, trailers or None)
            if sender is not None:
                sender.join()
            return status
        except BaseException as e:
            if sender is not None:
                sender.kill()
            self.upstream_reset = up.reset_code
            up.reset()  # the upstream sees the cancellation (a client's reset, a timeout)
            if isinstance(e, (RetryNow, StreamGone)):
                if isinstance(e, StreamGone):
                    failed = False
                raise
            if isinstance(e, ProxyError) and not self.response_started:
                kind = error_kind(e)
                failed = kind in policy.failure_on
                if stream.bodiless and may_retry(worker, call, kind, attempts_left):
                    raise RetryNow() from None
            raise
        finally:
            balancer.finished(ep_row, rtt, failed, call.svc)

    def _send_body_h2(self, up: H2Stream, idle_timeout: float) -> bool:
        stream = self.stream
        try:
            while True:
                try:
                    data = stream.body.get(timeout=idle_timeout)
                except gevent.queue.Empty:
                    up.reset()
                    return False
                if data is None:
                    trailers = [(k, v) for k, v in stream.trailers if k not in _H2_DROP]
                    if trailers:
                        up.send_trailers(trailers)
                    else:
                        up.end()
                    return True
                up.send_data(data, timeout=idle_timeout)
                self.server._ack(stream, len(data))
        except ProxyError:
            return False

    def _send_body(self, conn: UpstreamConn, head: bytes, chunked: bool, idle_timeout: float) -> bool:
        """The stream's DATA to the upstream; each piece's window goes back to the client
        once the upstream took it."""
        stream = self.stream
        out = head
        left = stream.length  # bytes the head announced (None: chunked)
        try:
            if stream.body.empty():  # the head goes at once; the body follows as it comes
                conn.sendall(head)
                out = b""
            while True:
                try:
                    data = stream.body.get(timeout=idle_timeout)
                except gevent.queue.Empty:
                    return False
                if data is None:
                    if left:  # short of the length announced (the server resets such a
                        return False  # stream first): the connection is closed, not reused
                    if chunked:
                        kept = http1.forwardable_trailers(stream.trailers)
                        out += http1.encode_trailers(kept) if kept else http1.LAST_CHUNK
                    conn.sendall(out)
                    conn.request_sent = True
                    return True
                if left is not None:
                    if len(data) > left:  # never more than announced
                        return False
                    left -= len(data)
                out += http1.encode_chunk(data) if chunked else data
                conn.sendall(out)
                out = b""
                self.server._ack(stream, len(data))
        except OSError:
            return False

    def _relay_response(self, resp: http1.ResponseHead, conn: UpstreamConn, idle_timeout: float,
                        request: list[tuple[bytes, bytes]]) -> None:
        server, stream = self.server, self.stream
        method = next((v for k, v in request if k == b":method"), b"GET")
        has_body = http1.response_has_body(method, resp.status)
        headers = [(b":status", b"%d" % resp.status)]
        drop = _HOP | resp.connection_tokens | {MESHD_ERROR}
        headers += [(k.lower(), v) for k, v in resp.headers if k.lower() not in drop]
        if resp.content_length is not None and resp.status != 204 and not (
                resp.chunked or (100 <= resp.status < 200)):
            headers.append((b"content-length", b"%d" % resp.content_length))
        self.response_started = True
        self._upstream_clean = True
        if not has_body:
            server.send_headers(stream, headers, end=True)
            return
        server.send_headers(stream, headers, flush=False)
        if resp.chunked:
            decoder = http1.ChunkedDecoder()
            while True:
                try:
                    pieces = decoder.feed(conn.read_body(idle_timeout))
                except http1.BadRequest as e:
                    raise UpstreamError(f"bad chunked body from upstream: {e.reason}") from None
                for piece in pieces:
                    if piece:
                        server.send_data(stream, piece, idle_timeout)
                if decoder.done:
                    conn.buf += decoder.unconsumed
                    kept = http1.forwardable_trailers(decoder.trailers)
                    server.end_stream(stream, [(k.lower(), v) for k, v in kept
                                               if k.lower() != MESHD_ERROR] or None)
                    return
        elif resp.content_length is not None:
            left = resp.content_length
            if not left:
                server.send_data(stream, b"", idle_timeout, end=True)
            while left > 0:
                data = conn.read_body(idle_timeout)
                if len(data) > left:
                    conn.buf += data[left:]
                    data = data[:left]
                left -= len(data)
                server.send_data(stream, data, idle_timeout, end=not left)
        else:
            self._upstream_clean = False
            while data := conn.read_body(idle_timeout, False):
                server.send_data(stream, data, idle_timeout)
            server.end_stream(stream)

    _upstream_clean = True
    chunked = False
    upstream_reset: int | None = None  # the RST_STREAM code an HTTP/2 upstream sent

    def _answer_error(self, err: ProxyError) -> None:
        level = logging.INFO if err.status < 500 else logging.WARNING
        listener = self.server.listener
        quiet.log(level, f"{listener.name}: {type(err).__name__}", "%s %s (HTTP/2): %s",
                  listener.name, err.status, err.reason)
        reason = public_reason(err, listener)
        body = reason.encode("utf-8", "replace") + b"\n"
        headers = [(b":status", b"%d" % err.status), (b"content-type", b"text/plain; charset=utf-8"),
                   (b"content-length", b"%d" % len(body)),
                   (MESHD_ERROR, reason.encode("ascii", "replace")[:200])]
        self.server.send_headers(self.stream, headers, flush=False)
        self.server.send_data(self.stream, body, 10.0, end=True)


class _NotSupported(ProxyError):
    status = 501
    reason = "not supported"


def _join_cookies(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 9113 §8.2.3: cookie crumbs become one field for HTTP/1.1. Empty crumbs hold
    no cookie and are left out: joined, they would end the value with a space (found
    by fuzz/fuzz_h2_headers.py)."""
    cookies = [v for k, v in fields if k == b"cookie"]
    if len(cookies) < 2:
        return fields
    out = [(k, v) for k, v in fields if k != b"cookie"]
    out.append((b"cookie", b"; ".join([c for c in cookies if c])))
    return out


def _read_response_head(conn: UpstreamConn, try_deadline: float, deadline: float,
                        limit: int, max_headers: int) -> http1.ResponseHead:
    """The final response head (1xx skipped: HTTP/2 clients get no 100 Continue here)."""
    while True:
        resp = read_response_head(conn, try_deadline, deadline, limit, max_headers)
        if 100 <= resp.status < 200 and resp.status != 101:
            continue
        if resp.status == 101:
            raise UpstreamError(f"{conn.endpoint} switched protocols on an HTTP/2 request")
        return resp
