"""meshd.proto.h2_connection's own frame paths against h2's (issue 17).

meshd writes HEADERS, DATA and END_STREAM on open streams without h2's frame objects,
and receives request heads through trimmed copies of h2's methods. Each case here runs
the same steps on meshd's connection and on a plain h2 connection with the same
configuration and HPACK codec, and asserts the same bytes on the wire, the same events
and the same errors (type and whether the connection's state changed alike).
"""

from __future__ import annotations

import struct
from typing import Any

import h2.connection
import h2.exceptions
import h2.settings
import pytest

from meshd.proto import hpack_codec
from meshd.proto.h2_connection import H2Connection, configuration

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
           (b":authority", b"web"), (b"accept", b"*/*")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"server", b"t")]


def _reference(client_side: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(configuration(client_side))
    hpack_codec.install(conn, 65536)
    return conn


def _servers() -> tuple[Any, Any, h2.connection.H2Connection]:
    """(meshd's server, h2's server, a client), past the preface and SETTINGS."""
    client = _reference(True)
    ours, ref = H2Connection(False, 65536), _reference(False)
    client.initiate_connection()
    preface = client.data_to_send()
    for server in (ours, ref):
        server.initiate_connection()
        server.receive_data(preface)
    client.receive_data(ref.data_to_send())
    ours.data_to_send()
    acks = client.data_to_send()
    ours.receive_data(acks)
    ref.receive_data(acks)
    ours.data_to_send()
    ref.data_to_send()
    return ours, ref, client


def _events(events: list[Any]) -> list[Any]:
    out = []
    for e in events:
        item: list[Any] = [type(e).__name__, getattr(e, "stream_id", None)]
        if hasattr(e, "headers"):
            item.append([tuple(h) for h in e.headers or ()])
        if hasattr(e, "stream_ended"):
            item.append(type(e.stream_ended).__name__)
        if hasattr(e, "priority_updated"):
            item.append(type(e.priority_updated).__name__)
        out.append(item)
    return out


def _both(ours: Any, ref: Any, step: Any) -> Any:
    """Run ``step(conn)`` on both: same result or same error class, same bytes out."""
    results = []
    for conn in (ours, ref):
        try:
            result: Any = ("ok", step(conn))
        except h2.exceptions.H2Error as e:
            result = ("error", type(e).__name__)
        results.append((result, conn.data_to_send()))
    assert results[0] == results[1]
    return results[0][0]


def _receive(ours: Any, ref: Any, data: bytes) -> Any:
    return _both(ours, ref, lambda conn: _events(conn.receive_data(data)))


def _request(client: h2.connection.H2Connection, end: bool = True,
             headers: list[tuple[bytes, bytes]] = REQUEST, **kwargs: Any) -> tuple[int, bytes]:
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, headers, end_stream=end, **kwargs)
    return sid, client.data_to_send()


def test_a_response_is_written_as_h2_writes_it() -> None:
    ours, ref, client = _servers()
    sid, wire = _request(client)
    assert _receive(ours, ref, wire)[0] == "ok"
    _both(ours, ref, lambda c: c.send_headers(sid, RESPONSE))
    _both(ours, ref, lambda c: c.send_data(sid, b"hello"))
    _both(ours, ref, lambda c: c.send_data(sid, memoryview(b"world"), end_stream=True))
    assert _both(ours, ref, lambda c: c.send_data(sid, b"late")) == ("error", "StreamClosedError")


def test_head_only_trailers_informational_and_empty_end() -> None:
    ours, ref, client = _servers()
    sids = []
    for _ in range(4):
        sid, wire = _request(client)
        _receive(ours, ref, wire)
        sids.append(sid)
    a, b, c, d = sids
    _both(ours, ref, lambda conn: conn.send_headers(a, RESPONSE, end_stream=True))
    _both(ours, ref, lambda conn: conn.send_headers(b, [(b":status", b"103"), (b"link", b"x")]))
    assert _both(ours, ref, lambda conn: conn.send_headers(
        b, [(b":status", b"100")], end_stream=True)) == ("error", "ProtocolError")
    _both(ours, ref, lambda conn: conn.send_headers(c, RESPONSE))
    _both(ours, ref, lambda conn: conn.send_data(c, b"x"))
    _both(ours, ref, lambda conn: conn.send_headers(c, [(b"grpc-status", b"0")], end_stream=True))
    _both(ours, ref, lambda conn: conn.send_headers(d, RESPONSE))
    _both(ours, ref, lambda conn: conn.end_stream(d))
    assert _both(ours, ref, lambda conn: conn.end_stream(d)) == ("error", "StreamClosedError")


