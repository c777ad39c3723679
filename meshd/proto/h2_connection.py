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
- How each closed stream ended is remembered for the last ``MAX_CLOSED_STREAMS`` of
  them, not h2's 65,536: on a long-lived connection (meshd to meshd, a gRPC channel)
  that record grew by about 100 bytes a stream, some 6 MB per connection, and each
  burst of streams added to every worker's memory. A frame for a stream closed longer
  ago than the record reaches (only a peer far behind sends one) is a stream error
  (RST_STREAM STREAM_CLOSED, ignored) rather than a connection error.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from h2.stream import H2Stream
from hyperframe.frame import Frame, RstStreamFrame

from meshd.proto import hpack_codec

MAX_CLOSED_STREAMS = 1024  # closed streams whose end is remembered, per connection


def configuration(client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_inbound_headers=False,
                                     normalize_inbound_headers=False,
                                     validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


class H2Connection(h2.connection.H2Connection):
    """An h2 connection for one side (``client_side``), decoding header lists of at most
    ``max_header_list_size`` bytes (RFC 9113 §6.5.2's measure)."""

    MAX_CLOSED_STREAMS = MAX_CLOSED_STREAMS  # h2 reads it in __init__

    def __init__(self, client_side: bool, max_header_list_size: int) -> None:
        super().__init__(configuration(client_side))
        hpack_codec.install(self, max_header_list_size)
        self._client_side = client_side

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        if not self._client_side:  # the server counts request bodies itself
            stream._initialize_content_length = _no_length  # type: ignore[method-assign]
        return stream

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


def _no_length(headers: Any) -> None:
    """In place of h2's ``H2Stream._initialize_content_length``: no expected length."""
