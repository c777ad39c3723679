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

from meshd.errors import HeadersTooLarge, ProxyError
from meshd.proto import forwarded, http1
from meshd.proto.translate import (
    MESHD_ERROR,
    ORIG_PROTO,
    h2_forward,
    h2_response,
    http1_request,
    join_cookies,
)
from meshd.shm import F_REQUESTS
from meshd.worker.call import (
    Call,
    error_answer,
    is_grpc,
    require_endpoints,
    route,
)
from meshd.worker.upstream.exchange import H2Exchange, Http1Exchange, UpstreamExchange

if TYPE_CHECKING:
    from meshd.worker.client.h2_server import H2ServerConnection
    from meshd.worker.tasks import Task
    from meshd.worker.upstream.h2 import H2Stream
    from meshd.worker.upstream.http1 import UpstreamConn

log = logging.getLogger("meshd.worker")


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
            self.stream.headers = forwarded.apply(self.stream.headers, mode, server.client_address(), h2=True)
        pseudo = {k: v for k, v in self.stream.headers if k.startswith(b":")}
        method = pseudo.get(b":method", b"GET")
        target = pseudo.get(b":path", b"/")
        fields = join_cookies([(k, v) for k, v in self.stream.headers if not k.startswith(b":")])
        self.grpc = is_grpc(fields)
        authority = pseudo.get(b":authority") or next((v for k, v in fields if k == b"host"), None)
        status = 502
        service, endpoints, row, policy = route(worker, server.listener, method, authority,
                                                target, fields, server.redirected, server.peer)
        worker.stripe.add(row, F_REQUESTS)
        try:
            # [limits] header_count holds for HTTP/2 requests as for HTTP/1.1 ones: within
            # header_bytes, empty fields would be a few thousand (found by make fuzz).
            if len(fields) > server.limits.header_count:
                raise HeadersTooLarge(f"more than {server.limits.header_count} header fields")
            gate = worker.authz
            if gate.covers(server.listener):  # before anything reaches the application
                gate.http(worker, server.listener, server.peer, method, target, fields)
            if method == b"CONNECT":
                raise _NotSupported("CONNECT over HTTP/2 is not supported")
            endpoints = require_endpoints(service, endpoints, policy, worker.snapshot)
            call = Call(worker, service, endpoints, policy, started + policy.timeout, row,
                        method, fields, server.client_address)
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

    # -- the client side of the call (meshd.worker.call.ClientSide) ---------------------

    @property
    def has_body(self) -> bool:
        return not self.stream.bodiless

    def http1_exchange(self, call: Call, conn: UpstreamConn) -> Http1Exchange:
        method, target, authority, fields = self._request
        stream = self.stream
        head, self.chunked = http1_request(method, target, authority, fields, stream.length,
                                           stream.bodiless)
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
        headers = h2_forward(self.stream.headers)
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
        meshed = self.meshed  # a peer meshd's meshd-error stays
        out = h2_forward(ex.head, meshed)
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
        server.end_stream(stream, h2_forward(ex.trailers, meshed) or None)

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
                    trailers = h2_forward(stream.trailers)
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
        headers = h2_response(resp)
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
        fields, body = error_answer(err, self.server.listener, "HTTP/2")
        headers = [(b":status", b"%d" % err.status), *((k.lower(), v) for k, v in fields)]
        self.server.send_headers(self.stream, headers, flush=False)
        self.server.send_data(self.stream, body, 10.0, end=True)


class _NotSupported(ProxyError):
    status = 501
    reason = "not supported"
