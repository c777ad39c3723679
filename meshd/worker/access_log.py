"""The access log of one worker: one line per request, written off the request path.

The request path calls ``AccessLog.record`` with a tuple of what it already holds (no
formatting, no I/O, no greenlet switch); the tuple goes on a bounded queue, and when the
queue is full the line is dropped and counted (the writer reports drops in a rate-limited
log line). A writer greenlet wakes every FLUSH_INTERVAL, formats the lines
(``format_text`` / ``format_json``) and appends them to the file, opened ``O_APPEND`` so
the lines of several workers never interleave: each ``os.write`` carries whole lines;
the worker flushes what is left when it exits. "-" writes to stdout. A reload makes new workers,
which open the file anew: rename it, HUP, and the next lines go to a new file
(logrotate's default ``create`` mode works without ``copytruncate``).

Every field a client controls (method, authority, path, the trace id) is bounded in
length and escaped: JSON by ``json.dumps``, text with control characters, quotes and
backslashes as escapes, so no request can forge a line.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import gevent

from meshd.config_access_log import AccessLogConfig
from meshd.proto import grpc_status as grpc_status_code
from meshd.ratelog import Throttle
from meshd.shm import F_WORKER, ROW_UNKNOWN, WORKER_COUNTS, Stripe

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.call import Call
    from meshd.worker.upstream.exchange import UpstreamExchange

log = logging.getLogger("meshd.access_log")
_quiet = Throttle(log)

MAX_PATH = 2048        # characters of the path kept (the rest is cut, marked with "...")
MAX_AUTHORITY = 256
MAX_METHOD = 32
BATCH_BYTES = 64 * 1024  # lines joined into one write at most
FLUSH_INTERVAL = 0.05    # seconds between the writer's turns (how late a line may appear)

# (wall time, direction, listener, client address, client_id, method, authority, path,
#  status, the exchange that answered a gRPC request (its grpc-status is read by the
#  writer, not the request path) or None, endpoint, duration seconds, attempts, request
#  headers, body bytes received from the client, body bytes sent to it)
Record = tuple[float, str, str, bytes, str, bytes, "bytes | None", bytes, int,
               "UpstreamExchange | None", str, float, int, Sequence[tuple[bytes, bytes]],
               int, int]

# bytes_received / bytes_sent: body bytes, as Envoy's BYTES_RECEIVED / BYTES_SENT (what
# they count: meshd.worker.observe); last, so the text format's earlier columns stay put
FIELDS = ("time", "direction", "listener", "client", "client_id", "method", "authority",
          "path", "status", "grpc_status", "endpoint", "duration_ms", "attempts", "trace_id",
          "bytes_received", "bytes_sent")


def _cut(value: bytes | None, limit: int) -> str:
    if not value:
        return ""
    text = value[:limit].decode("latin-1")
    return text + "..." if len(value) > limit else text


def _hex_id(tid: bytes) -> str:
    tid = tid.lower()
    if all(c in b"0123456789abcdef" for c in tid) and tid.strip(b"0"):
        return tid.decode()
    return ""


def trace_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The trace-id of a W3C ``traceparent`` (version-traceid-parentid-flags), else of
    B3 (``b3``, ``X-B3-TraceId``: [tracing] with propagation = ["b3"] writes only
    those), "" when there is none or it is malformed."""
    b3 = b""
    for k, v in headers:
        if len(k) == 11 and k.lower() == b"traceparent":
            parts = v.strip().split(b"-")
            if len(parts) >= 4 and len(parts[1]) == 32:
                return _hex_id(parts[1])
            return ""
        if not b3 and (len(k) == 2 and k.lower() == b"b3"
                       or len(k) == 12 and k.lower() == b"x-b3-traceid"):
            b3 = v.strip().split(b"-", 1)[0]
    return _hex_id(b3) if len(b3) in (16, 32) else ""


def grpc_status(ex: UpstreamExchange | None) -> str:
    """A gRPC response's ``grpc-status``: from its trailers, else from its head (a
    trailers-only answer); "" when there is none."""
    found = grpc_status_code.of_answer(ex)  # shared with the metrics and the call
    return "" if found is None else str(found)


_second: list[Any] = [-1, ""]  # the last second formatted, and its text


def _timestamp(wall: float) -> str:
    """ISO 8601 UTC to the millisecond (rounded, not cut: 0.123 is not 0.122999...)."""
    ms = int(wall * 1000 + 0.5)
    sec = ms // 1000
    if _second[0] != sec:  # strftime once a second, not once a line
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{ms % 1000:03d}Z"


def fields(rec: Record) -> dict[str, Any]:
    """The line's fields, client-controlled ones bounded (not yet escaped)."""
    (wall, direction, listener, client, client_id, method, authority, path, status,
     answered, endpoint, duration, attempts, headers, received, sent) = rec
    return {
        "time": _timestamp(wall),
        "direction": direction,
        "listener": listener,
        "client": client.decode("latin-1"),
        "client_id": client_id,
        "method": _cut(method, MAX_METHOD),
        "authority": _cut(authority, MAX_AUTHORITY),
        "path": _cut(path, MAX_PATH),
        "status": status,
        "grpc_status": grpc_status(answered),
        "endpoint": endpoint,
        "duration_ms": round(duration * 1000, 3),
        "attempts": attempts,
        "trace_id": trace_id(headers),
        "bytes_received": received,
        "bytes_sent": sent,
    }


_JSON_STR = json.encoder.encode_basestring_ascii  # json.dumps of one str, as a function


