"""The access log of one worker: one line per request, written off the request path.

The request path calls ``AccessLog.request`` with what it already holds; what goes on
the queue is a tuple of scalars, bytes and long-lived config objects (the listener, the
endpoint that answered): no headers, call or exchange, so a queued line holds a few
hundred bytes whatever the request was (the trace id and a gRPC status are read at once,
no dearer than later). When the queue is full the line is dropped and counted (the
writer reports drops in a rate-limited log line). A writer greenlet wakes every
FLUSH_INTERVAL, formats the lines (``lines``) and appends them to the file, opened
``O_APPEND`` so the lines of several workers never interleave: each ``os.write``
carries whole lines; the worker flushes what is left when it exits. "-" writes to
stdout. A reload makes new workers, which open the file anew: rename it, HUP, and the
next lines go to a new file (logrotate's default ``create`` mode works without
``copytruncate``).

Every field a client controls (method, authority, path, its certificate's id) is
bounded in length and escaped: JSON by json's own string encoder (ASCII only), text
with control characters, quotes and backslashes as escapes, so no request can forge a
line. What a line holds is ``fields``; the formatter gives exactly what it defines, in
one loop over a batch with one f-string a line, which is what makes a line cost ~2 µs
rather than ~6 (docs/perf/access-log.md).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
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
    from meshd.discovery.api import Endpoint
    from meshd.worker.call import Call
    from meshd.worker.upstream.exchange import UpstreamExchange

log = logging.getLogger("meshd.access_log")
_quiet = Throttle(log)

MAX_PATH = 2048        # characters of the path kept (the rest is cut, marked with "...")
MAX_AUTHORITY = 256
MAX_METHOD = 32
BATCH_BYTES = 64 * 1024  # lines joined into one write at most
FLUSH_INTERVAL = 0.05    # seconds between the writer's turns (how late a line may appear)
CACHED = 1024            # listeners and endpoints whose formatted text is kept, at most

# (wall time, listener, client address, client_id, method, authority, path, status,
#  grpc-status of a gRPC answer or None, the endpoint tried last or None, duration
#  seconds, attempts, trace id (lower-case hex, "" none), body bytes received from the
#  client, body bytes sent to it)
Record = tuple[float, "ListenerConfig", bytes, str, bytes, "bytes | None", bytes, int,
               "int | None", "Endpoint | None", float, int, str, int, int]

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


_HEX = re.compile(rb"[0-9a-fA-F]*").fullmatch


def _hex_id(tid: bytes) -> str:
    if _HEX(tid) and tid.strip(b"0"):
        return tid.lower().decode()
    return ""


def trace_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The trace-id of a W3C ``traceparent`` (version-traceid-parentid-flags), else of
    B3 (``b3``, ``X-B3-TraceId``: [tracing] with propagation = ["b3"] writes only
    those), "" when there is none or it is malformed."""
    b3 = b""
    for k, v in headers:
        n = len(k)
        if n == 11:
            if k.lower() == b"traceparent":
                parts = v.strip().split(b"-")
                if len(parts) >= 4 and len(parts[1]) == 32:
                    return _hex_id(parts[1])
                return ""
        elif (n == 2 or n == 12) and not b3 and k.lower() in (b"b3", b"x-b3-traceid"):
            b3 = v.strip().split(b"-", 1)[0]
    return _hex_id(b3) if len(b3) in (16, 32) else ""


_second: list[Any] = [-1, ""]  # the last second formatted, and its text


def _new_second(sec: int) -> str:
    """strftime once a second, not once a line."""
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    _second[:] = [sec, text]
    return text


def endpoint_name(ep: Endpoint | None) -> str:
    if ep is None:
        return ""
    return f"[{ep.host}]:{ep.port}" if ":" in ep.host else f"{ep.host}:{ep.port}"


_J = json.encoder.encode_basestring_ascii  # json.dumps of one str (C), quotes included

_ESCAPES = {i: f"\\x{i:02x}" for i in list(range(0x20)) + list(range(0x7f, 0x100))}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r",
                 ord("\t"): "\\t"})
_PLAIN = re.compile(rb'[ !#-\[\]-~]*').fullmatch  # printable ASCII but quote and backslash
EMPTY = '""'


def quote(value: str) -> str:
    """A text field in double quotes: backslash, quote and anything outside printable
    ASCII escaped, so it stays one token on one line."""
    return '"' + value.translate(_ESCAPES) + '"'


