"""What an HTTP/2 connection keeps of its finished streams (meshd.proto.h2_connection):
h2 remembered how each of the last 65,536 closed streams ended, about 100 bytes each on
a long-lived connection (meshd to meshd, a gRPC channel), so every burst of streams
added to a worker's memory until some 6 MB a connection. meshd keeps the last
MAX_CLOSED_STREAMS; a frame for a stream closed before those is a stream error."""

from __future__ import annotations

import h2.events
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

from meshd.proto.h2_connection import MAX_CLOSED_STREAMS, H2Connection

STREAMS = MAX_CLOSED_STREAMS + 500


def _pair() -> tuple[H2Connection, H2Connection]:
    client = H2Connection(client_side=True, max_header_list_size=65536)
    server = H2Connection(client_side=False, max_header_list_size=65536)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def _exchange(client: H2Connection, server: H2Connection, n: int) -> None:
    """``n`` GETs answered 200, one after another, on one connection."""
    head = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
            (b":authority", b"web")]
    for _ in range(n):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, head, end_stream=True)
        events = server.receive_data(client.data_to_send())
        assert any(isinstance(e, h2.events.RequestReceived) for e in events)
        server.send_headers(sid, [(b":status", b"200")], end_stream=True)
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())  # ACKs, if any


def test_closed_streams_are_remembered_within_a_bound():
    client, server = _pair()
    _exchange(client, server, STREAMS)
    # both sides: bounded, not one entry per stream ever carried
    assert len(client._closed_streams) <= MAX_CLOSED_STREAMS
    assert len(server._closed_streams) <= MAX_CLOSED_STREAMS
    assert len(client.streams) <= 1 and len(server.streams) <= 1


def _frames(data: bytes) -> list[Frame]:
    out = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        out.append(frame)
        view = view[9 + length:]
    return out


def test_a_frame_for_a_forgotten_stream_is_a_stream_error():
    """HEADERS (say, trailers far behind) on stream 1, closed more than
    MAX_CLOSED_STREAMS streams ago: RST_STREAM STREAM_CLOSED, the connection goes on."""
    client, server = _pair()
    _exchange(client, server, STREAMS)
    late = HeadersFrame(1)
    late.flags.add("END_HEADERS")
    late.flags.add("END_STREAM")
    late.data = b"\x10\x01x\x01y"  # x: y, a literal never indexed (no HPACK state)
    server.receive_data(late.serialize())  # no ProtocolError: not a connection error
    (frame,) = _frames(server.data_to_send())
    assert isinstance(frame, RstStreamFrame)
    assert frame.stream_id == 1 and frame.error_code == 0x5  # STREAM_CLOSED
    _exchange(client, server, 1)  # and the connection still carries streams
