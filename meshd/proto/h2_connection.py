"""h2's connection as meshd's HTTP/2 server and client both use it.

- meshd's HPACK codec (``meshd.proto.hpack_codec``) in place of the hpack package's.
- h2's own header checks off both ways: inbound heads are checked by
  ``meshd.proto.h2_headers`` in one pass (and a bad head is a stream error, not h2's
  connection error); outbound heads are built from heads those checks or meshd's strict
  HTTP/1.1 parser passed, with names lower-cased and connection-specific fields dropped.
- ``_receive_frame`` without the ``repr(frame)`` h2 builds for a trace log on every frame
  received, whether or not anything logs it (about 5 µs a frame). The rest of the method
  is h2's (4.x; setup.cfg keeps h2 below 5).
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import Frame, RstStreamFrame

from meshd.proto import hpack_codec


def configuration(client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                     validate_inbound_headers=False,
                                     normalize_inbound_headers=False,
                                     validate_outbound_headers=False,
                                     normalize_outbound_headers=False)


class H2Connection(h2.connection.H2Connection):
    """An h2 connection for one side (``client_side``), decoding header lists of at most
    ``max_header_list_size`` bytes (RFC 9113 §6.5.2's measure)."""

    def __init__(self, client_side: bool, max_header_list_size: int) -> None:
        super().__init__(configuration(client_side))
        hpack_codec.install(self, max_header_list_size)

    def _receive_frame(self, frame: Frame) -> list[Any]:
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # Closed by RST_STREAM: a stream error (answered with RST_STREAM); otherwise
            # a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            # A stream already gone: a stream error if it was reset, a connection error if
            # it ended or was closed implicitly (RFC 9113 §5.1).
            if self._stream_is_closed_by_reset(e.stream_id):
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
