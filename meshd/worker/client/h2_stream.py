"""One HTTP/2 request stream from a client, proxied (``meshd.worker.client.h2_server`` owns the
connection and hands each stream here in its own greenlet).

``H2ToHttp1`` is the stream's side of its call (``meshd.worker.call.ClientSide``): it
routes the stream like an HTTP/1.1 request, and for an attempt over HTTP/1.1
translates both ways: pseudo headers to a
request line and Host, split cookies joined (RFC 9113 §8.2.3), the body streamed with
Content-Length when the client gave one and chunked otherwise, the response's
hop-by-hop fields dropped and its chunked trailers sent as HTTP/2 trailers. gRPC, a
service with ``protocol = "h2"`` and meshed endpoints go to an HTTP/2 upstream instead
(``h2_exchange``, ``_relay_h2``): headers, DATA, trailers and resets pass as they are.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event
import gevent.queue
import h2.errors

from meshd.errors import ProxyError
from meshd.proto import forwarded, http1
from meshd.shm import F_REQUESTS
from meshd.worker.call import (
    MESHD_ERROR,
    ORIG_PROTO,
    Call,
    is_grpc,
    public_reason,
    require_endpoints,
    route,
)
from meshd.worker.client.http1 import quiet
from meshd.worker.upstream.exchange import H2Exchange, Http1Exchange, UpstreamExchange

if TYPE_CHECKING:
    from meshd.worker.client.h2_server import H2ServerConnection
    from meshd.worker.tasks import Task
    from meshd.worker.upstream.h2 import H2Stream
    from meshd.worker.upstream.http1 import UpstreamConn

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
            if method == b"CONNECT":
                raise _NotSupported("CONNECT over HTTP/2 is not supported")
            endpoints = require_endpoints(service, endpoints, policy, worker.snapshot)
            call = Call(worker, service, endpoints, policy, started + policy.timeout, row,
                        method, fields, server.peer)
            if self.has_body:
                call.replay = False  # the body is not kept: no retry once it is sent
            self._request = (method, target, authority, fields)
            status = call.run(worker, self)
        except ProxyError as e:
            status = e.status
            if self.response_started:
                # The upstream's own RST_STREAM code when it reset the stream (CANCEL
                # reaches a gRPC client as CANCELLED), else INTERNAL_ERROR.
                reset = self._ex.reset_code if self._ex is not None else None
                server.reset_stream(self.stream, reset or h2.errors.ErrorCodes.INTERNAL_ERROR)
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

    # -- the client side of the call (meshd.worker.call.ClientSide) ---------------------

    @property
    def has_body(self) -> bool:
        return not self.stream.bodiless

    def http1_exchange(self, call: Call, conn: UpstreamConn) -> Http1Exchange:
        method, target, authority, fields = self._request
        head = self._upstream_head(method, target, authority, fields)
        idle = call.policy.idle_timeout
        limits = self.server.limits
        sender = None
        if self.has_body:
            chunked = self.chunked
            sender = lambda c, h: self._send_body(c, h, chunked, idle)  # noqa: E731
        ex = Http1Exchange(self.worker.pool, conn, head, method, sender,
                           call.policy.connect_timeout, limits.header_bytes,
                           limits.header_count)
        self._ex = ex
        return ex

    def h2_head(self, https: bool, meshed: bool) -> tuple[list[tuple[bytes, bytes]], bool]:
        headers = [(k, v) for k, v in self.stream.headers if k not in _H2_DROP]
        if https:  # the upstream is reached over TLS: its URI scheme is https
            headers = [(k, b"https" if k == b":scheme" else v) for k, v in headers]
        if meshed:
            headers.append((ORIG_PROTO, b"HTTP/2"))
        return headers, False

    def h2_exchange(self, call: Call, stream: H2Stream, meshed: bool) -> H2Exchange:
        self.meshed = meshed
        idle = call.policy.idle_timeout
        ex = H2Exchange(stream, (lambda s: self._send_body_h2(s, idle)) if self.has_body
                        else None)
        self._ex = ex
        return ex

    def respond(self, call: Call, ex: UpstreamExchange, status: int) -> int:
        idle = call.policy.idle_timeout
        if isinstance(ex, Http1Exchange):
            self._relay_response(ex, idle, self.stream.headers)
        else:
            assert isinstance(ex, H2Exchange)
            self._relay_h2(ex, status, idle)
        ex.finish()
        return status

    def client_fault(self, e: BaseException) -> BaseException | None:
        return e if isinstance(e, StreamGone) else None

    def _relay_h2(self, ex: H2Exchange, status: int, idle_timeout: float) -> None:
        """The response of an HTTP/2 upstream: headers, DATA and trailers as they are."""
        server, stream = self.server, self.stream
        drop = _H2_DROP if self.meshed else _H2_DROP_RESPONSE  # a peer meshd's meshd-error stays
        out = [(k, v) for k, v in ex.head if k not in drop]
        self.response_started = True
        data = ex.read(idle_timeout)
        if data is None and not ex.trailers:
            # A head that ended the stream (gRPC's trailers-only answer): one HEADERS
            # frame with END_STREAM, not an empty DATA after it.
            server.send_headers(stream, out, end=True)
            return
        server.send_headers(stream, out, flush=False)
        while data is not None:
            server.send_data(stream, data, idle_timeout)
            data = ex.read(idle_timeout)
        trailers = [(k, v) for k, v in ex.trailers if k not in drop]
        server.end_stream(stream, trailers or None)

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

    def _relay_response(self, ex: Http1Exchange, idle_timeout: float,
                        request: list[tuple[bytes, bytes]]) -> None:
        """The response of an HTTP/1.1 upstream, translated: fields lower-cased without
        the connection-specific ones, the body as DATA, chunked trailers as trailers."""
        server, stream = self.server, self.stream
        resp = ex.resp
        assert resp is not None
        method = next((v for k, v in request if k == b":method"), b"GET")
        has_body = http1.response_has_body(method, resp.status)
        headers = [(b":status", b"%d" % resp.status)]
        drop = _HOP | resp.connection_tokens | {MESHD_ERROR}
        headers += [(k.lower(), v) for k, v in resp.headers if k.lower() not in drop]
        if resp.content_length is not None and resp.status != 204 and not (
                resp.chunked or (100 <= resp.status < 200)):
            headers.append((b"content-length", b"%d" % resp.content_length))
        self.response_started = True
        if not has_body:
            server.send_headers(stream, headers, end=True)
            return
        server.send_headers(stream, headers, flush=False)
        if resp.chunked:
            while (data := ex.read(idle_timeout)) is not None:
                server.send_data(stream, data, idle_timeout)
            server.end_stream(stream, [(k.lower(), v) for k, v in ex.trailers
                                       if k.lower() != MESHD_ERROR] or None)
        elif resp.content_length is not None:
            while True:
                data = ex.read(idle_timeout)
                if data is None:  # Content-Length: 0
                    server.send_data(stream, b"", idle_timeout, end=True)
                    return
                server.send_data(stream, data, idle_timeout, end=ex.complete)
                if ex.complete:
                    return
        else:
            while (data := ex.read(idle_timeout)) is not None:
                server.send_data(stream, data, idle_timeout)
            server.end_stream(stream)

    chunked = False
    meshed = False
    grpc = False
    _ex: UpstreamExchange | None = None  # the last attempt's

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
    """RFC 9113 §8.2.3: cookie crumbs become one field for HTTP/1.1."""
    cookies = [v for k, v in fields if k == b"cookie"]
    if len(cookies) < 2:
        return fields
    out = [(k, v) for k, v in fields if k != b"cookie"]
    out.append((b"cookie", b"; ".join(cookies)))
    return out