def test_a_large_head_goes_in_continuation_frames() -> None:
    ours, ref, client = _servers()
    sid, wire = _request(client)
    _receive(ours, ref, wire)
    big = RESPONSE + [(b"x-big-%d" % i, b"v" * 1000) for i in range(40)]  # > 16,384 bytes
    _both(ours, ref, lambda conn: conn.send_headers(sid, big, end_stream=True))


def test_flow_control_and_frame_size_are_held_as_h2_holds_them() -> None:
    ours, ref, client = _servers()
    sid, wire = _request(client)
    _receive(ours, ref, wire)
    _both(ours, ref, lambda conn: conn.send_headers(sid, RESPONSE))
    assert ours.send_room(sid) == min(ref.local_flow_control_window(sid),
                                      ref.max_outbound_frame_size) == 16384
    assert _both(ours, ref, lambda conn: conn.send_data(sid, b"x" * 16385)) == \
        ("error", "FrameTooLargeError")
    for _ in range(3):
        _both(ours, ref, lambda conn: conn.send_data(sid, b"x" * 16384))
    assert ours.send_room(sid) == ref.local_flow_control_window(sid) == 65535 - 3 * 16384
    assert _both(ours, ref, lambda conn: conn.send_data(sid, b"x" * 16384)) == \
        ("error", "FlowControlError")
    _both(ours, ref, lambda conn: conn.send_data(sid, b"x" * (65535 - 3 * 16384)))
    assert ours.send_room(sid) == 0
    _both(ours, ref, lambda conn: conn.send_data(sid, b"", end_stream=True))
    assert _both(ours, ref, lambda conn: conn.send_data(sid, b"x", pad_length=3))[0] == "error"


def test_sending_on_a_reset_stream_fails_alike() -> None:
    ours, ref, client = _servers()
    sid, wire = _request(client)
    _receive(ours, ref, wire)
    client.reset_stream(sid)
    _receive(ours, ref, client.data_to_send())
    assert _both(ours, ref, lambda conn: conn.send_headers(sid, RESPONSE))[0] == "error"
    assert _both(ours, ref, lambda conn: conn.send_data(sid, b"x"))[0] == "error"
    assert _both(ours, ref, lambda conn: conn.end_stream(sid))[0] == "error"


def test_request_heads_are_received_as_h2_receives_them() -> None:
    ours, ref, client = _servers()
    # with END_STREAM, without (then DATA and trailers), with PRIORITY fields
    sid, wire = _request(client)
    assert _receive(ours, ref, wire)[1][0][0] == "RequestReceived"
    sid, wire = _request(client, end=False)
    _receive(ours, ref, wire)
    client.send_data(sid, b"body")
    client.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    assert [e[0] for e in _receive(ours, ref, client.data_to_send())[1]] == \
        ["DataReceived", "TrailersReceived", "StreamEnded"]
    sid, wire = _request(client, priority_weight=200, priority_depends_on=0)
    assert "PriorityUpdated" in [e[0] for e in _receive(ours, ref, wire)[1]]


def _headers(sid: int, flags: int, headers: list[tuple[bytes, bytes]] = REQUEST) -> bytes:
    """A raw HEADERS frame (the client's own state machine would refuse to send some)."""
    block = hpack_codec.Encoder().encode(headers)
    return struct.pack(">BHBBL", 0, len(block), 0x1, flags, sid) + block


END_STREAM, END_HEADERS = 0x1, 0x4


@pytest.mark.parametrize("frames", [
    _headers(2, END_STREAM | END_HEADERS),  # an even (server) stream id
    # trailers without END_STREAM on an open stream
    _headers(101, END_HEADERS) + _headers(101, END_HEADERS, [(b"x-t", b"1")]),
    # an informational :status in a request head
    _headers(103, END_HEADERS, [(b":status", b"100")]),
    _headers(105, END_STREAM | END_HEADERS, [(b":status", b"100")]),
], ids=["even-stream-id", "trailers-without-end-stream", "informational", "informational-end"])
def test_bad_heads_fail_alike(frames: bytes) -> None:
    ours, ref, _ = _servers()
    assert _receive(ours, ref, frames)[0] == "error"
    assert ours.state_machine.state == ref.state_machine.state


def test_too_many_streams_are_refused_alike() -> None:
    ours, ref, client = _servers()
    for conn in (ours, ref):
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    client.receive_data(ref.data_to_send())
    ours.data_to_send()
    _receive(ours, ref, client.data_to_send())  # the client's ACK: the limit holds
    assert ours.local_settings.max_concurrent_streams == 2
    _receive(ours, ref, _headers(1, END_HEADERS) + _headers(3, END_HEADERS))
    assert _receive(ours, ref, _headers(5, END_STREAM | END_HEADERS)) == \
        ("error", "TooManyStreamsError")
