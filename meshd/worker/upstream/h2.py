"""HTTP/2 toward upstreams: one connection to one endpoint carries many streams.

``H2Upstream`` owns one connection (h2c with prior knowledge, RFC 9113 §3.3; or a TLS
socket on which ALPN selected "h2", ``meshd.worker.upstream.tls``), ``H2Stream`` one
request/response exchange on it, and ``meshd.worker.upstream.h2_pool`` keeps a worker's
connections, reusing one per endpoint while it has room.

Use: ``pool.stream(address, head, end_stream, connect_timeout)``, then ``send_data`` /
``end`` / ``send_trailers`` for the body, ``response(deadline)`` for the head and
``read(timeout)`` until None for the body (``trailers`` after that). A stream that is
abandoned before both sides ended must be ``reset()``: it holds a slot and up to its
window in memory until then. Failures raise ``UpstreamError`` / ``UpstreamTimeout``;
``StreamNotOpened`` and ``refused`` say when nothing reached the upstream (retry-safe).

Concurrency: one reader greenlet per connection feeds the bytes to ``h2`` and hands the
events to the streams; callers write from their own greenlets. h2's connection object
is not reentrant and frames must reach the wire in the order h2 produced them, so every
mutation of it and the ``sendall`` of its output happen under one lock. Waiting (for a
response, data, or send window) happens outside the lock on gevent events. Sockets are
gevent's own (``gevent.socket``), so the module is cooperative with or without
monkey-patching.

Bounds: a stream buffers at most the window meshd advertises for it (``stream_window``,
1 MiB), and the connection at most ``connection_window`` (16 MiB) over all its streams;
windows are handed back only as the caller reads, so an unread stream stalls its
sender instead of growing a buffer. Response heads are limited by
SETTINGS_MAX_HEADER_LIST_SIZE and the HPACK decoder's limit; frame lengths are checked
as headers arrive (h2 would buffer a whole announced frame, up to 16 MiB, first). Every
wait has a deadline; a write the peer does not take for ``WRITE_TIMEOUT`` fails the
connection.

Each connection has a watchdog greenlet (``_watch``). Without streams, it closes the
connection once idle for ``idle_timeout`` (the service's). With ``ping_timeout`` (the
pool sets it for peer meshds only: gRPC servers punish frequent PINGs), streams waiting
and no frame from the peer for half of it, it sends a PING; no frame back within
``ping_timeout`` and the peer is silent (a stopped process, a dead host): the
connection takes no new stream (the pool opens another), each waiting stream marked
``retry_safe`` fails with ``PeerSilent`` (the attempt loop sends it again), the others
wait on until their own deadlines, and the connection closes after its last stream.

GOAWAY from the peer: streams above its last_stream_id were never processed and fail
with ``refused`` set (safe to retry elsewhere); the ones below finish, then the
connection closes. h2 moves its connection state to CLOSED on a received GOAWAY
(python-hyper/h2#1181), which would fail those streams too, so ``_Connection`` keeps
the state open; meshd itself opens no stream after it.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.ssl
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from meshd.errors import NotSent, PeerSilent, StreamRefused, UpstreamError, UpstreamTimeout
from meshd.proto.h2_connection import H2Connection
from meshd.proto.h2_headers import request_problem, response_problem, trailers_problem
from meshd.ratelog import Throttle
from meshd.shm import F_IDLE_REAPED, F_PING_TIMEOUT, Stripe
from meshd.worker.sockio import address_name, recv, recv_after_wait, sendall, tcp_connect

log = logging.getLogger("meshd.worker")
quiet = Throttle(log)  # a peer decides how often its connections go silent

Headers = list[tuple[bytes, bytes]]

READ_SIZE = 65536
STREAM_WINDOW = 1 << 20         # what an upstream may send ahead on one stream
CONNECTION_WINDOW = 1 << 24     # ... and on the whole connection
MAX_HEADER_LIST_SIZE = 1 << 16  # a response head after HPACK decoding
MAX_INFORMATIONAL = 8           # 1xx heads kept per stream (more are dropped, not stored)
WRITE_TIMEOUT = 30.0            # a peer that takes no bytes this long is gone
IDLE_TIMEOUT = 300.0            # a connection without streams this long is closed (the
                                # default; the pool sets the service's idle_timeout)
PING_DATA = b"meshd\0\0\0"       # the 8 bytes of our PINGs
WRITE_BATCH = 1 << 17           # DATA bytes framed per lock hold, so streams interleave
CANCEL = h2.errors.ErrorCodes.CANCEL
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR


class StreamNotOpened(UpstreamError):
    """The connection took no stream (closed, draining, full, out of stream ids, or the
    head is invalid): nothing was sent, so another connection may be tried."""


def code_name(code: int | None) -> str:
    """The RFC 9113 §7 name of an error code, or its hex value when unknown."""
    if code is None:
        return "NO_ERROR"
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


def check_headers(headers: Headers, trailers: bool = False) -> None:
    """Raise ``UpstreamError`` for a head the peer would refuse as malformed (the rules
    of RFC 9113 §8.2/8.3, meshd.proto.h2_headers). Checked before h2 sees it: h2 is told
    not to validate what it sends, and a refusal midway would leave its HPACK encoder's
    table ahead of the peer's decoder and the connection unusable."""
    if trailers:
        problem = trailers_problem(headers)
        if problem:
            raise UpstreamError(f"invalid trailers: {problem}")
        return
    problem = request_problem(headers)
    if problem:
        raise StreamNotOpened(f"invalid request head: {problem}")