def _token(value: str) -> str:
    """An unquoted text field: escaped as ``quote`` does, spaces too; "" is "-"."""
    return value.translate(_ESCAPES).replace(" ", "\\x20") if value else "-"


# The text of the long-lived objects a line names (a listener, the endpoint that
# answered: config and discovery objects), made once per object: id -> (the object, its
# JSON text, its text-format text). The object is kept, so its id is not reused while
# it is here; bounded (endpoints come and go with discovery): at CACHED it starts over.
_known: dict[int, tuple[Any, str, str]] = {}
_NOTHING = (object(), "", "")  # no object's texts


def _remember(obj: Any, texts: tuple[str, str]) -> tuple[Any, str, str]:
    if len(_known) >= CACHED:
        _known.clear()
    made = _known[id(obj)] = (obj, *texts)
    return made


def _listener(listener: ListenerConfig) -> tuple[Any, str, str]:
    return _remember(listener, (
        f'"direction":{_J(listener.direction)},"listener":{_J(listener.name)}',
        f"{_token(listener.direction)} {_token(listener.name)}"))


def _endpoint(ep: Endpoint | None) -> tuple[Any, str, str]:
    name = endpoint_name(ep)
    return _remember(ep, (_J(name), _token(name)))


def _json_text(value: bytes) -> str:
    """A client's bytes (bounded) as a JSON string: latin-1, escaped by json's encoder."""
    return _J(value.decode("latin-1"))


def _text_text(value: bytes) -> str:
    """A client's bytes (bounded) as a quoted text field; plain ASCII as it is."""
    return '"' + value.decode() + '"' if _PLAIN(value) else quote(value.decode("latin-1"))


def _bound(value: bytes | None, limit: int) -> bytes:
    """At most ``limit`` bytes, "..." marking a cut (as ``_cut``); None is b""."""
    if value is None:
        return b""
    return value if len(value) <= limit else value[:limit] + b"..."


def lines(queue: collections.deque[Record], budget: int, as_json: bool) -> list[str]:
    """The lines of the records at the left of ``queue`` (taken off it), until ``budget``
    characters or the queue's end: JSON objects (``as_json``: ``json.dumps`` of the fields,
    compact and ASCII, each string through json's own encoder), else text lines
    (``time direction listener client client_id "METHOD" "authority" "path" status
    grpc_status endpoint duration_ms attempts trace_id bytes_received bytes_sent``, empty
    fields "-", the client id quoted, ""). Text lines may hold characters beyond latin-1
    (of a client id, a listener's name) until the batch is encoded (``AccessLog.flush``).

    One loop, one f-string a line, no dict nor loop over the fields; what repeats from
    line to line (the millisecond's time stamp, the client, its id, method, authority,
    path) is escaped once per change, the listener's and endpoint's text once per
    object."""
    esc = _json_text if as_json else _text_text
    J = _J
    known = _known
    pop = queue.popleft
    out: list[str] = []
    size = 0
    last_sec, second = _second
    last_ms = -1
    stamp = c_text = i_text = m_text = a_text = p_text = ""
    at = to = _NOTHING  # the listener's and the endpoint's texts, as of the line before
    # the last client, client id, method, authority and path: what the texts are of
    c_raw: Any = None
    i_raw: Any = None
    m_raw: Any = None
    a_raw: Any = 0     # (authority may be None)
    p_raw: Any = None
    while queue and size < budget:
        (wall, listener, client, client_id, method, authority, path, status, grpc, ep,
         duration, attempts, trace, received, sent) = pop()
        ms = int(wall * 1000 + 0.5)
        if ms != last_ms:
            last_ms = ms
            if ms // 1000 != last_sec:
                last_sec = ms // 1000
                second = _new_second(last_sec)
            stamp = f"{second}.{ms % 1000:03d}Z"
        if listener is not at[0]:  # mostly the line before's
            at = known.get(id(listener)) or at
            if at[0] is not listener:
                at = _listener(listener)
        if ep is not to[0]:
            to = known.get(id(ep)) or to
            if to[0] is not ep:
                to = _endpoint(ep)
        if client != c_raw:
            c_raw = client
            c_text = J(client.decode("latin-1")) if as_json else _token(client.decode("latin-1"))
        if method != m_raw:
            m_raw = method
            m_text = esc(_bound(method, MAX_METHOD))
        if authority != a_raw:
            a_raw = authority
            a_text = esc(_bound(authority, MAX_AUTHORITY))
        if client_id != i_raw:
            i_raw = client_id
            i_text = J(client_id) if as_json else quote(client_id) if client_id else EMPTY
        if path != p_raw:
            p_raw = path
            p_text = esc(path if len(path) <= MAX_PATH else path[:MAX_PATH] + b"...")
        # repr(round(duration * 1000, 3)) as ``fields`` has it, for a third of its cost:
        # the same correctly rounded digits, trailing zeros dropped as repr drops them
        dur = f"{duration * 1000:.3f}".rstrip("0")
        if dur[-1] == ".":
            dur += "0"
        if as_json:
            line = (f'{{"time":"{stamp}",{at[1]},"client":{c_text},"client_id":{i_text},'
                    f'"method":{m_text},"authority":{a_text},"path":{p_text},'
                    f'"status":{status},"grpc_status":"{"" if grpc is None else grpc}",'
                    f'"endpoint":{to[1]},"duration_ms":{dur},"attempts":{attempts},'
                    f'"trace_id":"{trace}","bytes_received":{received},"bytes_sent":{sent}}}\n')
        else:
            line = (f"{stamp} {at[2]} {c_text} {i_text} {m_text} {a_text} {p_text} {status} "
                    f"{'-' if grpc is None else grpc} {to[2]} {dur} {attempts} "
                    f"{trace or '-'} {received} {sent}\n")
        out.append(line)
        size += len(line)
    return out


