"""HTTP/2 from clients (prior knowledge, RFC 9113 §3.3), on the ``h2`` library.

One greenlet reads the connection and feeds ``h2``; each request stream is a task on a
reused greenlet (``meshd.worker.tasks``), which proxies it (``meshd.worker.client.h2_stream``).
This module owns the connection: its settings and limits, writing frames for the streams
(flow control included), resets and GOAWAY.

Bounds, all per connection: at most ``h2_max_concurrent_streams`` streams (SETTINGS,
enforced by h2), a request head of at most ``header_bytes`` after HPACK decoding
(SETTINGS_MAX_HEADER_LIST_SIZE and the decoder's limit: the HPACK bomb), a header block
of at most 64 CONTINUATION frames (h2's own limit: the CONTINUATION flood), at most
``h2_max_resets`` streams reset within 10 s — by the client (Rapid Reset,
CVE-2023-44487) or by meshd for the client's fault, a malformed head, trailer section
or body length (MadeYouReset, CVE-2025-8671) — beyond that GOAWAY ENHANCE_YOUR_CALM.
Request bodies are held to the flow-control window meshd advertises: a window is given
back only as the upstream takes the bytes, and to the declared content-length (a DATA
total that disagrees at END_STREAM resets the stream, RFC 9113 §8.1.1). Output is
queued per connection and written once per loop iteration (see ``_queue``); streams
wait while more than OUT_LIMIT bytes are queued, and so does the reader: nothing more is
read from a client that does not read what it is sent (PING and SETTINGS each owe an
ACK). Past MAX_CONTROL_QUEUED PINGs and SETTINGS answered since the output was last
written out in full: GOAWAY ENHANCE_YOUR_CALM. A protocol error closes the connection
with GOAWAY and the error code RFC 9113 names (h2's, corrected where it is too coarse).
A client that accepts no byte for ``[limits] write_timeout`` is dropped. Log lines a
client can cause at will go through a ``meshd.ratelog.Throttle`` (keyed by listener and
kind).

Draining: a GOAWAY with the last stream id seen is written (without closing h2's state,
so streams in flight finish), later streams are refused, and the connection closes
once none is left.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event
import gevent.queue
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.exceptions
import hyperframe.exceptions
from hyperframe.frame import GoAwayFrame

from meshd.errors import UpstreamTimeout
from meshd.proto.h2_connection import H2Connection
from meshd.proto.h2_headers import (
    http1_fields_problem,
    request_length,
    request_problem,
    trailers_problem,
)
from meshd.ratelog import Throttle
from meshd.worker import tasks
from meshd.worker.client.h2_stream import H2ToHttp1, Stream, StreamGone
from meshd.worker.client.tcp import redirected_destination
from meshd.worker.peer import PLAINTEXT, Peer
from meshd.worker.sockio import (
    is_tls,
    peer_address,
    raw_socket,
    recv,
    recv_after_wait,
    sendall,
    shutdown,
    wait_writable,
)

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.context import Context

log = logging.getLogger("meshd.worker")
throttled = Throttle(log)  # for lines a client can cause at will (one per worker)

READ_SIZE = 65536
STREAM_WINDOW = 1 << 18       # what a client may send ahead on one stream
CONNECTION_WINDOW = 1 << 22   # ... and on the whole connection
RESET_WINDOW = 10.0
TICK = 1.0                    # how often the reader looks at drain and idle state
OUT_LIMIT = 1 << 18           # output queued per connection before streams wait
TLS_PIECE = 1 << 16           # bytes per TLS write (its records are written whole)
FINAL_WRITE_TIMEOUT = 2.0     # for the last frames (GOAWAY) when a connection ends
# PINGs and SETTINGS received (each owes an ACK) since the output was last written out in
# full: a client flooding them without reading gets GOAWAY ENHANCE_YOUR_CALM past this.
# 10,000 as Go's HTTP/2 server (maxQueuedControlFrames); about 170 KB of ACKs.
MAX_CONTROL_QUEUED = 10000

# Connection-specific fields (RFC 9113 §8.2.2) and the ones meshd frames itself.


class H2ServerConnection:
    def __init__(self, worker: Context, listener: ListenerConfig, sock: socket.socket,
                 peer: Peer = PLAINTEXT) -> None:
        self.worker = worker
        self.listener = listener
        self.sock = sock
        self.peer = peer          # who the client is (mTLS), for authorization and labels
        limits = worker.config.limits
        self.limits = limits
        self.conn = H2Connection(client_side=False, max_header_list_size=limits.header_bytes)
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.h2_max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.header_bytes,
        })
        self.streams: dict[int, Stream] = {}
        self.blocked: set[Stream] = set()  # streams waiting for the client to open a window
        self.resets: list[float] = []
        self.control_queued = 0   # PING / SETTINGS ACKs owed since ``out`` was last empty
        self.goaway_sent_at = 0   # last stream id of our graceful GOAWAY, 0: none yet
        self.closed = False
        self.idle_since = 0.0     # the worker's drain closes idle connections; h2 drains itself
        self._peer: bytes | None = None
        self._redirected: list[tuple[str, int] | None] = []  # empty: not asked yet
        self.out = bytearray()        # frames not yet written (see _queue)
        self.sock_gone = False
        self._raw = raw_socket(sock)
        self._tls = is_tls(sock)  # its bytes go through the TLS socket, never _raw
        self._loop = gevent.get_hub().loop
        self._send_scheduled = False
        self._writer: gevent.Greenlet | None = None
        self._room = gevent.event.Event()
        self._room.set()

    # -- the connection -----------------------------------------------------------------

    def serve(self, initial: bytes = b"") -> None:
        conn = self.conn
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        data = initial
        idle_deadline = time.monotonic() + self.limits.client_idle_timeout
        self.sock.settimeout(TICK)  # for the reads below (the writer just waits again)
        try:
            while True:
                if data:
                    if not self._receive(data):
                        return
                    idle_deadline = time.monotonic() + self.limits.client_idle_timeout
                if self.worker.draining and not self.goaway_sent_at:
                    self._graceful_goaway()
                if self.goaway_sent_at and not self.streams:
                    return
                if not self.streams and time.monotonic() > idle_deadline:
                    self._close(h2.errors.ErrorCodes.NO_ERROR)
                    return
                if len(self.out) > OUT_LIMIT and not self._room.wait(TICK):
                    # The client is not reading what it is sent: read nothing more from
                    # it until it does (_room is set once the queue is under OUT_LIMIT).
                    data = b""
                    continue
                try:
                    # After a short read the socket is drained: wait, then read.
                    data = (recv_after_wait if 0 < len(data) < READ_SIZE else recv)(
                        self.sock, READ_SIZE)
                except TimeoutError:  # quiet for TICK: look at drain and idle state again
                    data = b""
                    continue
                except OSError:
                    return
                if not data:
                    return
        finally:
            self.closed = True
            for stream in list(self.streams.values()):
                self._cancel(stream)
            self._finish_output()
            self.conn.release()  # no stream touches it once ``closed`` is set

    def _receive(self, data: bytes) -> bool:
        """Feed bytes to h2 and act on its events. False when the connection must end."""
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            code = _error_code(e)
            name = self.listener.name
            throttled.info(f"{name}: h2-protocol-error",
                           "%s: HTTP/2 protocol error from the client: %s", name, e)
            self._fail(code, int(getattr(e, "error_code", code)))
            return False
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                if not self._request(event):
                    return False
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None:  # a stream we refused or finished: give the window back
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
                    continue
                stream.received += len(event.data)
                if stream.length is not None and stream.received > stream.length:
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        event.stream_id)
                    if not self._reset_malformed(
                            stream, f"DATA beyond its content-length {stream.length}"):
                        return False
                    continue
                stream.body.put(event.data)
                if event.flow_controlled_length > len(event.data):  # padding
                    self.acknowledge(stream, event.flow_controlled_length - len(event.data))
            elif isinstance(event, h2.events.TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    problem = trailers_problem(event.headers) or \
                        http1_fields_problem(event.headers)
                    if problem:
                        if not self._reset_malformed(stream, problem):
                            return False
                        continue
                    stream.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    if stream.length is not None and stream.received != stream.length:
                        if not self._reset_malformed(stream, f"{stream.received} bytes of "
                                                     f"DATA for content-length {stream.length}"):
                            return False
                        continue
                    stream.ended = True
                    if not stream.bodiless:
                        stream.body.put(None)
            elif isinstance(event, h2.events.StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.reset = True
                    self._cancel(stream)
                if event.remote_reset and not self._count_reset():
                    return False
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                for stream in self.blocked:
                    stream.window.set()  # type: ignore[union-attr]
                self.blocked.clear()
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    self.control_queued += 1
            elif isinstance(event, h2.events.PingReceived):
                self.control_queued += 1
            elif isinstance(event, h2.events.ConnectionTerminated):
                return False
        if self.control_queued > MAX_CONTROL_QUEUED and self.out:
            name = self.listener.name
            throttled.warning(f"{name}: h2-control-flood",
                              "%s: client sent %d PING/SETTINGS without reading the ACKs; "
                              "closing", name, self.control_queued)
            self._close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return False
        self._flush()
        return True

    def _count_reset(self) -> bool:
        """Rapid Reset and MadeYouReset: too many streams reset, by the client or by meshd
        for the client's fault -> GOAWAY, and False."""
        now = time.monotonic()
        self.resets.append(now)
        while self.resets and now - self.resets[0] > RESET_WINDOW:
            self.resets.pop(0)
        if len(self.resets) > self.limits.h2_max_resets:
            name = self.listener.name
            throttled.warning(f"{name}: h2-rapid-reset",
                              "%s: %d streams reset within %gs; closing (rapid reset)",
                              name, len(self.resets), RESET_WINDOW)
            self._close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return False
        return True

    def _reset_malformed(self, stream: Stream, problem: str) -> bool:
        """A started stream turned out malformed (trailers, body length): reset it, stop
        its task (the upstream connection it used is closed, never reused), give back
        the window of DATA nobody will read, and count the reset. False when that was
        one reset too many (the connection is closing)."""
        self._malformed(stream.id, problem)
        self.streams.pop(stream.id, None)
        stream.reset = True
        unread = 0
        while not stream.bodiless and not stream.body.empty():
            data = stream.body.get_nowait()
            unread += len(data) if data else 0
        if unread:
            try:
                self.conn.acknowledge_received_data(unread, stream.id)
            except h2.exceptions.ProtocolError:
                pass
        self._cancel(stream)
        return self._count_reset()

    def _request(self, event: h2.events.RequestReceived) -> bool:
        """Start a stream for a request, or reset it when malformed: HTTP/2's rules, those
        of HTTP/1.1 it may be translated to, a content-length with END_STREAM on HEADERS.
        False when the reset was one too many (the connection is closing)."""
        sid = event.stream_id
        if self.goaway_sent_at and sid > self.goaway_sent_at:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return True
        headers = event.headers
        bodiless = event.stream_ended is not None
        problem = request_problem(headers, http1_rules=True)
        length = None
        if not problem:
            try:
                length = request_length(headers)
            except ValueError as e:
                problem = str(e)
            else:
                if length and bodiless:
                    problem = f"content-length {length} and END_STREAM on HEADERS"
        if problem:
            self._malformed(sid, problem)
            return self._count_reset()
        stream = Stream(sid, list(headers), bodiless, length)
        self.streams[sid] = stream
        stream.task = tasks.pool.spawn(self._serve_stream, stream)
        return True

    def _malformed(self, sid: int, problem: str) -> None:
        """A malformed request or trailer section: a stream error (RFC 9113 §8.1.1)."""
        name = self.listener.name
        throttled.info(f"{name}: h2-malformed", "%s: malformed HTTP/2 request on stream %d: %s",
                       name, sid, problem)
        try:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass

    def _graceful_goaway(self) -> None:
        """GOAWAY(NO_ERROR) naming the last stream taken, written by hand so that h2 keeps
        the streams in flight open (its close_connection would close them all)."""
        last = max(self.conn.highest_inbound_stream_id, 1)
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = 0
        self._flush()
        self._queue(frame.serialize())
        self.goaway_sent_at = last

    def _fail(self, code: int, queued_code: int) -> None:
        """After a protocol error h2 has queued GOAWAY with its own code, which
        ``_error_code`` may correct: send what h2 queued with the code put right (or our
        own GOAWAY when h2 queued none), then the connection ends."""
        pending = self.conn.data_to_send()
        if len(pending) >= 17 and pending[-14] == 0x7:
            if code != queued_code:
                frame = GoAwayFrame(0)
                frame.parse_body(memoryview(pending[-8:]))
                frame.error_code = code
                pending = pending[:-17] + frame.serialize()
        else:  # h2 queued none: write our own
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.conn.highest_inbound_stream_id
            frame.error_code = code
            pending += frame.serialize()
        self._queue(pending)
        self.closed = True

    def _close(self, code: int) -> None:
        try:
            self.conn.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self._flush()
        self.closed = True

    # -- output ---------------------------------------------------------------------------
    # Frames go to ``out``; one send per loop iteration takes what every stream queued in
    # it (a hub callback), so ten responses finishing together cost one system call, not
    # ten. When the kernel buffer is full a writer greenlet waits for the socket; streams
    # wait while more than OUT_LIMIT bytes are queued. No h2 call can yield, so h2's state
    # needs no lock.

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self._queue(data)

    def _queue(self, data: bytes) -> None:
        if self.sock_gone:
            return
        self.out += data
        if len(self.out) > OUT_LIMIT:
            # Streams and the reader wait until the send below (or the writer) takes the
            # queue under OUT_LIMIT: a stream relaying a fast upstream would otherwise
            # queue its whole response before the hub runs the send.
            self._room.clear()
        if not self._send_scheduled and self._writer is None:
            if self._tls:  # a TLS write may wait (records are written whole): a greenlet
                self._writer = gevent.spawn(self._write_tls)
                return
            self._send_scheduled = True
            self._loop.run_callback(self._send_out)

    def _send_out(self) -> None:
        """In the hub: write what is queued, without blocking."""
        self._send_scheduled = False
        if self._writer is not None or self.sock_gone:
            return
        if not self.out:
            self._room.set()
            return
        try:
            sent = self._raw.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost()
            return
        del self.out[:sent]
        if len(self.out) <= OUT_LIMIT:
            self._room.set()
        if self.out:
            self._writer = gevent.spawn(self._write_rest)
        else:
            self.control_queued = 0  # every ACK owed went out

    def _write_rest(self) -> None:
        """The kernel buffer was full: wait for the socket, write the rest. A client that
        accepts no byte for ``write_timeout`` is dropped (its streams end, and with them
        their upstream connections)."""
        progress = time.monotonic()
        try:
            while self.out:
                left = progress + self.limits.write_timeout - time.monotonic()
                if left <= 0:
                    self._too_slow()
                    return
                try:  # an explicit wait: the reader's socket timeout (TICK) is not ours
                    wait_writable(self.sock, left)
                except TimeoutError:
                    continue
                try:
                    sent = self._raw.send(self.out)
                except BlockingIOError:
                    continue
                progress = time.monotonic()
                del self.out[:sent]
                if len(self.out) <= OUT_LIMIT:
                    self._room.set()
            self.control_queued = 0  # every ACK owed went out
        except OSError:
            self._lost()
        finally:
            self._writer = None
            self._room.set()

    def _write_tls(self) -> None:
        """``_send_out`` and ``_write_rest`` over TLS (a connection ``client.inbound_tls``
        terminated): through the TLS socket, a piece at a time. Its timeout is the
        reader's TICK: a write that waited that long is tried again (OpenSSL wants the
        same bytes again), until no byte went for ``write_timeout``."""
        progress = time.monotonic()
        piece = b""
        try:
            while self.out:
                piece = piece or bytes(self.out[:TLS_PIECE])  # after a timeout: the same
                try:
                    sent = self.sock.send(piece)
                except TimeoutError:
                    if time.monotonic() - progress > self.limits.write_timeout:
                        self._too_slow()
                        return
                    continue
                progress = time.monotonic()
                piece = b""
                del self.out[:sent]
                if len(self.out) <= OUT_LIMIT:
                    self._room.set()
            self.control_queued = 0  # every ACK owed went out
        except OSError:
            self._lost()
        finally:
            self._writer = None
            self._room.set()

    def _too_slow(self) -> None:
        throttled.info(f"{self.listener.name}: write timeout",
                           "%s: dropped an HTTP/2 client that accepted no bytes for %gs",
                           self.listener.name, self.limits.write_timeout)
        self._lost()
        shutdown(self.sock, socket.SHUT_RDWR)  # the reader wakes up to the end

    def _lost(self) -> None:
        """The socket failed under a write: nothing more can reach the client."""
        self.sock_gone = self.closed = True
        self.out.clear()
        self._room.set()

    def _wait_room(self, timeout: float) -> None:
        """Hold a stream while the connection's output is over OUT_LIMIT."""
        if len(self.out) > OUT_LIMIT and not self._room.wait(timeout):
            raise UpstreamTimeout("the client is not reading its responses")

    def _finish_output(self) -> None:
        """The connection ends: write what is queued (GOAWAY included), within
        FINAL_WRITE_TIMEOUT, before the socket is closed."""
        writer = self._writer
        if writer is not None:
            writer.join(FINAL_WRITE_TIMEOUT)
        if self.out and self._writer is None and not self.sock_gone:
            data, self.out = bytes(self.out), bytearray()
            self.sock.settimeout(None)
            try:
                with gevent.Timeout(FINAL_WRITE_TIMEOUT):
                    sendall(self.sock, data)
            except (OSError, gevent.Timeout):
                pass
        self.sock_gone = True

    def _cancel(self, stream: Stream) -> None:
        if stream.task is not None:
            stream.task.cancel(StreamGone())
        if stream.window is not None:
            stream.window.set()

    def acknowledge(self, stream: Stream, n: int) -> None:
        """``n`` bytes of the stream's DATA were consumed (taken by the upstream, or
        padding): the client gets that much flow-control window back."""
        if n <= 0 or self.closed:
            return
        try:
            self.conn.acknowledge_received_data(n, stream.id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._flush()

    # -- sending on a stream ------------------------------------------------------------

    def send_headers(self, stream: Stream, headers: list[tuple[bytes, bytes]],
                     end: bool = False, flush: bool = True) -> None:
        """HEADERS; with ``flush=False`` the frame waits for the next write (one send
        for a response's head and first DATA)."""
        self._check(stream)
        self.conn.send_headers(stream.id, headers, end_stream=end)
        if flush:
            self._flush()

    def send_data(self, stream: Stream, data: bytes, idle_timeout: float,
                  end: bool = False) -> None:
        """DATA as the flow-control windows allow (waiting up to ``idle_timeout`` for the
        client to open them); ``end`` sets END_STREAM on the last frame."""
        if not data and not end:
            return
        conn = self.conn
        self._wait_room(idle_timeout)
        self._check(stream)
        if len(data) <= conn.send_room(stream.id):  # the usual case: one frame
            conn.send_data(stream.id, data, end_stream=end)
            stream.sent += len(data)
            self._flush()
            return
        view = memoryview(data)
        while view or end:
            self._wait_room(idle_timeout)
            self._check(stream)
            window = conn.send_room(stream.id)
            if window > 0 or not view:
                n = min(window, len(view))
                last = end and n == len(view)
                conn.send_data(stream.id, view[:n].tobytes(), end_stream=last)
                stream.sent += n
                self._flush()
                view = view[n:]
                if last:
                    return
                continue
            self._flush()
            if stream.window is None:
                stream.window = gevent.event.Event()
            stream.window.clear()
            self.blocked.add(stream)
            try:
                if not stream.window.wait(min(idle_timeout, self.limits.write_timeout)):
                    raise UpstreamTimeout("the client opened no flow-control window")
            finally:
                self.blocked.discard(stream)

    def end_stream(self, stream: Stream, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        self._check(stream)
        if trailers:
            self.conn.send_headers(stream.id, trailers, end_stream=True)
        else:
            self.conn.end_stream(stream.id)
        self._flush()

    def reset_stream(self, stream: Stream, code: int) -> None:
        if self.closed or stream.reset:
            return
        try:
            self.conn.reset_stream(stream.id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._flush()

    def _check(self, stream: Stream) -> None:
        if stream.reset or self.closed:
            raise StreamGone()

    # -- one stream ---------------------------------------------------------------------

    def _serve_stream(self, stream: Stream) -> None:
        try:
            H2ToHttp1(self, stream).run()
        except StreamGone:
            pass
        except Exception:
            log.exception("%s: HTTP/2 stream %d failed", self.listener.name, stream.id)
            self.reset_stream(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self.streams.pop(stream.id, None)
            # DATA nobody read still holds connection window: give it back.
            unread = 0
            while not stream.bodiless and not stream.body.empty():
                data = stream.body.get_nowait()
                unread += len(data) if data else 0
            if unread and not self.closed:
                try:
                    self.conn.acknowledge_received_data(unread, stream.id)
                except h2.exceptions.ProtocolError:
                    pass
                self._flush()

    def client_address(self) -> bytes:
        """The client's address as header bytes (asked once; ``peer`` is its identity)."""
        if self._peer is None:
            self._peer = peer_address(self.sock)
        return self._peer

    def redirected(self) -> tuple[str, int] | None:
        """The connection's original destination when iptables redirected it (asked once)."""
        if not self._redirected:
            self._redirected.append(redirected_destination(self.sock))
        return self._redirected[0]


def _error_code(e: h2.exceptions.ProtocolError) -> int:
    """The GOAWAY code for an error h2 raised. h2 reports an undecodable header block
    and a SETTINGS ACK with a payload as plain protocol errors; RFC 9113 names them
    COMPRESSION_ERROR (§4.3) and FRAME_SIZE_ERROR (§6.5)."""
    cause = e.__cause__
    if isinstance(cause, hpack.exceptions.HPACKDecodingError) and not isinstance(
            cause, hpack.exceptions.OversizedHeaderListError):
        return h2.errors.ErrorCodes.COMPRESSION_ERROR
    if isinstance(cause, hyperframe.exceptions.InvalidDataError) and "ack" in str(cause).lower() \
            and "payload" in str(cause).lower():
        return h2.errors.ErrorCodes.FRAME_SIZE_ERROR
    return int(getattr(e, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR))


def serve_h2(worker: Context, listener: ListenerConfig, sock: socket.socket, initial: bytes,
             peer: Peer = PLAINTEXT) -> None:
    """Serve a connection that opened with the HTTP/2 preface (``initial`` holds what was
    read already, the preface included)."""
    H2ServerConnection(worker, listener, sock, peer=peer).serve(initial)