class _Connection(H2Connection):
    """h2's connection, kept open after a received GOAWAY so streams it covers finish."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        before = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if before != h2.connection.ConnectionState.CLOSED:
            self.state_machine.state = before
        return result


class _FrameGuard:
    """Checks each frame header as its bytes arrive, before h2 sees the frame: h2 buffers
    a whole frame before it checks the length, which the 24-bit field lets reach 16 MiB.
    The first frame must be the server's SETTINGS (RFC 9113 §3.4), so a peer that does
    not speak HTTP/2 is named as such."""

    __slots__ = ("header", "skip", "frames")

    def __init__(self) -> None:
        self.header = bytearray()
        self.skip = 0      # body bytes of the current frame still to come
        self.frames = 0

    def feed(self, data: bytes, max_size: int) -> tuple[int, str] | None:
        """None, or what is wrong with the bytes: (error code, reason)."""
        pos, end = 0, len(data)
        while pos < end:
            if self.skip:
                step = min(self.skip, end - pos)
                self.skip -= step
                pos += step
                continue
            take = min(9 - len(self.header), end - pos)
            self.header += data[pos:pos + take]
            pos += take
            if len(self.header) < 9:
                return None
            length = int.from_bytes(self.header[:3], "big")
            if self.frames == 0 and (self.header[3] != 0x4 or self.header[4] & 0x1):
                return (h2.errors.ErrorCodes.PROTOCOL_ERROR,
                        f"the upstream does not speak HTTP/2: it sent {bytes(data[:24])!r}")
            if length > max_size:
                return (h2.errors.ErrorCodes.FRAME_SIZE_ERROR,
                        f"protocol error (FRAME_SIZE_ERROR): a frame of {length} bytes")
            self.frames += 1
            self.skip = length
            self.header.clear()
        return None


class H2Stream:
    """One request/response on an ``H2Upstream``. One greenlet uses it at a time (the
    proxy's request greenlet may hand the sending half to a second one)."""

    def __init__(self, upstream: H2Upstream, stream_id: int) -> None:
        self.upstream = upstream
        self.stream_id = stream_id
        self.informational: list[Headers] = []
        self.head: Headers | None = None
        self.trailers: Headers | None = None
        self.refused = False
        # the attempt may be sent again: abandoned when the peer goes silent (PeerSilent)
        self.retry_safe = False
        self.reset_code: int | None = None  # the code of the upstream's RST_STREAM
        self.buffered = 0                 # received bytes not yet read (<= stream window)
        self._chunks: collections.deque[tuple[bytes, int]] = collections.deque()
        self._remote_ended = False
        self._local_ended = False
        self._upload_stopped = False      # response complete, then RST_STREAM(NO_ERROR)
        self._error: str | None = None    # why the stream cannot go on (UpstreamError text)
        self._reset_sent = False
        self._changed = gevent.event.Event()  # head, data, end or error arrived
        self._window = gevent.event.Event()   # send window opened, or an error

    def __repr__(self) -> str:
        return f"<H2Stream {self.stream_id} of {self.upstream.name}>"

    @property
    def ended(self) -> bool:
        """The upstream ended its side (the response is complete, perhaps unread)."""
        return self._remote_ended

    # -- sending ------------------------------------------------------------------------

    def send_data(self, data: bytes, end_stream: bool = False, timeout: float = 60.0) -> None:
        """Send ``data`` as DATA frames as the flow-control windows and frame size allow.
        ``timeout`` bounds each wait for a window; when it passes the stream is reset
        (CANCEL) and ``UpstreamTimeout`` raised."""
        up = self.upstream
        conn = up.conn
        view = memoryview(data)
        while True:
            with up.lock:
                if self._check_send():
                    return
                if not view:
                    if end_stream:
                        conn.end_stream(self.stream_id)
                        self._sent_end()
                    up.flush()
                    return
                batch = 0
                try:
                    while view and batch < WRITE_BATCH:
                        size = min(len(view), conn.send_room(self.stream_id))
                        if size <= 0:
                            break
                        last = size == len(view)
                        conn.send_data(self.stream_id, view[:size],
                                       end_stream=end_stream and last)
                        view = view[size:]
                        batch += size
                except h2.exceptions.H2Error as e:  # h2 holds the stream closed
                    raise UpstreamError(f"{self!r}: cannot send: {e}") from None
                if end_stream and not view:
                    self._sent_end()
                up.flush()
                if not view:
                    return
                if batch:
                    continue
                self._window.clear()
            if not self._window.wait(timeout):
                self.reset(CANCEL)
                raise UpstreamTimeout(f"{self!r}: no send window from the upstream "
                                      f"for {timeout:g}s")

    def end(self) -> None:
        """End our side with an empty DATA frame carrying END_STREAM."""
        up = self.upstream
        with up.lock:
            if self._check_send():
                return
            up.conn.end_stream(self.stream_id)
            self._sent_end()
            up.flush()

    def send_trailers(self, headers: Headers) -> None:
        """Send trailers; they end our side of the stream."""
        up = self.upstream
        check_headers(headers, trailers=True)
        with up.lock:
            if self._check_send():
                return
            try:
                up.conn.send_headers(self.stream_id, headers, end_stream=True)
            except h2.exceptions.ProtocolError as e:
                up._lost(f"h2 refused trailers midway, HPACK state unknown: {e}")
                raise UpstreamError(f"{self!r}: cannot send trailers: {e}") from None
            self._sent_end()
            up.flush()

    def _check_send(self) -> bool:
        """Under the lock: True when sending is to be skipped silently (the upstream has
        answered and asked us to stop with RST_STREAM NO_ERROR, RFC 9113 §8.1); raises
        when the stream cannot take data."""
        if self._upload_stopped:
            return True
        if self._error is not None:
            raise UpstreamError(self._error)
        if self._local_ended:
            raise UpstreamError(f"{self!r}: our side of the stream already ended")
        return False

    def _sent_end(self) -> None:
        self._local_ended = True
        if self._remote_ended:
            self.upstream._stream_done(self)

    # -- receiving ----------------------------------------------------------------------

    def response(self, deadline: float) -> Headers:
        """The final response head (with :status); 1xx heads are skipped into
        ``informational``. At the monotonic ``deadline`` the stream is reset (CANCEL)
        and ``UpstreamTimeout`` raised."""
        while True:
            if self.head is not None:
                return self.head
            if self._error is not None:
                raise (StreamRefused if self.refused else UpstreamError)(self._error)
            up = self.upstream
            if up.silent and self.retry_safe:
                self.reset(CANCEL)
                raise PeerSilent(f"{self!r}: {up.name} answered no PING within "
                                 f"{up.ping_timeout:g}s")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.reset(CANCEL)
                raise UpstreamTimeout(f"{self!r}: no response head before the deadline")
            self._changed.clear()
            self._changed.wait(remaining)

    def read(self, timeout: float) -> bytes | None:
        """The next DATA payload (never empty), or None at the end of the stream. The
        window is given back to the upstream as payloads are read. After ``timeout``
        with nothing to read the stream is reset (CANCEL) and ``UpstreamTimeout`` raised.
        Data that arrived before the upstream ended the stream is delivered even if the
        connection is lost afterwards."""
        deadline = time.monotonic() + timeout
        while True:
            if self._chunks:
                data, flow = self._chunks.popleft()
                self.buffered -= len(data)
                self.upstream._acknowledge(self, flow)
                return data
            if self._remote_ended:
                return None
            if self._error is not None:
                raise UpstreamError(self._error)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.reset(CANCEL)
                raise UpstreamTimeout(f"{self!r}: no data from the upstream for {timeout:g}s")
            self._changed.clear()
            self._changed.wait(remaining)

    def reset(self, code: int = CANCEL) -> None:
        """Reset the stream (RST_STREAM ``code``); idempotent, and a no-op once both
        sides ended. A response the upstream had completed stays readable."""
        up = self.upstream
        with up.lock:
            if self._reset_sent or (self._local_ended and self._remote_ended):
                return
            self._reset_sent = True
            if self._error is None and up.conn_usable:
                try:
                    up.conn.reset_stream(self.stream_id, code)
                except h2.exceptions.H2Error:  # h2 already considers it closed
                    pass
                up.flush(raise_errors=False)
            if self._error is None:
                self._error = f"{self!r} was reset by meshd ({code_name(code)})"
            self._fail_locked()
            up._stream_done(self)

    # -- called by the connection, under its lock ------------------------------------------

    def _fail_locked(self) -> None:
        """The stream cannot go on (``_error`` says why): drop unread data unless the
        response was complete, give its window back, wake the waiters."""
        if not self._remote_ended and self._chunks:
            flow = sum(f for _, f in self._chunks)
            self._chunks.clear()
            self.buffered = 0
            self.upstream._acknowledge(self, flow)
        self._changed.set()
        self._window.set()


class H2Upstream:
    """One HTTP/2 connection to one endpoint, many streams. Create with ``connect``."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], *,
                 stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW,
                 max_header_list_size: int = MAX_HEADER_LIST_SIZE) -> None:
        self.sock = sock
        self.address = address
        self.name = address_name(address)
        self.conn = _Connection(client_side=True, max_header_list_size=max_header_list_size)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        })
        self.connection_window = connection_window
        self.lock = gevent.lock.RLock()
        self.streams: dict[int, H2Stream] = {}
        self.alive = True            # may take new streams (False after GOAWAY, error, close)
        self.draining = False        # goaway(): no new streams, close when the last ends
        self.closed = False          # the socket is closed
        self.close_reason = ""
        self.goaway_received: tuple[int, int] | None = None  # (error code, last stream id)
        self.idle_timeout = IDLE_TIMEOUT
        self.ping_timeout = 0.0  # no PING unless the pool sets one (peer meshds)
        self.idle_since = time.monotonic()
        self.last_heard = self.idle_since  # when a frame (any bytes) last came from the peer
        self.silent = False                # no answer to a PING in time: taken out of use
        # Where its events are counted (the pool's): the worker's stripe, on the
        # (listener, service) row of the last stream opened (meshd.shm UPSTREAM_EVENTS).
        self.events: Stripe | None = None
        self.row = -1
        self._busy_since = 0.0             # when the first of the current streams opened
        self._ping_sent: float | None = None  # a PING is out, unanswered, since
        self._wake = gevent.event.Event()  # for the watchdog: streams came or went, closed
        self._watchdog: gevent.Greenlet | None = None
        self._settings = gevent.event.Event()  # the peer's first SETTINGS arrived
        self._reader: gevent.Greenlet | None = None
        self._guard = _FrameGuard()

    def __repr__(self) -> str:
        return f"<H2Upstream {self.name} streams={len(self.streams)} alive={self.alive}>"

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def connect(cls, address: tuple[str, int], timeout: float, *,
                stream_window: int = STREAM_WINDOW, connection_window: int = CONNECTION_WINDOW,
                max_header_list_size: int = MAX_HEADER_LIST_SIZE) -> H2Upstream:
        """Connect (h2c, prior knowledge) and ``start_on`` the socket within ``timeout``.
        ``stream_window`` and ``connection_window`` are the receive windows meshd
        advertises, hence its buffer bounds. (Over TLS: ``TlsTarget.connect_h2``, then
        ``start_on``.)"""
        deadline = time.monotonic() + timeout
        return cls.start_on(tcp_connect(address, timeout), address, deadline,
                            stream_window=stream_window, connection_window=connection_window,
                            max_header_list_size=max_header_list_size)

    @classmethod
    def start_on(cls, sock: Any, address: tuple[str, int], deadline: float, *,
                 stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW,
                 max_header_list_size: int = MAX_HEADER_LIST_SIZE) -> H2Upstream:
        """HTTP/2 on a connected socket (plain, or TLS on which ALPN selected "h2"): the
        preface and our SETTINGS, then the upstream's SETTINGS awaited until ``deadline``
        (``time.monotonic()``): so a peer that does not speak HTTP/2 fails here, and
        ``available`` knows its MAX_CONCURRENT_STREAMS from the first stream on. The
        socket is the connection's from here on."""
        name = address_name(address)
        try:
            sock.settimeout(WRITE_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        up = cls(sock, address, stream_window=stream_window,
                 connection_window=connection_window,
                 max_header_list_size=max_header_list_size)
        up._start()
        remaining = deadline - time.monotonic()
        if not up._settings.wait(max(remaining, 0.0)):
            up._lost("no SETTINGS from the upstream in time")
            raise UpstreamTimeout(f"{name} sent no HTTP/2 SETTINGS in time")
        if up.closed:
            raise UpstreamError(f"HTTP/2 to {name} failed: {up.close_reason}")
        return up

    def _start(self) -> None:
        with self.lock:
            self.conn.initiate_connection()
            extra = self.connection_window - self.conn.inbound_flow_control_window
            if extra > 0:
                self.conn.increment_flow_control_window(extra)
            self.flush()
        self._reader = gevent.spawn(self._read_loop)
        self._watchdog = gevent.spawn(self._watch)

    def available(self) -> bool:
        """Alive, not draining, and fewer open streams than the peer allows."""
        return (self.alive and not self.draining and not self.closed
                and len(self.streams) < self.conn.remote_settings.max_concurrent_streams)

    @property
    def conn_usable(self) -> bool:
        return not self.closed

    def goaway(self) -> None:
        """Graceful: no new streams; the connection closes when the last one ends."""
        self.draining = True
        self.alive = False
        if not self.streams:
            self.close()

    def close(self, reason: str = "closed by meshd") -> None:
        """GOAWAY(NO_ERROR), then close; streams still open fail (with ``reason``)."""
        with self.lock:
            if self.closed:
                return
            try:
                self.conn.close_connection(h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.H2Error:
                pass
            self.flush(raise_errors=False)
            self._lost(reason)

    # -- streams ------------------------------------------------------------------------

    def open_stream(self, headers: Headers, end_stream: bool, checked: bool = False) -> H2Stream:
        """Send a request head (pseudo-headers included) on a new stream. Raises
        ``StreamNotOpened`` (an ``UpstreamError``) when the connection cannot take a
        stream now, ``UpstreamError`` when it was lost while sending the head.
        ``checked``: the caller has run ``check_headers`` on it already."""
        if not checked:
            check_headers(headers)
        with self.lock:
            if self.closed or not self.alive or self.draining:
                why = self.close_reason or ("draining" if self.draining else "GOAWAY received")
                raise StreamNotOpened(f"HTTP/2 connection to {self.name} takes no new "
                                    f"streams: {why}")
            conn = self.conn
            try:
                stream_id = conn.get_next_available_stream_id()
            except h2.exceptions.NoAvailableStreamIDError:
                self.goaway()  # stream ids are spent: let the pool open another connection
                raise StreamNotOpened(f"HTTP/2 connection to {self.name} ran out of "
                                    "stream ids") from None
            stream = H2Stream(self, stream_id)
            try:
                conn.send_headers(stream_id, headers, end_stream=end_stream)
            except h2.exceptions.TooManyStreamsError as e:
                raise StreamNotOpened(f"HTTP/2 connection to {self.name} is full: {e}") from None
            except h2.exceptions.ProtocolError as e:
                # check_headers passed, yet h2 refused midway: its HPACK encoder may be
                # ahead of the peer's decoder, so the connection cannot be trusted.
                self._lost(f"h2 refused a request head midway: {e}")
                raise UpstreamError(f"cannot send request head to {self.name}: {e}") from None
            if not self.streams:
                self._busy_since = time.monotonic()
                self._wake.set()
            self.streams[stream_id] = stream
            stream._local_ended = end_stream
            try:
                self.flush()
            except UpstreamError as e:  # the head did not go in full: never processed
                raise NotSent(f"write failed before sending to {self.name}: "
                              f"{self.close_reason}") from e
        return stream

    def _stream_done(self, stream: H2Stream) -> None:
        """Under the lock: the stream needs the connection no more."""
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            self.idle_since = time.monotonic()
            self._wake.set()
        if not self.streams and (self.draining or self.goaway_received) and not self.closed:
            self.close(f"no PING answer within {self.ping_timeout:g}s" if self.silent
                       else "closed by meshd")

    def _acknowledge(self, stream: H2Stream, flow: int) -> None:
        """Give ``flow`` bytes of window back (the caller read or dropped them)."""
        if flow <= 0:
            return
        with self.lock:
            if self.closed:
                return
            self.conn.acknowledge_received_data(flow, stream.stream_id)
            self.flush(raise_errors=False)

    # -- I/O ----------------------------------------------------------------------------

    def flush(self, raise_errors: bool = True) -> None:
        """Under the lock: write what h2 has queued. A write that fails, times out or is
        interrupted (a gevent.Timeout in the caller) may have cut a frame: the
        connection is lost."""
        data = self.conn.data_to_send()
        if not data or self.closed:
            return
        try:
            sendall(self.sock, data)
        except OSError as e:
            self._lost(f"write failed: {e}")
            if raise_errors:
                raise UpstreamError(f"HTTP/2 connection to {self.name} lost: "
                                    f"{self.close_reason}") from None
        except BaseException:
            self._lost("write interrupted")
            raise

    def _read_loop(self) -> None:
        reason = "the upstream closed the connection"
        drained = False  # the last read took less than it could: wait before the next
        try:
            while not self.closed:
                try:
                    data = (recv_after_wait if drained else recv)(self.sock, READ_SIZE)
                    drained = len(data) < READ_SIZE
                except TimeoutError:  # quiet for WRITE_TIMEOUT (the socket's timeout)
                    continue
                except OSError as e:
                    reason = f"read failed: {e}"
                    break
                if not data:
                    break
                self.last_heard = time.monotonic()  # the peer is there: a PING is answered
                self._ping_sent = None
                with self.lock:
                    if self.closed:
                        break
                    wrong = self._guard.feed(data, self.conn.max_inbound_frame_size)
                    if wrong is not None:
                        code, reason = wrong
                        self.conn.close_connection(code)
                        self.flush(raise_errors=False)
                        break
                    try:
                        events = self.conn.receive_data(data)
                    except h2.exceptions.ProtocolError as e:
                        # h2 queued GOAWAY with the error's code; say it, then close.
                        self.flush(raise_errors=False)
                        reason = f"protocol error ({code_name(e.error_code)}): {e}"
                        break
                    for event in events:
                        self._dispatch(event)
                    self.flush(raise_errors=False)
        except Exception as e:  # the top of the greenlet: fail the streams, keep the worker
            log.exception("HTTP/2 upstream %s: reader failed", self.name)
            reason = f"reader failed: {e!r}"
        finally:
            with self.lock:
                self._lost(reason)

    def _watch(self) -> None:
        """The watchdog: idle connections closed after ``idle_timeout``; a PING when
        streams wait and the peer has been quiet for half of ``ping_timeout``, and the
        peer marked silent when nothing comes back within ``ping_timeout``."""
        try:
            while not self.closed:
                now = time.monotonic()
                if not self.streams:
                    left = self.idle_since + self.idle_timeout - now
                    if left <= 0:
                        self.close(f"idle for {self.idle_timeout:g}s")
                        self._count(F_IDLE_REAPED)
                        return
                    self._sleep(left)
                elif self.ping_timeout <= 0 or self.silent:
                    self._sleep(None)  # until the streams are gone
                elif self._ping_sent is None:
                    left = max(self.last_heard, self._busy_since) + self.ping_timeout / 2 - now
                    if left > 0:
                        self._sleep(left)
                    else:
                        self._ping(now)
                else:
                    left = self._ping_sent + self.ping_timeout - now
                    if left > 0:
                        self._sleep(left)
                    else:
                        self._silence()
        except Exception:  # the top of the greenlet: the connection goes, the worker stays
            log.exception("HTTP/2 upstream %s: watchdog failed", self.name)
            with self.lock:
                self._lost("watchdog failed")

    def _count(self, field: int) -> None:
        if self.events is not None and self.row >= 0:
            self.events.add(self.row, field)

    def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        self._wake.wait(timeout)

    def _ping(self, now: float) -> None:
        # A writer holding the lock this long is itself stuck on a peer that reads nothing.
        if not self.lock.acquire(timeout=self.ping_timeout):
            self._ping_sent = now
            return
        try:
            if self.closed:
                return
            self._ping_sent = now
            self.conn.ping(PING_DATA)
            self.flush(raise_errors=False)
        finally:
            self.lock.release()

    def _silence(self) -> None:
        """No answer to our PING in time: no new streams here; the waiting streams that
        may be retried give up (``H2Stream.response``); closed after the last stream."""
        self.silent = True
        self.alive = False
        self.draining = True
        self._count(F_PING_TIMEOUT)
        quiet.warning("h2-silent", "HTTP/2 upstream %s answered no PING within %gs: "
                      "taking it out of use (%d streams waiting)", self.name,
                      self.ping_timeout, len(self.streams))
        for stream in list(self.streams.values()):
            stream._changed.set()
        if not self.streams:
            self.close(f"no PING answer within {self.ping_timeout:g}s")

    def _lost(self, reason: str) -> None:
        """Under the lock (or from the reader's end): close the socket and fail every
        stream that still needs the connection."""
        if self.closed:
            return
        self.closed = True
        self.alive = False
        self.close_reason = reason
        self._settings.set()
        self._wake.set()
        try:
            self.sock.close()
        except OSError:
            pass
        if self.goaway_received is not None:
            code, last = self.goaway_received
            reason += f" (after GOAWAY({code_name(code)}) with last stream {last})"
            self.close_reason = reason
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            if stream._error is None:
                stream._error = f"HTTP/2 connection to {self.name} lost: {reason}"
            stream._fail_locked()
        log.debug("HTTP/2 upstream %s closed: %s", self.name, reason)

    # -- events -------------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and self._well_formed(stream, event.headers, "response head"):
                stream.head = event.headers
                stream._changed.set()
        elif isinstance(event, h2.events.InformationalResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and self._well_formed(stream, event.headers, "1xx head") \
                    and len(stream.informational) < MAX_INFORMATIONAL:
                stream.informational.append(event.headers)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None and self._well_formed(stream, event.headers, "trailers"):
                stream.trailers = event.headers
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._remote_ended = True
                stream._changed.set()
                if stream._local_ended:
                    self._stream_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._window.set()
            else:
                self._wake_senders()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings.set()
            self._wake_senders()  # INITIAL_WINDOW_SIZE or MAX_FRAME_SIZE may have grown
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        # PING and SETTINGS are answered by h2 (flushed by the caller); the rest is ignored.

    def _well_formed(self, stream: H2Stream, headers: Headers, what: str) -> bool:
        """A malformed head from the upstream fails its stream (RST_STREAM
        PROTOCOL_ERROR, RFC 9113 §8.1.1); the connection goes on."""
        problem = trailers_problem(headers) if what == "trailers" else response_problem(headers)
        if problem is None:
            return True
        stream.reset(PROTOCOL_ERROR)
        stream._error = f"{stream!r}: malformed {what} from the upstream: {problem}"
        return False

    def _wake_senders(self) -> None:
        for stream in self.streams.values():
            stream._window.set()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        flow = event.flow_controlled_length or 0
        if stream is None or stream._error is not None or not event.data:
            # Nobody will read it (or it was all padding): hand the window back now.
            if flow:
                self.conn.acknowledge_received_data(flow, event.stream_id)
            return
        stream._chunks.append((event.data, flow))
        stream.buffered += len(event.data)
        stream._changed.set()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        code = int(event.error_code)
        if event.remote_reset and stream._remote_ended and code == h2.errors.ErrorCodes.NO_ERROR:
            stream._upload_stopped = True  # answered in full; the rest of the body is unwanted
        elif event.remote_reset:
            stream.refused = code == REFUSED_STREAM
            stream.reset_code = code
            stream._error = f"{stream!r} reset by the upstream ({code_name(code)})"
        else:  # h2 reset it: the upstream broke the protocol on this stream
            stream._error = f"{stream!r}: the upstream sent an invalid frame ({code_name(code)})"
        stream._reset_sent = True
        stream._fail_locked()
        self._stream_done(stream)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        code = int(event.error_code or 0)
        last = event.last_stream_id or 0
        self.goaway_received = (code, last)
        self.alive = False
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                stream.refused = True
                stream._error = (f"{stream!r} not processed: the upstream sent "
                                 f"GOAWAY({code_name(code)}) with last stream {last}")
                stream._reset_sent = True  # the peer forgot it; no RST_STREAM needed
                stream._fail_locked()
                del self.streams[stream_id]
        log.debug("HTTP/2 upstream %s sent GOAWAY(%s, last stream %d)",
                  self.name, code_name(code), last)
        if not self.streams:
            self.close()
