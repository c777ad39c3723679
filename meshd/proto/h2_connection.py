"""h2's connection as meshd's HTTP/2 server and client both use it.

- meshd's HPACK codec (``meshd.proto.hpack_codec``) in place of the hpack package's.
- h2's own header checks off both ways: inbound heads are checked by
  ``meshd.proto.h2_headers`` in one pass (and a bad head is a stream error, not h2's
  connection error); outbound heads are built from heads those checks or meshd's strict
  HTTP/1.1 parser passed, with names lower-cased and connection-specific fields dropped.
- On the server side, h2's own content-length check off: it raises a connection error
  for DATA beyond the length, misses END_STREAM on HEADERS and forgets the length when
  trailers arrive. ``meshd.worker.client.h2_server`` keeps the count itself and resets the one
  stream (RFC 9113 §8.1.1).
- ``_receive_frame`` without the ``repr(frame)`` h2 builds for a trace log on every frame
  received, whether or not anything logs it (about 5 µs a frame). The rest of the method
  is h2's (4.x; setup.cfg keeps h2 below 5).
- Frames meshd sends on an open stream (``send_headers``, ``send_data``, ``end_stream``)
  are written straight to h2's output buffer: h2's own state machines still take every
  step (the connection's and the stream's ``process_input``, which refuse a frame the
  stream's state does not allow) and the flow-control windows are charged as h2 does,
  but no frame objects, no ``utf8_encode_headers``, no header validation flags (the
  checks are off) and no ``serialize``: about half of h2's cost of a response. A stream
  h2 does not hold, a client's request head (the stream is opened), PRIORITY fields or
  padding take h2's own path. Headers are bytes (as meshd builds them).
- Receiving a head does only what this configuration needs (``_receive_headers_frame``,
  ``_begin_new_stream``, ``_Stream.receive_headers`` and ``_open_streams`` are h2's,
  same checks in the same order, less the work that is idle here): no header validation
  flags, no processing pipeline (normalization, validation and decoding are off: the
  decoded list is the event's), no per-frame enum or descriptor lookups, the count of
  open streams read from the states directly.
- How each closed stream ended is remembered for the last ``MAX_CLOSED_STREAMS`` of
  them, not h2's 65,536: on a long-lived connection (meshd to meshd, a gRPC channel)
  that record grew by about 100 bytes a stream, some 6 MB per connection, and each
  burst of streams added to every worker's memory. A frame for a stream closed longer
  ago than the record reaches (only a peer far behind sends one) is a stream error
  (RST_STREAM STREAM_CLOSED, ignored) rather than a connection error.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.connection
from h2.connection import AllowedStreamIDs, ConnectionInputs, _decode_headers
from h2.errors import ErrorCodes
from h2.events import TrailersReceived
from h2.exceptions import (
    ProtocolError,
    StreamClosedError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.stream import STREAM_OPEN, H2Stream, StreamInputs, StreamState
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

from meshd.proto import hpack_codec

MAX_CLOSED_STREAMS = 1024  # closed streams whose end is remembered, per connection

# A frame's 9-byte header (RFC 9113 §4.1): length (24 bits), type, flags, stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4

_SEND_HEADERS = StreamInputs.SEND_HEADERS
_SEND_INFORMATIONAL = StreamInputs.SEND_INFORMATIONAL_HEADERS
_SEND_DATA = StreamInputs.SEND_DATA
_SEND_END_STREAM = StreamInputs.SEND_END_STREAM
_RECV_HEADERS = StreamInputs.RECV_HEADERS
_RECV_INFORMATIONAL = StreamInputs.RECV_INFORMATIONAL_HEADERS
_RECV_END_STREAM = StreamInputs.RECV_END_STREAM
_CONN_SEND_HEADERS = ConnectionInputs.SEND_HEADERS
_CONN_SEND_DATA = ConnectionInputs.SEND_DATA
_CONN_RECV_HEADERS = ConnectionInputs.RECV_HEADERS
_CLOSED = StreamState.CLOSED


def _frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, kind, flags, stream_id)


def _informational(headers: list[Any]) -> bool:
    """A 1xx response head (h2's ``is_informational_response``, for bytes)."""
    for field in headers:
        name = field[0]
        if name == b":status":
            return field[1][:1] == b"1"
        if name[:1] != b":":
            return False
    return False


def configuration(client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_inbound_headers=False,
                                     normalize_inbound_headers=False,
                                     validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


class _Stream(H2Stream):
    """h2's stream, receiving a head as h2 does under ``configuration()`` (no
    normalization, no validation, no decoding: each of those steps is a no-op there)."""

    def receive_headers(self, headers: Any, end_stream: bool,
                        header_encoding: Any) -> tuple[list[Frame], list[Any]]:
        machine = self.state_machine
        if _informational(headers):
            if end_stream:
                raise ProtocolError("Cannot set END_STREAM on informational responses")
            events = machine.process_input(_RECV_INFORMATIONAL)
        else:
            events = machine.process_input(_RECV_HEADERS)
        headers_event: Any = events[0]
        if end_stream:
            ended = machine.process_input(_RECV_END_STREAM)
            headers_event.stream_ended = ended[0]
            events += ended
        self._initialize_content_length(headers)
        if not end_stream and isinstance(headers_event, TrailersReceived):
            raise ProtocolError("Trailers must have END_STREAM set")
        headers_event.headers = headers if isinstance(headers, list) else list(headers)
        return [], events


class _ServerStream(_Stream):
    """A request stream: the server counts request bodies itself (h2_server)."""

    def _initialize_content_length(self, headers: Any) -> None:
        pass


class H2Connection(h2.connection.H2Connection):
    """An h2 connection for one side (``client_side``), decoding header lists of at most
    ``max_header_list_size`` bytes (RFC 9113 §6.5.2's measure)."""

    MAX_CLOSED_STREAMS = MAX_CLOSED_STREAMS  # h2 reads it in __init__

    def __init__(self, client_side: bool, max_header_list_size: int) -> None:
        super().__init__(configuration(client_side))
        hpack_codec.install(self, max_header_list_size)
        self._client_side = client_side
        self._outbound_parity = int(client_side)
        self._inbound_ids = AllowedStreamIDs(not client_side)
        self._stream_class = _Stream if client_side else _ServerStream

    # -- receiving a head: h2's methods, less what this configuration leaves idle -----------

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Any]]:
        sid = frame.stream_id
        if sid not in self.streams:
            max_open_streams = self.local_settings.max_concurrent_streams
            value = self._open_streams(1 - self._outbound_parity)  # open inbound streams
            if value + 1 > max_open_streams:
                raise TooManyStreamsError(
                    f"Max inbound streams is {max_open_streams}, {value} open")
        headers = _decode_headers(self.decoder, frame.data)
        events = self.state_machine.process_input(_CONN_RECV_HEADERS)
        stream = self.streams.get(sid) or self._begin_new_stream(sid, self._inbound_ids)
        flags = frame.flags
        frames, stream_events = stream.receive_headers(headers, "END_STREAM" in flags, None)
        if "PRIORITY" in flags:
            _, p_events = self._receive_priority_frame(frame)
            first: Any = stream_events[0]
            first.priority_updated = p_events[0]
            stream_events.extend(p_events)
        return frames, events + stream_events

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> H2Stream:
        outbound = stream_id % 2 == self._outbound_parity
        highest = self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
        if stream_id <= highest:
            raise StreamIDTooLowError(stream_id, highest)
        if stream_id % 2 != int(allowed_ids):
            raise ProtocolError("Invalid stream ID for peer.")
        stream = self._stream_class(
            stream_id, config=self.config,
            inbound_window_size=self.local_settings.initial_window_size,
            outbound_window_size=self.remote_settings.initial_window_size)
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[stream_id] = stream
        if outbound:
            self.highest_outbound_stream_id = stream_id
        else:
            self.highest_inbound_stream_id = stream_id
        return stream

    def _open_streams(self, remainder: int) -> int:
        """h2's count of open streams of one parity (dropping the closed ones), with the
        states read directly rather than through two properties per stream."""
        count = 0
        closed = []
        for sid, stream in self.streams.items():
            state = stream.state_machine.state
            if STREAM_OPEN[state] and sid % 2 == remainder:
                count += 1
            elif state is _CLOSED:
                closed.append(sid)
        for sid in closed:
            self._closed_streams[sid] = self.streams.pop(sid).state_machine.stream_closed_by
        return count

    def _receive_frame(self, frame: Frame) -> list[Any]:
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # Closed by RST_STREAM: a stream error (answered with RST_STREAM); otherwise
            # a connection error.
            if self._stream_is_closed_by_reset(e.stream_id) or self._forgotten(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            # A stream already gone: a stream error if it was reset, a connection error if
            # it ended or was closed implicitly (RFC 9113 §5.1).
            if self._stream_is_closed_by_reset(e.stream_id) or self._forgotten(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    # -- frames sent on an open stream, without h2's frame objects --------------------------

    def send_headers(self, stream_id: int, headers: Iterable[Any], end_stream: bool = False,
                     priority_weight: int | None = None, priority_depends_on: int | None = None,
                     priority_exclusive: bool | None = None) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or priority_weight is not None or priority_depends_on is not None \
                or priority_exclusive is not None:
            # A new stream (a client's request: h2 opens it and notes its method and
            # authority for the response) or PRIORITY fields: h2's own path.
            super().send_headers(stream_id, headers, end_stream, priority_weight,
                                 priority_depends_on, priority_exclusive)
            return
        if not isinstance(headers, list):
            headers = list(headers)
        self.state_machine.process_input(_CONN_SEND_HEADERS)
        machine = stream.state_machine
        kind = _SEND_HEADERS
        if not machine.client and _informational(headers):
            if end_stream:
                raise ProtocolError("Cannot set END_STREAM on informational responses.")
            kind = _SEND_INFORMATIONAL
        # As h2: the state moves before the block is encoded (encoding is irreversible).
        machine.process_input(kind)
        block = self.encoder.encode(headers)
        if end_stream:
            machine.process_input(_SEND_END_STREAM)
        elif machine.trailers_sent:
            raise ProtocolError("Trailers must have END_STREAM set.")
        flags = _END_STREAM if end_stream else 0
        size = stream.max_outbound_frame_size or len(block)
        out = self._data_to_send
        if len(block) <= size:
            out += _frame_header(len(block), _HEADERS, flags | _END_HEADERS, stream_id)
            out += block
            return
        # HEADERS and CONTINUATION frames (END_STREAM on the first, END_HEADERS on the last)
        out += _frame_header(size, _HEADERS, flags, stream_id)
        out += block[:size]
        for at in range(size, len(block), size):
            piece = block[at:at + size]
            last = at + size >= len(block)
            out += _frame_header(len(piece), _CONTINUATION, _END_HEADERS if last else 0,
                                 stream_id)
            out += piece

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False,
                  pad_length: Any = None) -> None:
        stream = self.streams.get(stream_id)
        size = len(data)
        if stream is None or pad_length is not None or (size > 0 and size > min(
                self.outbound_flow_control_window, stream.outbound_flow_control_window,
                stream.max_outbound_frame_size or size)):
            # No such stream, padding, or more than may go: h2 raises (or pads) as it does.
            super().send_data(stream_id, data, end_stream, pad_length)
            return
        self.state_machine.process_input(_CONN_SEND_DATA)
        machine = stream.state_machine
        machine.process_input(_SEND_DATA)
        if end_stream:
            machine.process_input(_SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        out = self._data_to_send
        out += _frame_header(size, _DATA, _END_STREAM if end_stream else 0, stream_id)
        out += data

    def end_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            super().end_stream(stream_id)  # raises as h2 does
            return
        self.state_machine.process_input(_CONN_SEND_DATA)
        stream.state_machine.process_input(_SEND_END_STREAM)
        self._data_to_send += _frame_header(0, _DATA, _END_STREAM, stream_id)

    def send_room(self, stream_id: int) -> int:
        """How many bytes one DATA frame may carry on the stream now: the smaller
        flow-control window (the stream's, the connection's) and the peer's frame size.
        StreamClosedError for a stream h2 no longer holds."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return min(self.local_flow_control_window(stream_id), self.max_outbound_frame_size)
        return min(self.outbound_flow_control_window, stream.outbound_flow_control_window,
                   self.max_outbound_frame_size)

    def release(self) -> None:
        """The connection has ended: drop what it holds. h2's connection is a web of
        reference cycles (its frame dispatch table holds its own bound methods), so its
        streams, the record of closed streams and the HPACK tables (about 110 KB after
        750 streams) would otherwise wait for a full garbage collection, which a quiet
        worker may not run for minutes. Cleared, it is freed with its last reference.
        Nothing may be asked of the connection afterwards."""
        self._frame_dispatch_table.clear()
        self.streams.clear()
        self._closed_streams.clear()

    def _forgotten(self, stream_id: int) -> bool:
        """A stream closed longer ago than the record of closed streams reaches: the
        record is full (the oldest were dropped) and does not hold it, and the stream
        is not open."""
        closed = self._closed_streams
        return (len(closed) >= self.MAX_CLOSED_STREAMS and stream_id not in closed
                and stream_id not in self.streams)