def format_json(rec: Record) -> bytes:
    """The fields as one JSON object (what ``json.dumps(fields(rec))`` gives, compact
    and ASCII; strings each through json's own encoder), about twice as fast."""
    f = fields(rec)
    return ("{" + ",".join(
        f'"{k}":{_JSON_STR(v) if isinstance(v, str) else v}' for k, v in f.items())
        + "}\n").encode()


_ESCAPES = {i: f"\\x{i:02x}" for i in list(range(0x20)) + list(range(0x7f, 0x100))}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r",
                 ord("\t"): "\\t"})


def quote(value: str) -> str:
    """A text field in double quotes: backslash, quote and anything outside printable
    ASCII escaped, so it stays one token on one line."""
    return '"' + value.translate(_ESCAPES) + '"'


def format_text(rec: Record) -> bytes:
    """``time direction listener client client_id "METHOD" "authority" "path" status
    grpc_status endpoint duration_ms attempts trace_id bytes_received bytes_sent``;
    empty fields are "-"."""
    f = fields(rec)
    out = []
    for name in FIELDS:
        value = f[name]
        if name in ("method", "authority", "path", "client_id"):
            out.append(quote(value))
        elif value == "" or value is None:
            out.append("-")
        elif isinstance(value, str):
            out.append(value.translate(_ESCAPES).replace(" ", "\\x20"))
        else:
            out.append(str(value))
    return (" ".join(out) + "\n").encode("ascii", "backslashreplace")

F_DROPPED = F_WORKER + WORKER_COUNTS.index("access_log_dropped")


class AccessLog:
    """A worker's access log: ``record`` on the request path, a writer greenlet behind.

    The queue is a plain deque the writer empties every FLUSH_INTERVAL: appending wakes
    no greenlet (a gevent queue would switch to the writer after every request), and
    the lines of a busy interval go out in a few writes."""

    def __init__(self, config: AccessLogConfig) -> None:
        self.config = config
        self.format = format_json if config.format == "json" else format_text
        self.queue: collections.deque[Record] = collections.deque()
        self.limit = config.queue
        self.dropped = 0
        self._reported = 0
        self.fd = -1
        # Where the writer publishes ``dropped`` for meshd_access_log_dropped_total (the
        # worker's decisions ring header, meshd.worker.decisions), if anywhere.
        self.publish: Callable[[int], None] | None = None
        # The worker's stripe: drops are counted there too (meshd_access_log_dropped_total
        # then survives the worker and the control process).
        self.stripe: Stripe | None = None

    def open(self) -> None:
        """Open the file (at worker boot: a new generation opens it anew) and start the
        writer. A file that cannot be opened logs an error and records nothing."""
        path = self.config.path
        if path == "-":
            self.fd = 1
        else:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                  0o644)
            except OSError as e:
                log.error("access_log.path: cannot open %s: %s", path, e.strerror or e)
                return
        gevent.spawn(self._writer)

    def record(self, rec: Record) -> None:
        """Queue one request's line; drop it (counted) when the writer is behind."""
        queue = self.queue
        if len(queue) < self.limit and self.fd >= 0:
            queue.append(rec)
        else:
            self.dropped += 1
            if self.stripe is not None:
                self.stripe.add(ROW_UNKNOWN, F_DROPPED)

    def _writer(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            self.flush()

    def flush(self) -> None:
        """Format and write what is queued, in writes of BATCH_BYTES at most."""
        queue = self.queue
        fmt = self.format
        while queue:
            lines = []
            size = 0
            while queue and size < BATCH_BYTES:
                line = fmt(queue.popleft())
                lines.append(line)
                size += len(line)
            self._write(b"".join(lines))
        if self.dropped != self._reported:
            _quiet.warning("access_log.dropped", "access log: %d lines dropped so far "
                           "(the writer fell behind)", self.dropped)
            self._reported = self.dropped
            if self.publish is not None:
                self.publish(self.dropped)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                _quiet.warning("access_log.write", "access log: write failed: %s",
                               e.strerror or e)
                return
            view = view[n:]


def request(alog: AccessLog, listener: ListenerConfig, client: bytes, client_id: str,
            method: bytes, authority: bytes | None, path: bytes, status: int,
            call: Call | None, started: float, headers: Sequence[tuple[bytes, bytes]],
            answered: UpstreamExchange | None = None, received: int = 0,
            sent: int = 0) -> None:
    """Record one finished request (from ``meshd.worker.observe``, where every request
    ends, with ``started`` the monotonic time its head arrived). ``answered``: the
    exchange whose response a gRPC request got, for its ``grpc-status``; ``received``,
    ``sent``: its body bytes."""
    endpoint = ""
    attempts = 0
    if call is not None and call.tried:
        attempts = len(call.tried)
        ep = call.endpoints[call.tried[-1]]
        endpoint = f"[{ep.host}]:{ep.port}" if ":" in ep.host else f"{ep.host}:{ep.port}"
    duration = time.monotonic() - started
    alog.record((time.time(), listener.direction, listener.name, client, client_id,
                 method, authority, path, status, answered, endpoint, duration, attempts,
                 headers, received, sent))


def rejected(alog: AccessLog, listener: ListenerConfig, client: bytes, client_id: str,
             head: bytes, status: int, started: float, sent: int = 0) -> None:
    """Record an HTTP/1.1 request refused before it could be parsed (its answer is
    ``status``, with a body of ``sent`` bytes): the method and target as far as its
    request line tells."""
    line = head[:MAX_PATH + MAX_METHOD + 16].split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    method = parts[0] if len(parts) > 1 else b""
    path = parts[1] if len(parts) > 1 else b""
    alog.record((time.time(), listener.direction, listener.name, client, client_id, method,
                 None, path, status, None, "", time.monotonic() - started, 0, (), 0, sent))
