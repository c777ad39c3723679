"""One HTTP/2 request stream from a client, proxied (``meshd.worker.client.h2_server`` owns the
connection and hands each stream here in its own greenlet).

``H2ToHttp1`` is the stream's side of its call (``meshd.worker.call.ClientSide``): it
routes the stream like an HTTP/1.1 request and gives the attempt its request head: for
an attempt over HTTP/1.1 translated (pseudo headers to a request line and Host, split
cookies joined, RFC 9113 §8.2.3; Content-Length when the client gave one, else
chunked), for one over HTTP/2 (gRPC, a service with ``protocol = "h2"``, meshed
endpoints) as it is. Whatever the upstream speaks, one sender (``send_body``) writes the
stream's DATA and trailers through the exchange, and one relay (``respond``) sends the
response back as the exchange translates it (an HTTP/1.1 response's hop-by-hop fields
dropped, its chunked trailers as HTTP/2 trailers; an HTTP/2 upstream's headers, DATA,
trailers and reset code as they are).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.queue
import h2.errors

from meshd.balance.retry import MAX_REPLAY_BODY
from meshd.errors import HeadersTooLarge, ProxyError
from meshd.proto import forwarded, grpc_status
from meshd.proto.translate import ORIG_PROTO, h2_forward, http1_request, join_cookies
from meshd.shm import F_REQUESTS
from meshd.worker import observe
from meshd.worker.call import (
    Call,
    count_route_request,
    error_answer,
    is_grpc,
    record_response,
    require_endpoints,
    route,
)
from meshd.worker.upstream.exchange import Http1Exchange, UpstreamExchange

if TYPE_CHECKING:
    from meshd.worker.client.h2_server import H2ServerConnection
    from meshd.worker.tasks import Task
    from meshd.worker.upstream.http1 import UpstreamConn

log = logging.getLogger("meshd.worker")


class StreamGone(gevent.GreenletExit):
    """The client reset the stream or the connection went away (a GreenletExit: a
    stream task cancelled with it ends quietly, or does not start)."""


_NO_BODY: gevent.queue.Queue[bytes | None] = gevent.queue.Queue(maxsize=1)


class Stream:
    __slots__ = ("id", "headers", "bodiless", "body", "ended", "trailers", "window", "reset",
                 "task", "length", "received", "sent")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], bodiless: bool,
                 length: int | None = None) -> None:
        self.id = stream_id
        self.headers = headers
        self.bodiless = bodiless  # HEADERS came with END_STREAM
        # The declared content-length (None: none) and the DATA received so far: the
        # server resets a stream whose DATA total disagrees (RFC 9113 §8.1.1).
        self.length = length
        self.received = 0
        self.sent = 0  # DATA sent back (received and sent: meshd.worker.observe)
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
        traced = None
        if worker.tracer is not None:  # the upstream's head carries meshd's span as parent
            self.stream.headers, traced = worker.tracer.begin(self.stream.headers)
        headers = self.stream.headers
        # The pseudo-header fields come first (h2_headers.request_problem holds them there)
        regular = next((i for i, (k, _) in enumerate(headers) if k[:1] != b":"), len(headers))
        pseudo = dict(headers[:regular])
        method = pseudo.get(b":method", b"GET")
        target = pseudo.get(b":path", b"/")
        fields = join_cookies(headers[regular:])
        self.grpc = is_grpc(fields)
        authority = pseudo.get(b":authority") or next((v for k, v in fields if k == b"host"), None)
        status = 502
        call: Call | None = None
        answered: UpstreamExchange | None = None  # a gRPC response: its grpc-status is logged
        service, endpoints, row, policy = route(worker, server.listener, method, authority,
                                                target, fields, server.redirected, server.peer)
        worker.stripe.add(row, F_REQUESTS)
        route_at = count_route_request(worker, server.listener, policy)  # -1: no [[route]]
        self._idle_timeout = policy.idle_timeout
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
            call = _H2Call(self, worker, service, endpoints, policy, started + policy.timeout,
                           row, method, fields, server.client_address)
            self._request = (method, target, authority, fields)
            if policy.rewrite is not None:  # a fleet route's filters: what goes upstream
                self.stream.headers = policy.rewrite.h2(self.stream.headers)
                self._request = (method, *policy.rewrite.h2_request(target, authority, fields))
            status = call.run(worker, self)
            if self.grpc:
                answered = self._ex
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
            # after the trailers: a gRPC answer's grpc-status classifies it (Linkerd's rule)
            grpc = grpc_status.of_answer(answered) if answered is not None else None
            code = -1 if grpc is None else grpc
            failure = status >= 500 or code > 0
            record_response(worker, row, route_at, status, time.monotonic() - started,
                            failure, code)
            if traced is not None or worker.observing:  # access log, tap, span
                observe.request(worker, server.listener, server.client_address, server.peer,
                                service, policy.route, method, authority, target, status, call,
                                started, fields, answered, traced, self.stream.received,
                                self.stream.sent)

    # -- the client side of the call (meshd.worker.call.ClientSide) ---------------------

    @property
    def has_body(self) -> bool:
        return not self.stream.bodiless

    def http1_exchange(self, call: Call, conn: UpstreamConn) -> Http1Exchange:
        method, target, authority, fields = self._request
        stream = self.stream
        head, chunked = http1_request(method, target, authority, fields, stream.length,
                                      stream.bodiless)
        limits = self.server.limits
        ex = Http1Exchange(self.worker.pool, conn, head, method,
                           self.send_body if self.has_body else None,
                           call.policy.connect_timeout, limits.header_bytes,
                           limits.header_count, chunked=chunked,
                           length=None if chunked else stream.length)
        return ex

    def h2_head(self, https: bool, meshed: bool) -> tuple[list[tuple[bytes, bytes]], bool]:
        headers = h2_forward(self.stream.headers)
        if https:  # the upstream is reached over TLS: its URI scheme is https
            headers = [(k, b"https" if k == b":scheme" else v) for k, v in headers]
        if meshed:
            headers.append((ORIG_PROTO, b"HTTP/2"))
        return headers, False

    def send_body(self, ex: UpstreamExchange) -> bool:
        """The stream's DATA through the exchange, its trailers at the end; each piece's
        window goes back to the client once the upstream took it. A client that sends
        nothing for the idle timeout: the exchange is told to stop."""
        stream, server = self.stream, self.server
        idle = self._idle_timeout
        try:
            kept = self._kept
            if self._ended or kept:  # a retry: what the client sent so far, again
                ex.send_body(tuple(kept or ()), end=self._ended,
                             trailers=stream.trailers if self._ended else ())
                if self._unacked:  # the last attempt was stopped before it acknowledged
                    server.acknowledge(stream, self._unacked)
                    self._unacked = 0
                if self._ended:
                    return True
            elif stream.body.empty():  # the head goes at once; the body follows as it comes
                ex.send_body(())
            while True:
                try:
                    data = stream.body.get(timeout=idle)
                except gevent.queue.Empty:
                    ex.stop_body()
                    return False
                if data is None:
                    self._ended = True
                    ex.send_body((), end=True, trailers=stream.trailers)
                    return True
                # Kept for a retry (gRPC's trailers-only UNAVAILABLE, an idempotent
                # method) up to MAX_REPLAY_BODY, at once: no switch between get and here.
                if self._kept is not None:
                    self._kept_bytes += len(data)
                    if self._kept_bytes <= MAX_REPLAY_BODY:
                        self._kept.append(data)
                    else:
                        self._kept = None
                self._unacked = len(data)
                ex.send_body((data,))
                self._unacked = 0  # before: the window goes back once, whatever happens
                server.acknowledge(stream, len(data))
        except ProxyError:
            return False

    def respond(self, call: Call, ex: UpstreamExchange, status: int) -> int:
        """The response, whatever the upstream spoke: its head as HTTP/2 fields, its
        body as DATA, its trailers as HEADERS. END_STREAM goes with the last frame: the
        head's when there is no body, the last DATA's when the body is complete without
        trailers (gRPC's trailers-only answer is one HEADERS frame)."""
        server, stream = self.server, self.stream
        idle = call.policy.idle_timeout
        self._ex = ex  # its reset code, should the relay fail
        headers = ex.h2_head()
        if call.policy.rewrite is not None:  # a fleet route's response header filter
            headers = call.policy.rewrite.response(headers, True)
        self.response_started = True
        data = ex.read(idle)
        if data is None and not ex.trailers:
            server.send_headers(stream, headers, end=True)
        else:
            server.send_headers(stream, headers, flush=False)
            last = False
            while data is not None:
                last = ex.complete and not ex.trailers
                server.send_data(stream, data, idle, end=last)
                data = None if last else ex.read(idle)
            if not last:
                server.end_stream(stream, ex.h2_trailers() or None)
        ex.finish()
        return status

    def client_fault(self, e: BaseException) -> BaseException | None:
        return e if isinstance(e, StreamGone) else None

    grpc = False
    _ex: UpstreamExchange | None = None  # the last attempt's
    _idle_timeout = 60.0
    # The request body sent so far, for a retry (None: more than MAX_REPLAY_BODY), and
    # whether all of it came.
    _kept: list[bytes] | None = None
    _kept_bytes = 0
    _ended = False
    _unacked = 0  # bytes of the piece being sent, until the client's window gets them back

    def _answer_error(self, err: ProxyError) -> None:
        fields, body = error_answer(err, self.server.listener, "HTTP/2")
        headers = [(b":status", b"%d" % err.status), *((k.lower(), v) for k, v in fields)]
        self.server.send_headers(self.stream, headers, flush=False)
        self.server.send_data(self.stream, body, 10.0, end=True)


class _H2Call(Call):
    """A stream's call: its body may be sent again while all of it is kept (the side's
    ``send_body`` keeps up to MAX_REPLAY_BODY)."""

    __slots__ = ("side",)

    def __init__(self, side: H2ToHttp1, *args: Any) -> None:
        super().__init__(*args)
        self.side = side
        if side.has_body:
            side._kept = []

    def body_replayable(self) -> bool:
        return not self.side.has_body or self.side._kept is not None


class _NotSupported(ProxyError):
    status = 501
    reason = "not supported"
