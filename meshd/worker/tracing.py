"""Distributed tracing in one worker: the trace context of each request, a span per
request per hop, exported over OTLP/HTTP (protobuf) off the request path.

On the request path (``Tracer.begin`` where a client side has the request's head,
``Tracer.finish`` in its ``finally``): the context is read from the head
(``meshd.proto.trace_context``; malformed, oversized or repeated fields hold none),
meshd's span gets a new id as a child of it, or starts a new trace sampled at
``sample_rate`` when there is none (a context's own sampled flag is kept, as
Linkerd's proxy does), and the head the upstream gets carries meshd's span id as its
parent, whether or not the span is recorded -- except for a request that comes without
any trace field and is not sampled: it goes on untouched, at the cost of a scan of its
field names and a random number (``python -m bench.tracing``). A recorded span is a
tuple appended to a bounded deque: no encoding, no I/O, no greenlet switch; a full
deque drops it (counted).

The exporter greenlet wakes every FLUSH_INTERVAL, encodes what is queued in batches of
``batch_size`` (``opentelemetry-proto``'s messages, imported only when tracing is on)
and POSTs each to ``otlp_endpoint`` with ``export_timeout`` for the whole exchange.
A batch that fails is dropped (counted) and the exporter backs off (1 s doubling to
60 s) while the deque fills and drops: the collector being down never blocks traffic
nor grows memory. Counts go to the worker's stripe, row ROW_UNKNOWN
(``meshd_trace_spans_*`` on /metrics).

One span per request per meshd: SERVER on inbound listeners, CLIENT on outbound ones,
from the head's arrival to the response's end, retries inside it (``meshd.attempts``).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import socket as stdlib_socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gevent
import gevent.socket

from meshd import __version__
from meshd.config_tracing import TracingConfig
from meshd.proto import trace_context
from meshd.proto.grpc_status import text_of_answer
from meshd.ratelog import Throttle
from meshd.shm import F_TRACE, ROW_UNKNOWN, TRACE_COUNTS
from meshd.worker.access_log import MAX_AUTHORITY, MAX_METHOD, MAX_PATH, _cut

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.shm import Stripe
    from meshd.worker.call import Call
    from meshd.worker.peer import Peer
    from meshd.worker.upstream.exchange import UpstreamExchange

log = logging.getLogger("meshd.tracing")
_quiet = Throttle(log)

FLUSH_INTERVAL = 0.5      # seconds between the exporter's turns
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
MAX_RESPONSE = 64 * 1024  # of a collector's answer, read at most
YIELD_EVERY = 32          # spans encoded between two yields to the hub
F_EXPORTED = F_TRACE + TRACE_COUNTS.index("exported")
F_DROPPED_QUEUE = F_TRACE + TRACE_COUNTS.index("dropped_queue_full")
F_DROPPED_EXPORT = F_TRACE + TRACE_COUNTS.index("dropped_export_failed")

# What begin() hands the request path: (trace id, span id, parent span id ("" for a
# root), sampled (always True), start in unix ns); None when the span is not recorded.
Started = tuple[str, str, str, bool, int]
# A finished span: Started's ids and start, end ns, direction, listener, service, route,
# method, authority, path, status, the exchange that answered a gRPC request (its
# grpc-status is read by the exporter) or None, endpoint, attempts, the client
# connection's TLS (terminated by meshd) and client_id, the request's and the response's
# body bytes (meshd.worker.observe)
Span = tuple[str, str, str, int, int, str, str, str, "str | None", bytes, "bytes | None",
             bytes, int, "UpstreamExchange | None", str, int, bool, str, int, int]


class Tracer:
    """A worker's tracing: ``begin`` / ``finish`` on the request path, the exporter
    behind."""

    def __init__(self, config: TracingConfig, stripe: Stripe | None = None) -> None:
        self.config = config
        self.formats = config.propagation
        self.rate = config.sample_rate
        self.queue: collections.deque[Span] = collections.deque()
        self.limit = config.queue
        self.stripe = stripe
        self.dropped = 0          # spans the full queue refused (the exporter counts them)
        self._counted = 0
        self.backoff = 0.0
        self._resume = 0.0        # monotonic time before which the exporter does not send
        self._encoder: Encoder | None = None

    # -- the request path -------------------------------------------------------------

    def begin(self, headers: list[tuple[bytes, bytes]]
              ) -> tuple[list[tuple[bytes, bytes]], Started | None]:
        """(the head for the upstream, the span's start; None when it is not recorded).
        The context is the request's own when it holds a valid one, else a new trace.

        A request without any trace field that the sample rate does not pick costs a scan
        of its field names and one random number: no ids, its head passed on as it is (a
        context is "created when absent and sampled"; W3C Trace Context asks at least
        forwarding of a system that does not take part, and there is nothing to forward).
        The next hop then decides alone."""
        ctx, relevant = trace_context.extract(headers, self.formats)
        if not relevant and random.random() >= self.rate:  # no context, not sampled
            return headers, None
        span_id = (random.getrandbits(64) or 1).to_bytes(8).hex()
        if ctx is not None and ctx.span_id:
            trace_id, parent, came_as, state = ctx.trace_id, ctx.span_id, ctx.came_as, ctx.tracestate
            sampled = ctx.sampled if ctx.sampled is not None else random.random() < self.rate
        elif not relevant:  # none, and the rate picked it above
            trace_id = (random.getrandbits(128) or 1).to_bytes(16).hex()
            parent, came_as, state, sampled = "", (), None, True
        else:  # invalid fields (replaced), or a B3 sampling decision without ids
            trace_id = (random.getrandbits(128) or 1).to_bytes(16).hex()
            parent, came_as, state = "", (), None
            sampled = ctx.sampled if ctx is not None and ctx.sampled is not None \
                else random.random() < self.rate
        out = trace_context.inject(headers, self.formats, trace_id, span_id, parent, sampled,
                                   came_as, state, strip=relevant)
        if not sampled:  # propagated as it came (meshd's span id its parent), not recorded
            return out, None
        return out, (trace_id, span_id, parent, sampled, time.time_ns())

    def finish(self, started: Started, listener: ListenerConfig, service: str,
               route: str | None, method: bytes, authority: bytes | None, path: bytes,
               status: int, call: Call | None, peer: Peer,
               answered: UpstreamExchange | None = None, received: int = 0,
               sent: int = 0) -> None:
        """Queue the span of a finished request when it is sampled; drop it (counted)
        when the exporter is behind."""
        trace_id, span_id, parent, sampled, start = started
        if not sampled:
            return
        if len(self.queue) >= self.limit:
            self.dropped += 1
            return
        endpoint = ""
        attempts = 0
        if call is not None and call.tried:
            attempts = len(call.tried)
            ep = call.endpoints[call.tried[-1]]
            endpoint = f"[{ep.host}]:{ep.port}" if ":" in ep.host else f"{ep.host}:{ep.port}"
        self.queue.append((trace_id, span_id, parent, start, time.time_ns(),
                           listener.direction, listener.name, service, route, method,
                           authority, path, status, answered, endpoint, attempts,
                           peer.tls, peer.client_id, received, sent))

    # -- the exporter -----------------------------------------------------------------

    def start(self) -> None:
        """At worker boot: the encoder (its import now, not in the first batch's turn)
        and the exporter greenlet."""
        try:
            self._encoder = Encoder(self.config)
        except ImportError as e:  # spans are dropped (counted); propagation goes on
            log.error("tracing: cannot encode spans without opentelemetry-proto: %s", e)
        gevent.spawn(self._exporter)

    def _exporter(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            try:
                self.flush()
            except Exception as e:  # never let the exporter die: spans would pile up unseen
                _quiet.log(logging.ERROR, "tracing.exporter", "tracing: exporter turn "
                           "failed: %s: %s", type(e).__name__, e)

    def flush(self, timeout: float | None = None) -> None:
        """Send what is queued unless backing off; count drops and exports."""
        self._count_drops()
        queue = self.queue
        if not queue or time.monotonic() < self._resume:
            return
        if self._encoder is None:
            self._encoder = Encoder(self.config)
        batch_size = self.config.batch_size
        while queue:
            batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
            body = self._encoder.encode(batch)
            error = post(self.config.target, body, timeout or self.config.export_timeout)
            if error is None:
                self.backoff = 0.0
                self._count(F_EXPORTED, len(batch))
                continue
            self._count(F_DROPPED_EXPORT, len(batch))
            self.backoff = min(BACKOFF_MAX, self.backoff * 2 or BACKOFF_FIRST)
            self._resume = time.monotonic() + self.backoff
            _quiet.warning("tracing.export", "tracing: export to %s failed (%s); %d spans "
                           "dropped, next try in %gs", self.config.otlp_endpoint, error,
                           len(batch), self.backoff)
            return

    def _count_drops(self) -> None:
        new = self.dropped - self._counted
        if new:
            self._counted = self.dropped
            self._count(F_DROPPED_QUEUE, new)
            _quiet.warning("tracing.dropped", "tracing: %d spans dropped so far (the "
                           "exporter is behind or backing off)", self.dropped)

    def _count(self, field: int, n: int) -> None:
        if self.stripe is not None:
            self.stripe.add(ROW_UNKNOWN, field, n)


# -- OTLP/HTTP -------------------------------------------------------------------------

def post(target: tuple[str, int, str], body: bytes, timeout: float) -> str | None:
    """POST one export request; None when the collector took it (2xx), else why not.
    The whole exchange within ``timeout``; one connection per request (a batch every
    FLUSH_INTERVAL at most: reuse would save little and need a pool)."""
    host, port, path = target
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/x-protobuf\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\nUser-Agent: meshd/" + __version__ + "\r\n\r\n").encode()
    sock = None
    try:
        with gevent.Timeout(timeout, TimeoutError("timed out")):
            sock = gevent.socket.create_connection((host, port))
            sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
            sock.sendall(head + body)
            answer = b""
            while b"\r\n" not in answer and len(answer) < MAX_RESPONSE:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
    except (OSError, TimeoutError) as e:
        return str(e) or type(e).__name__
    finally:
        if sock is not None:
            sock.close()
    line = answer.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return "no HTTP answer"
    if parts[1][:1] != b"2":
        return "HTTP " + parts[1][:3].decode("latin-1")
    return None


class Encoder:
    """Spans to an ``ExportTraceServiceRequest`` (OTLP's own message definitions), built
    in place with ``add()`` (three to seven times faster than building each message
    and passing it in). ``encode`` yields to the hub every YIELD_EVERY spans, so a big
    batch never holds up the worker's connections for long."""

    def __init__(self, config: TracingConfig) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2
        self.request_type = trace_service_pb2.ExportTraceServiceRequest
        self.server, self.client = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
        self.error = trace_pb2.Status.STATUS_CODE_ERROR
        self.resource = [("service.name", config.service_name),
                         ("host.name", stdlib_socket.gethostname()),
                         ("process.pid", os.getpid()),
                         ("telemetry.sdk.name", "meshd"),
                         ("telemetry.sdk.version", __version__)]

    @staticmethod
    def _attrs(into: Any, pairs: Sequence[tuple[str, Any]]) -> None:
        for k, v in pairs:
            a = into.add()
            a.key = k
            if isinstance(v, bool):
                a.value.bool_value = v
            elif isinstance(v, int):
                a.value.int_value = v
            else:
                a.value.string_value = v

    def encode(self, batch: Sequence[Span]) -> bytes:
        req = self.request_type()
        rs = req.resource_spans.add()
        self._attrs(rs.resource.attributes, self.resource)
        scope = rs.scope_spans.add()
        scope.scope.name = "meshd"
        scope.scope.version = __version__
        spans = scope.spans
        for i, s in enumerate(batch):
            if i and i % YIELD_EVERY == 0:
                gevent.sleep(0)
            self._span(spans.add(), s)
        return bytes(req.SerializeToString())

    def _span(self, span: Any, s: Span) -> None:
        (trace_id, span_id, parent, start, end, direction, listener, service, route, method,
         authority, path, status, answered, endpoint, attempts, tls, client_id, received,
         sent) = s
        method_text = _cut(method, MAX_METHOD)
        attrs: list[tuple[str, Any]] = [
            ("http.request.method", method_text),
            ("url.path", _cut(path.split(b"?", 1)[0], MAX_PATH)),
            ("http.response.status_code", status),
            ("meshd.direction", direction),
            ("meshd.listener", listener),
            ("meshd.service", service),
            ("meshd.attempts", attempts),
            ("http.request.body.size", received),   # OTel HTTP semantic conventions
            ("http.response.body.size", sent),
        ]
        if authority:
            attrs.append(("server.address", _cut(authority, MAX_AUTHORITY)))
        if route:
            attrs.append(("http.route", route))
        if endpoint:
            attrs.append(("meshd.endpoint", endpoint))
        if direction == "inbound":
            attrs.append(("meshd.tls", tls))
        if client_id:
            attrs.append(("meshd.client_id", client_id))
        grpc = text_of_answer(answered)
        error = status >= 500
        if grpc.isdigit():
            attrs.append(("rpc.grpc.status_code", int(grpc)))
            error = error or grpc != "0"
        span.trace_id = bytes.fromhex(trace_id)
        span.span_id = bytes.fromhex(span_id)
        if parent:
            span.parent_span_id = bytes.fromhex(parent)
        span.name = f"{method_text} {route or service or listener}"
        span.kind = self.server if direction == "inbound" else self.client
        span.start_time_unix_nano = start
        span.end_time_unix_nano = max(end, start)
        self._attrs(span.attributes, attrs)
        if error:
            span.status.code = self.error