F_DROPPED = F_WORKER + WORKER_COUNTS.index("access_log_dropped")


class AccessLog:
    """A worker's access log: ``request`` on the request path, a writer greenlet behind.

    The queue is a plain deque the writer empties every FLUSH_INTERVAL: appending wakes
    no greenlet (a gevent queue would switch to the writer after every request), and
    the lines of a busy interval go out in a few writes."""

    def __init__(self, config: AccessLogConfig) -> None:
        self.config = config
        self.json = config.format == "json"
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

    def request(self, listener: ListenerConfig, client: bytes, client_id: str, method: bytes,
                authority: bytes | None, path: bytes, status: int, call: Call | None,
                started: float, headers: Sequence[tuple[bytes, bytes]],
                answered: UpstreamExchange | None = None, received: int = 0,
                sent: int = 0) -> None:
        """Record one finished request (from ``meshd.worker.observe``, where every
        request ends, with ``started`` the monotonic time its head arrived). ``headers``:
        as sent upstream (its trace id is read now); ``answered``: the exchange whose
        response a gRPC request got (its ``grpc-status`` is read now); ``received``,
        ``sent``: its body bytes."""
        queue = self.queue
        if len(queue) >= self.limit or self.fd < 0:
            self._drop()
            return
        ep = None
        attempts = 0
        if call is not None:
            tried = call.tried
            if tried:
                attempts = len(tried)
                ep = call.endpoints[tried[-1]]
        queue.append((time.time(), listener, client, client_id, method, authority, path,
                      status, None if answered is None else grpc_status_code.of_answer(answered),
                      ep, time.monotonic() - started, attempts,
                      trace_id(headers) if headers else "", received, sent))

    def rejected(self, listener: ListenerConfig, client: bytes, client_id: str, head: bytes,
                 status: int, started: float, sent: int = 0) -> None:
        """Record an HTTP/1.1 request refused before it could be parsed (its answer is
        ``status``, with a body of ``sent`` bytes): the method and target as far as its
        request line tells."""
        line = head[:MAX_PATH + MAX_METHOD + 16].split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        method = parts[0] if len(parts) > 1 else b""
        path = parts[1] if len(parts) > 1 else b""
        self.record((time.time(), listener, client, client_id, method, None, path, status,
                     None, None, time.monotonic() - started, 0, "", 0, sent))

    def record(self, rec: Record) -> None:
        """Queue one line; drop it (counted) when the writer is behind."""
        if len(self.queue) < self.limit and self.fd >= 0:
            self.queue.append(rec)
        else:
            self._drop()

    def _drop(self) -> None:
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
        while queue:
            batch = lines(queue, BATCH_BYTES, self.json)
            # ASCII but what a client id or a config name has beyond latin-1 (text)
            self._write("".join(batch).encode("ascii", "backslashreplace"))
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
