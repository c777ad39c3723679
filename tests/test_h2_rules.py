"""RFC 9113 rules that matter to a proxy, one test per rule, after h2spec's case list
(generic + http2 sections; h2spec itself cannot be installed here).

Every case talks raw frames (hyperframe for parsing, hand-built bytes for malformed frames,
hpack for header blocks) to one real meshd (module-scoped) in front of two upstreams: the
test backend ("web") and a recording HTTP/1.1 upstream ("rec") that keeps every byte it
receives, so a request that must never be forwarded can be checked for at the upstream.

What each rule requires:
  connection error -> GOAWAY with the named code, then the TCP connection closes;
  stream error     -> RST_STREAM with the code on that stream, and the connection stays
                      usable (a following request on a new stream is answered).
RFC 9113 §5.4.1 lets an endpoint treat any stream error as a connection error ("An
endpoint MAY choose to treat a stream error as a connection error"), so where a stream
error is required a GOAWAY with the same code is accepted too; such cases say so.
"""

from __future__ import annotations

import fcntl
import json
import select
import socket
import struct
import termios
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import hpack
import pytest
from conftest import MeshFactory
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from meshd.testing.harness import Backend, Meshd, wait_for
from meshd.testing.tcp_server import TcpServer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# error codes (RFC 9113 §7)
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
COMPRESSION_ERROR = 0x9

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
# flags
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# settings
S_ENABLE_PUSH, S_MAX_CONCURRENT, S_INITIAL_WINDOW, S_MAX_FRAME = 0x2, 0x3, 0x4, 0x5

MAX_STREAMS = 8  # the module's meshd advertises this SETTINGS_MAX_CONCURRENT_STREAMS


def raw(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame, byte by byte: nothing validated, so malformed frames can be written."""
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings_payload(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">HI", k, v) for k, v in pairs)


# -- upstreams --------------------------------------------------------------------------

class Recorder:
    """An HTTP/1.1 upstream that records every byte it receives and answers 200 "ok"
    once a request (with its body, Content-Length or chunked) is complete."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lock = threading.Lock()  # held from each recv to its append: see drained
        self.open: set[socket.socket] = set()
        self.srv = TcpServer(self._serve)
        self.address = self.srv.address

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.setblocking(False)
        with self.lock:
            self.open.add(conn)
        with conn:
            try:
                while True:
                    if not select.select([conn], [], [], 10)[0]:
                        return  # idle for 10 s
                    with self.lock:
                        try:
                            data = conn.recv(65536)
                        except BlockingIOError:
                            continue
                        self.received += data
                    if not data:
                        return
                    buf += data
                    while (n := _complete(buf)) is not None:
                        buf = buf[n:]
                        conn.setblocking(True)
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        conn.setblocking(False)
            except OSError:
                return
            finally:
                with self.lock:
                    self.open.discard(conn)

    def drained(self) -> bool:
        """No byte sent to the recorder is left unread (read and recorded are one step
        under the lock, so none is between the two either)."""
        with self.lock:
            return all(_unread(c) == 0 for c in self.open)

    def seen(self, marker: str) -> bool:
        with self.lock:
            return marker.encode() in self.received

    def request_with(self, marker: str) -> bytes:
        with self.lock:
            data = bytes(self.received)
        start = data.find(marker.encode())
        return data[start:start + 4096] if start >= 0 else b""

    def close(self) -> None:
        self.srv.close()


def _unread(sock: socket.socket) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0  # closed meanwhile


def _complete(buf: bytes) -> int | None:
    """The length of the first complete HTTP/1.1 request in buf, None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    body = end + 4
    if b"transfer-encoding: chunked" in head:
        pos = body
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";")[0], 16)
            if size == 0:
                t_end = buf.find(b"\r\n\r\n", line_end)  # after the trailers, if any
                return None if t_end < 0 else t_end + 4
            pos = line_end + 2 + size + 2
            if pos > len(buf):
                return None
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            n = int(line.split(b":", 1)[1])
            return body + n if len(buf) >= body + n else None
    return body


class Env:
    def __init__(self, meshd: Meshd, rec: Recorder) -> None:
        self.meshd = meshd
        self.port = meshd.ports["outbound"]  # type: ignore[attr-defined]
        self.rec = rec


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    backend = Backend("a").start()
    rec = Recorder()
    factory = MeshFactory(tmp_path_factory.mktemp("h2rules"))
    try:
        m = factory.run({"web": [backend.address], "rec": [rec.address]}, workers=1,
                        extra=f"[limits]\nh2_max_concurrent_streams = {MAX_STREAMS}\n")
        yield Env(m, rec)
    finally:
        for m in factory.started:
            m.stop()
        rec.close()
        backend.stop()


# -- a raw client -----------------------------------------------------------------------

class Conn:
    """A raw HTTP/2 client connection: writes whatever it is given, parses what comes back
    (decoding every header block, so the HPACK state stays in step), ACKs the server's
    SETTINGS as a well-behaved client does."""

    def __init__(self, port: int, settings: bytes = b"", handshake: bool = True,
                 preface: bytes = PREFACE) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.buf = b""
        self.frames: list[Frame] = []
        self.headers: dict[int, list[list[tuple[bytes, bytes]]]] = {}
        self.eof = False
        self.next_sid = 1
        self._block = b""
        self.sock.sendall(preface + raw(SETTINGS, 0, 0, settings))
        if handshake:
            assert self.read(lambda: any(isinstance(f, SettingsFrame) and "ACK" in f.flags
                                         for f in self.frames)), self.frames

    def send(self, *chunks: bytes | Frame) -> None:
        data = b"".join(c if isinstance(c, bytes) else c.serialize() for c in chunks)
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # the server may have closed already: the frames read tell the story

    def block(self, fields: list[tuple[bytes, bytes]]) -> bytes:
        """A header block; every field a never-indexed literal (or a static-table match),
        so the dynamic table stays empty and a block the server rejects cannot put the
        two HPACK states out of step."""
        return self.enc.encode([(k, v, True) for k, v in fields])

    def sid(self) -> int:
        sid = self.next_sid
        self.next_sid += 2
        return sid

    def req(self, path: str = "/hello", host: str = "web", method: str = "GET",
            extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
        return [(b":method", method.encode()), (b":scheme", b"http"), (b":path", path.encode()),
                (b":authority", host.encode()), *(extra or [])]

    def headers_frame(self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool = True,
                      end_headers: bool = True) -> bytes:
        flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        return raw(HEADERS, flags, sid, self.block(fields))

    def read(self, until: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Read frames until ``until()`` holds (True), or EOF / the timeout (False)."""
        deadline = time.monotonic() + timeout
        while not until():
            if self.eof:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return until()
            except OSError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.buf += data
            self._parse()
        return True

    def _parse(self) -> None:
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                return
            frame.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            self.frames.append(frame)
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                self.send(raw(SETTINGS, ACK, 0))
            if isinstance(frame, (HeadersFrame, ContinuationFrame)):
                self._block += frame.data
                if "END_HEADERS" in frame.flags:
                    fields = self.dec.decode(self._block, raw=True)
                    self._block = b""
                    self.headers.setdefault(frame.stream_id, []).append(fields)

    # -- what came back --

    def goaway(self) -> GoAwayFrame | None:
        return next((f for f in self.frames if isinstance(f, GoAwayFrame)), None)

    def rst(self, sid: int) -> RstStreamFrame | None:
        return next((f for f in self.frames if isinstance(f, RstStreamFrame) and f.stream_id == sid),
                    None)

    def ended(self, sid: int) -> bool:
        return any(f.stream_id == sid and ("END_STREAM" in f.flags or isinstance(f, RstStreamFrame))
                   for f in self.frames if isinstance(f, (DataFrame, HeadersFrame, RstStreamFrame)))

    def status(self, sid: int) -> bytes | None:
        for fields in self.headers.get(sid, []):
            for k, v in fields:
                if k == b":status":
                    return v
        return None

    def body(self, sid: int) -> bytes:
        return b"".join(f.data for f in self.frames if isinstance(f, DataFrame) and f.stream_id == sid)

    def ping_acks(self) -> list[bytes]:
        return [f.opaque_data for f in self.frames if isinstance(f, PingFrame) and "ACK" in f.flags]

    def close(self) -> None:
        self.sock.close()


def usable(c: Conn) -> None:
    """The connection still serves a request on a new stream."""
    sid = c.sid()
    c.send(c.headers_frame(sid, c.req("/hello")))
    c.read(lambda: c.ended(sid) or c.goaway() is not None)
    assert c.goaway() is None, f"GOAWAY {c.goaway()} instead of an answer on stream {sid}"
    assert c.status(sid) == b"200" and c.body(sid) == b"a /hello\n", (c.status(sid), c.frames)


def ping_ok(c: Conn, payload: bytes = b"rulechk!") -> None:
    """The connection is alive: a PING is answered (h2spec's check after an ignored frame)."""
    c.send(raw(PING, 0, 0, payload))
    assert c.read(lambda: payload in c.ping_acks()), c.frames
    assert c.goaway() is None, c.goaway()


def connection_error(c: Conn, *codes: int) -> None:
    """GOAWAY with one of ``codes``, then the connection closes."""
    c.read(lambda: c.eof, timeout=5)
    g = c.goaway()
    assert g is not None, f"no GOAWAY; frames: {c.frames}"
    assert g.error_code in codes, f"GOAWAY code {g.error_code:#x}, wanted {[hex(x) for x in codes]}"
    assert c.eof, "the connection stayed open after the GOAWAY"


def stream_error(c: Conn, sid: int, *codes: int) -> str:
    """RST_STREAM(sid) with one of ``codes`` and the connection stays usable; or, stricter
    but allowed by RFC 9113 §5.4.1, GOAWAY with one of ``codes`` and the close.
    Returns "stream" or "connection"."""
    c.read(lambda: c.rst(sid) is not None or c.goaway() is not None or c.eof)
    r = c.rst(sid)
    if r is not None:
        assert r.error_code in codes, f"RST_STREAM code {r.error_code:#x}, wanted {[hex(x) for x in codes]}"
        usable(c)
        return "stream"
    connection_error(c, *codes)
    return "connection"


def marker() -> str:
    return "/m-" + uuid.uuid4().hex


def never_forwarded(env: Env, c: Conn, mark: str) -> None:
    """The request marked ``mark`` did not reach the recorder. The barrier first: on a
    connection still open, a request to the recorder sent after it is answered (meshd
    decided on the marked one before: streams are taken in order); then ``c`` is closed,
    meshd is done with every client connection (whatever it forwarded is written) and the
    recorder has read all it was sent."""
    if not c.eof and c.goaway() is None:
        sid = c.sid()
        c.send(c.headers_frame(sid, c.req(marker(), "rec")))
        c.read(lambda: c.ended(sid) or c.goaway() is not None or c.eof)
    c.close()
    env.meshd.wait_idle("outbound")
    wait_for(env.rec.drained, what="the recorder read everything sent to it")
    assert not env.rec.seen(mark), env.rec.request_with(mark)


@pytest.fixture
def conn(env: Env) -> Iterator[Conn]:
    c = Conn(env.port)
    yield c
    c.close()


# == 3.5 HTTP/2 connection preface ========================================================

def test_3_5_server_preface_is_a_settings_frame(env):
    c = Conn(env.port, handshake=False)
    c.read(lambda: bool(c.frames))
    assert isinstance(c.frames[0], SettingsFrame) and "ACK" not in c.frames[0].flags, c.frames
    c.close()


def test_3_5_invalid_connection_preface(env):
    # "PRI * HTTP/2.0\r\n\r\n" then not "SM\r\n\r\n": a connection error (PROTOCOL_ERROR);
    # h2spec also accepts a plain close
    c = Conn(env.port, handshake=False, preface=b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    c.read(lambda: c.eof)
    assert c.eof
    g = c.goaway()
    assert g is None or g.error_code == PROTOCOL_ERROR, g
    assert not any(isinstance(f, HeadersFrame) for f in c.frames)
    c.close()


# == 4.1 frame format, 5.5 extending HTTP/2 ===============================================

@pytest.mark.parametrize("frame", [
    pytest.param(raw(0x16, 0, 0, b"\x00" * 8), id="4.1-unknown-type-stream0"),
    pytest.param(raw(0xff, 0xff, 0, b"whatever"), id="5.5-unknown-extension-type"),
    pytest.param(raw(PING, 0x16 & ~ACK, 0, b"unknflag"), id="4.1-unknown-flags-on-ping"),
    pytest.param(raw(0x16, 0, 0x80000000, b"reserved"), id="4.1-reserved-bit-set"),
])
def test_4_1_and_5_5_unknown_things_are_ignored(conn, frame):
    conn.send(frame)
    ping_ok(conn)
    if frame[3] == PING:  # the PING with unknown flags was itself answered, as a PING
        assert b"unknflag" in conn.ping_acks()
    usable(conn)


def test_5_5_unknown_frame_inside_a_header_block(env, conn):
    mark = marker()
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(mark, "rec"), end_headers=False),
              raw(0x16, 0, sid, b"\x00" * 8))
    connection_error(conn, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


# == 4.2 frame size =======================================================================

def test_4_2_data_at_max_frame_size_is_accepted(conn):
    sid = conn.sid()
    body = b"z" * 16384
    conn.send(conn.headers_frame(sid, conn.req("/echo", method="POST",
                                               extra=[(b"content-length", b"16384")]), end_stream=False),
              raw(DATA, END_STREAM, sid, body))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200" and conn.body(sid) == body


def test_4_2_data_beyond_max_frame_size(conn):
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req("/echo", method="POST"), end_stream=False),
              raw(DATA, END_STREAM, sid, b"z" * 16385))
    # a stream error would do; meshd (h2) closes the connection: allowed (§4.2, §5.4.1)
    stream_error(conn, sid, FRAME_SIZE_ERROR)


def test_4_2_headers_beyond_max_frame_size(env, conn):
    # a frame that can alter connection state (a header block) must be a connection error
    mark = marker()
    sid = conn.sid()
    fields = conn.req(mark, "rec", extra=[(b"x-big", b"b" * 17000)])
    conn.send(raw(HEADERS, END_STREAM | END_HEADERS, sid, hpack.Encoder().encode(
        [(k, v, True) for k, v in fields], huffman=False)))
    connection_error(conn, FRAME_SIZE_ERROR)
    never_forwarded(env, conn, mark)


# == 4.3 header compression ===============================================================

def test_4_3_invalid_header_block_is_a_compression_error(conn):
    sid = conn.sid()
    # an indexed field naming index 0 (never valid), then one past the static table
    conn.send(raw(HEADERS, END_STREAM | END_HEADERS, sid, b"\x80\xff\x7f"))
    connection_error(conn, COMPRESSION_ERROR)


# == 5.1 stream states ====================================================================

def _open_slow(c: Conn, end_stream: bool = True, ms: int = 1500) -> int:
    sid = c.sid()
    c.send(c.headers_frame(sid, c.req(f"/slow?ms={ms}"), end_stream=end_stream))
    return sid


@pytest.mark.parametrize("frame", [
    pytest.param(lambda c: raw(DATA, END_STREAM, 1, b"test"), id="5.1-idle-DATA"),
    pytest.param(lambda c: raw(RST_STREAM, 0, 1, struct.pack(">I", 8)), id="5.1-idle-RST_STREAM"),
    pytest.param(lambda c: raw(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)), id="5.1-idle-WINDOW_UPDATE"),
    pytest.param(lambda c: raw(CONTINUATION, END_HEADERS, 1, c.block(c.req())), id="5.1-idle-CONTINUATION"),
])
def test_5_1_frames_on_an_idle_stream(conn, frame):
    conn.send(frame(conn))
    connection_error(conn, PROTOCOL_ERROR)


def test_5_1_priority_on_an_idle_stream_is_allowed(conn):
    conn.send(raw(PRIORITY, 0, 1, struct.pack(">IB", 0, 15)))
    ping_ok(conn)
    usable(conn)


@pytest.mark.parametrize("kind", ["DATA", "HEADERS"])
def test_5_1_half_closed_remote_data_or_headers(conn, kind):
    sid = _open_slow(conn)  # END_STREAM sent: half-closed (remote) at the server
    if kind == "DATA":
        conn.send(raw(DATA, END_STREAM, sid, b"test"))
    else:
        conn.send(conn.headers_frame(sid, [(b"x-trailer", b"1")]))
    # a stream error STREAM_CLOSED; a connection error with it is allowed (§5.4.1)
    stream_error(conn, sid, STREAM_CLOSED)


def test_5_1_half_closed_remote_continuation(conn):
    sid = _open_slow(conn)
    conn.send(raw(CONTINUATION, END_HEADERS, sid, conn.block([(b"x-a", b"1")])))
    # no header block is open: a CONTINUATION here is a connection error (§6.10)
    connection_error(conn, PROTOCOL_ERROR, STREAM_CLOSED)


@pytest.mark.parametrize("kind", ["DATA", "HEADERS"])
def test_5_1_closed_by_rst_stream_then_data_or_headers(conn, kind):
    sid = _open_slow(conn, end_stream=False)
    conn.send(raw(RST_STREAM, 0, sid, struct.pack(">I", 8)))  # CANCEL
    if kind == "DATA":
        conn.send(raw(DATA, END_STREAM, sid, b"test"))
    else:
        conn.send(conn.headers_frame(sid, [(b"x-trailer", b"1")]))
    stream_error(conn, sid, STREAM_CLOSED)


def test_5_1_closed_by_rst_stream_then_continuation(conn):
    sid = _open_slow(conn, end_stream=False)
    conn.send(raw(RST_STREAM, 0, sid, struct.pack(">I", 8)))
    conn.send(raw(CONTINUATION, END_HEADERS, sid, conn.block([(b"x-a", b"1")])))
    connection_error(conn, PROTOCOL_ERROR, STREAM_CLOSED)


def _closed_normally(c: Conn) -> int:
    sid = c.sid()
    c.send(c.headers_frame(sid, c.req("/hello")))
    assert c.read(lambda: c.ended(sid))
    return sid


@pytest.mark.parametrize("kind", ["DATA", "HEADERS", "CONTINUATION"])
def test_5_1_closed_stream_frames(conn, kind):
    sid = _closed_normally(conn)
    if kind == "DATA":
        conn.send(raw(DATA, END_STREAM, sid, b"test"))
    elif kind == "HEADERS":
        conn.send(conn.headers_frame(sid, conn.req("/hello")))
    else:
        conn.send(raw(CONTINUATION, END_HEADERS, sid, conn.block([(b"x-a", b"1")])))
    if kind == "CONTINUATION":
        # no header block is open: a connection error (§6.10), PROTOCOL_ERROR or STREAM_CLOSED
        connection_error(conn, PROTOCOL_ERROR, STREAM_CLOSED)
    else:
        # §6.1/§5.1 "closed": a stream error STREAM_CLOSED; §5.1 lets the receiver make it a
        # connection error STREAM_CLOSED instead: both accepted
        stream_error(conn, sid, STREAM_CLOSED)


@pytest.mark.parametrize("frame", [
    pytest.param(lambda sid: raw(WINDOW_UPDATE, 0, sid, struct.pack(">I", 100)), id="WINDOW_UPDATE"),
    pytest.param(lambda sid: raw(PRIORITY, 0, sid, struct.pack(">IB", 0, 15)), id="PRIORITY"),
])
def test_5_1_half_closed_remote_allows_window_update_and_priority(conn, frame):
    sid = _open_slow(conn, ms=300)
    conn.send(frame(sid))
    assert conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200" and conn.rst(sid) is None and conn.goaway() is None
    usable(conn)


def test_5_1_rst_stream_on_an_open_stream_cancels_it(conn):
    sid = _open_slow(conn, ms=800)
    conn.send(raw(RST_STREAM, 0, sid, struct.pack(">I", 8)))  # CANCEL
    conn.read(lambda: False, timeout=1.3)
    assert not any(f.stream_id == sid for f in conn.frames
                   if isinstance(f, (HeadersFrame, DataFrame, RstStreamFrame))), conn.frames
    assert conn.goaway() is None
    usable(conn)


# == 5.1.1 stream identifiers =============================================================

def test_5_1_1_even_stream_id(env, conn):
    mark = marker()
    conn.send(conn.headers_frame(2, conn.req(mark, "rec")))
    connection_error(conn, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


def test_5_1_1_decreasing_stream_id(env, conn):
    mark = marker()
    conn.send(conn.headers_frame(5, conn.req("/hello")))
    assert conn.read(lambda: conn.ended(5))
    conn.send(conn.headers_frame(3, conn.req(mark, "rec")))
    connection_error(conn, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


# == 5.1.2 stream concurrency =============================================================

def test_5_1_2_beyond_max_concurrent_streams(env, conn):
    settings = next(f for f in conn.frames if isinstance(f, SettingsFrame) and "ACK" not in f.flags)
    assert settings.settings.get(S_MAX_CONCURRENT) == MAX_STREAMS
    sids = [_open_slow(conn, ms=1000) for _ in range(MAX_STREAMS)]
    mark = marker()
    extra = conn.sid()
    conn.send(conn.headers_frame(extra, conn.req(mark, "rec")))
    # a stream error PROTOCOL_ERROR or REFUSED_STREAM (§5.1.2); a connection error is
    # allowed (§5.4.1)
    how = stream_error(conn, extra, PROTOCOL_ERROR, REFUSED_STREAM)
    if how == "stream":  # the streams within the limit are answered
        assert conn.read(lambda: all(conn.ended(s) for s in sids))
        assert all(conn.status(s) == b"200" for s in sids)
    never_forwarded(env, conn, mark)


# == 5.3.1 stream dependencies ============================================================

@pytest.mark.parametrize("kind", ["HEADERS", "PRIORITY"])
def test_5_3_1_self_dependency(env, conn, kind):
    mark = marker()
    sid = conn.sid()
    if kind == "HEADERS":
        payload = struct.pack(">IB", sid, 15) + conn.block(conn.req(mark, "rec"))
        conn.send(raw(HEADERS, END_STREAM | END_HEADERS | PRIORITY_FLAG, sid, payload))
    else:
        conn.send(raw(PRIORITY, 0, sid, struct.pack(">IB", sid, 15)))
    # a stream error PROTOCOL_ERROR; meshd (h2) makes it a connection error: allowed (§5.4.1)
    stream_error(conn, sid, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


# == 5.4 error handling ===================================================================

def test_5_4_1_goaway_then_close_after_a_connection_error(conn):
    sid = _open_slow(conn, ms=300)
    conn.send(raw(PING, 0, 0, b"short"))  # a PING of 5 bytes: connection error
    connection_error(conn, FRAME_SIZE_ERROR)
    g = conn.goaway()
    assert g.last_stream_id == sid, g  # the last stream the server took


# == 6.1 DATA =============================================================================

def test_6_1_data_on_stream_0(conn):
    conn.send(raw(DATA, END_STREAM, 0, b"test"))
    connection_error(conn, PROTOCOL_ERROR)


@pytest.mark.parametrize("pad", [5, 6, 255])  # pad length >= the frame payload (5 bytes)
def test_6_1_data_padding_too_long(conn, pad):
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req("/echo", method="POST"), end_stream=False),
              raw(DATA, END_STREAM | PADDED, sid, bytes([pad]) + b"test"))
    connection_error(conn, PROTOCOL_ERROR)


def test_6_1_padded_data_is_accepted(conn):
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req("/echo", method="POST",
                                               extra=[(b"content-length", b"4")]), end_stream=False),
              raw(DATA, END_STREAM | PADDED, sid, b"\x06test" + b"\x00" * 6))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200" and conn.body(sid) == b"test"


# == 6.2 HEADERS ==========================================================================

def test_6_2_headers_on_stream_0(env, conn):
    mark = marker()
    conn.send(conn.headers_frame(0, conn.req(mark, "rec")))
    connection_error(conn, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


@pytest.mark.parametrize("pad", [200, 255])
def test_6_2_headers_padding_too_long(env, conn, pad):
    mark = marker()
    block = conn.block(conn.req(mark, "rec"))
    assert len(block) < pad
    conn.send(raw(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, bytes([pad]) + block))
    connection_error(conn, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


def test_6_2_padded_headers_with_priority_are_accepted(conn):
    block = conn.block(conn.req("/hello"))
    payload = bytes([10]) + struct.pack(">IB", 0, 15) + block + b"\x00" * 10
    sid = conn.sid()
    conn.send(raw(HEADERS, END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG, sid, payload))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200" and conn.body(sid) == b"a /hello\n"


# == 6.3 PRIORITY =========================================================================

def test_6_3_priority_on_stream_0(conn):
    conn.send(raw(PRIORITY, 0, 0, struct.pack(">IB", 1, 15)))
    connection_error(conn, PROTOCOL_ERROR)


def test_6_3_priority_wrong_length(conn):
    sid = _open_slow(conn, ms=300)
    conn.send(raw(PRIORITY, 0, sid, struct.pack(">I", 0)))  # 4 bytes, not 5
    # a stream error FRAME_SIZE_ERROR; a connection error with it is allowed (§5.4.1)
    stream_error(conn, sid, FRAME_SIZE_ERROR)


# == 6.4 RST_STREAM =======================================================================

def test_6_4_rst_stream_on_stream_0(conn):
    conn.send(raw(RST_STREAM, 0, 0, struct.pack(">I", 8)))
    connection_error(conn, PROTOCOL_ERROR)


def test_6_4_rst_stream_on_idle_stream(conn):
    conn.send(raw(RST_STREAM, 0, 1, struct.pack(">I", 8)))
    connection_error(conn, PROTOCOL_ERROR)


def test_6_4_rst_stream_wrong_length(conn):
    sid = _open_slow(conn, ms=300)
    conn.send(raw(RST_STREAM, 0, sid, b"\x00\x00\x00"))
    connection_error(conn, FRAME_SIZE_ERROR)


# == 6.5 SETTINGS =========================================================================

@pytest.mark.parametrize("frame,code", [
    pytest.param(raw(SETTINGS, ACK, 0, settings_payload((S_INITIAL_WINDOW, 100))), FRAME_SIZE_ERROR,
                 id="6.5-ack-with-payload"),
    pytest.param(raw(SETTINGS, 0, 1, settings_payload((S_INITIAL_WINDOW, 100))), PROTOCOL_ERROR,
                 id="6.5-stream-id-not-0"),
    pytest.param(raw(SETTINGS, 0, 0, b"\x00\x04\x00\x00\x10"), FRAME_SIZE_ERROR,
                 id="6.5-length-not-multiple-of-6"),
    pytest.param(raw(SETTINGS, 0, 0, settings_payload((S_ENABLE_PUSH, 2))), PROTOCOL_ERROR,
                 id="6.5.2-enable-push-2"),
    pytest.param(raw(SETTINGS, 0, 0, settings_payload((S_INITIAL_WINDOW, 2**31))), FLOW_CONTROL_ERROR,
                 id="6.5.2-initial-window-2^31"),
    pytest.param(raw(SETTINGS, 0, 0, settings_payload((S_MAX_FRAME, 16383))), PROTOCOL_ERROR,
                 id="6.5.2-max-frame-size-16383"),
    pytest.param(raw(SETTINGS, 0, 0, settings_payload((S_MAX_FRAME, 2**24))), PROTOCOL_ERROR,
                 id="6.5.2-max-frame-size-2^24"),
])
def test_6_5_invalid_settings(conn, frame, code):
    conn.send(frame)
    connection_error(conn, code)


def test_6_5_2_unknown_setting_is_ignored_and_acked(conn):
    acks = sum(1 for f in conn.frames if isinstance(f, SettingsFrame) and "ACK" in f.flags)
    conn.send(raw(SETTINGS, 0, 0, settings_payload((0xff, 1), (0x4242, 77))))
    assert conn.read(lambda: sum(1 for f in conn.frames
                                 if isinstance(f, SettingsFrame) and "ACK" in f.flags) > acks)
    usable(conn)


def test_6_5_3_settings_are_acked(env):
    c = Conn(env.port, settings=settings_payload((S_MAX_CONCURRENT, 100)), handshake=False)
    assert c.read(lambda: any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in c.frames))
    ack = next(f for f in c.frames if isinstance(f, SettingsFrame) and "ACK" in f.flags)
    assert ack.settings == {} and ack.stream_id == 0
    c.close()


def test_6_5_3_the_last_of_repeated_values_wins(env):
    # INITIAL_WINDOW_SIZE 100 then 1 in one frame: the response gets a 1-byte window
    c = Conn(env.port, settings=settings_payload((S_INITIAL_WINDOW, 100), (S_INITIAL_WINDOW, 1)))
    sid = c.sid()
    c.send(c.headers_frame(sid, c.req("/bytes?n=100&cl=1")))
    c.read(lambda: False, timeout=1.0)
    assert c.status(sid) == b"200"
    assert c.body(sid) == b"x", c.frames
    c.close()


# == 6.6 PUSH_PROMISE, 8.4 server push ====================================================

def test_6_6_push_promise_from_a_client(conn):
    sid = _open_slow(conn, ms=300)
    conn.send(raw(PUSH_PROMISE, END_HEADERS, sid, struct.pack(">I", 2) + conn.block(conn.req())))
    connection_error(conn, PROTOCOL_ERROR)


# == 6.7 PING =============================================================================

def test_6_7_ping_is_answered_with_the_same_payload(conn):
    conn.send(raw(PING, 0, 0, b"\x01\x02\x03\x04\x05\x06\x07\x08"))
    assert conn.read(lambda: b"\x01\x02\x03\x04\x05\x06\x07\x08" in conn.ping_acks())
    ack = next(f for f in conn.frames if isinstance(f, PingFrame) and "ACK" in f.flags)
    assert ack.stream_id == 0


def test_6_7_a_ping_ack_is_not_answered(conn):
    conn.send(raw(PING, ACK, 0, b"notreply"))
    ping_ok(conn, b"realping")
    assert b"notreply" not in conn.ping_acks()


@pytest.mark.parametrize("frame,code", [
    pytest.param(raw(PING, 0, 1, b"12345678"), PROTOCOL_ERROR, id="6.7-stream-id-not-0"),
    pytest.param(raw(PING, 0, 0, b"123456"), FRAME_SIZE_ERROR, id="6.7-length-6"),
    pytest.param(raw(PING, 0, 0, b"1234567890"), FRAME_SIZE_ERROR, id="6.7-length-10"),
])
def test_6_7_invalid_ping(conn, frame, code):
    conn.send(frame)
    connection_error(conn, code)


# == 6.8 GOAWAY ===========================================================================

def test_6_8_goaway_with_a_stream_id(conn):
    conn.send(raw(GOAWAY, 0, 1, struct.pack(">II", 0, 0)))
    connection_error(conn, PROTOCOL_ERROR)


# == 6.9 WINDOW_UPDATE ====================================================================

def test_6_9_zero_increment_on_the_connection(conn):
    conn.send(raw(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)))
    connection_error(conn, PROTOCOL_ERROR)


def test_6_9_zero_increment_on_a_stream(conn):
    sid = _open_slow(conn, ms=500)
    conn.send(raw(WINDOW_UPDATE, 0, sid, struct.pack(">I", 0)))
    # a stream error PROTOCOL_ERROR; a connection error with it is allowed (§5.4.1)
    stream_error(conn, sid, PROTOCOL_ERROR)


def test_6_9_wrong_length(conn):
    conn.send(raw(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"))
    connection_error(conn, FRAME_SIZE_ERROR)


def test_6_9_1_connection_window_overflow(conn):
    conn.send(raw(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)),
              raw(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1)))
    connection_error(conn, FLOW_CONTROL_ERROR)


def test_6_9_1_stream_window_overflow(conn):
    sid = _open_slow(conn, ms=500)
    conn.send(raw(WINDOW_UPDATE, 0, sid, struct.pack(">I", 2**31 - 1)),
              raw(WINDOW_UPDATE, 0, sid, struct.pack(">I", 2**31 - 1)))
    # a stream error FLOW_CONTROL_ERROR; a connection error with it is allowed (§5.4.1)
    stream_error(conn, sid, FLOW_CONTROL_ERROR)


def test_6_9_1_initial_window_of_one_byte(env):
    c = Conn(env.port, settings=settings_payload((S_INITIAL_WINDOW, 1)))
    sid = c.sid()
    c.send(c.headers_frame(sid, c.req("/bytes?n=100&cl=1")))
    c.read(lambda: False, timeout=1.0)
    assert c.status(sid) == b"200" and c.body(sid) == b"x", c.frames
    c.send(raw(WINDOW_UPDATE, 0, sid, struct.pack(">I", 99)))
    assert c.read(lambda: c.ended(sid))
    assert c.body(sid) == b"x" * 100
    c.close()


def test_6_9_2_initial_window_change_applies_to_open_streams(env):
    """A response held by a zero window waits, and resumes when SETTINGS opens it."""
    c = Conn(env.port, settings=settings_payload((S_INITIAL_WINDOW, 0)))
    sid = c.sid()
    c.send(c.headers_frame(sid, c.req("/bytes?n=100&cl=1")))
    c.read(lambda: False, timeout=1.0)
    assert c.status(sid) == b"200" and c.body(sid) == b"" and not c.ended(sid), c.frames
    c.send(raw(SETTINGS, 0, 0, settings_payload((S_INITIAL_WINDOW, 100))))
    assert c.read(lambda: c.ended(sid)), c.frames
    assert c.body(sid) == b"x" * 100
    c.close()


def test_6_9_2_a_window_made_negative_by_settings(env):
    c = Conn(env.port, settings=settings_payload((S_INITIAL_WINDOW, 3)))
    sid = c.sid()
    c.send(c.headers_frame(sid, c.req("/bytes?n=10&cl=1")))
    assert c.read(lambda: len(c.body(sid)) == 3)
    c.send(raw(SETTINGS, 0, 0, settings_payload((S_INITIAL_WINDOW, 2))))  # window: -1
    c.send(raw(WINDOW_UPDATE, 0, sid, struct.pack(">I", 2)))              # window: 1
    c.read(lambda: False, timeout=1.0)
    assert c.body(sid) == b"xxxx", c.frames
    assert c.goaway() is None
    c.close()


def test_6_9_2_initial_window_too_large_in_a_later_settings(conn):
    conn.send(raw(SETTINGS, 0, 0, settings_payload((S_INITIAL_WINDOW, 2**31))))
    connection_error(conn, FLOW_CONTROL_ERROR)


# == 6.10 CONTINUATION, 4.3 header blocks =================================================

def test_6_10_headers_split_over_continuations_are_accepted(conn):
    sid = conn.sid()
    block = conn.block(conn.req("/hello", extra=[(b"x-long", b"l" * 3000)]))
    parts = [block[i:i + 1000] for i in range(0, len(block), 1000)]
    frames = [raw(HEADERS, END_STREAM, sid, parts[0])]
    frames += [raw(CONTINUATION, 0, sid, p) for p in parts[1:-1]]
    frames.append(raw(CONTINUATION, END_HEADERS, sid, parts[-1]))
    conn.send(*frames)
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200"


def _open_block(c: Conn, mark: str) -> tuple[int, bytes, bytes]:
    """A HEADERS frame without END_HEADERS and a CONTINUATION with the rest of the block."""
    sid = c.sid()
    block = c.block(c.req(mark, "rec"))
    return sid, raw(HEADERS, END_STREAM, sid, block[:5]), block[5:]


@pytest.mark.parametrize("case", [
    "4.3-priority-inside-block", "6.2-data-inside-block", "6.2-continuation-other-stream",
    "4.3-headers-other-stream-inside-block", "6.10-continuation-then-data", "6.10-stream-0",
    "6.10-after-end-headers", "6.10-after-continuation-end-headers", "6.10-preceded-by-data",
])
def test_6_10_header_block_rules(env, conn, case):
    mark = marker()
    sid, headers, rest = _open_block(conn, mark)
    if case == "4.3-priority-inside-block":
        conn.send(headers, raw(PRIORITY, 0, sid, struct.pack(">IB", 0, 15)))
    elif case == "6.2-data-inside-block":
        conn.send(headers, raw(DATA, END_STREAM, sid, b"test"))
    elif case == "6.2-continuation-other-stream":
        conn.send(headers, raw(CONTINUATION, END_HEADERS, sid + 2, rest))
    elif case == "4.3-headers-other-stream-inside-block":
        conn.send(headers, conn.headers_frame(sid + 2, conn.req()))
    elif case == "6.10-continuation-then-data":
        conn.send(headers, raw(CONTINUATION, 0, sid, rest), raw(DATA, END_STREAM, sid, b"test"))
    elif case == "6.10-stream-0":
        conn.send(headers, raw(CONTINUATION, END_HEADERS, 0, rest))
    elif case == "6.10-after-end-headers":
        block = conn.block(conn.req(mark, "rec"))
        conn.send(raw(HEADERS, END_HEADERS, sid, block),
                  raw(CONTINUATION, END_HEADERS, sid, conn.block([(b"x-a", b"1")])))
    elif case == "6.10-after-continuation-end-headers":
        conn.send(headers, raw(CONTINUATION, END_HEADERS, sid, rest),
                  raw(CONTINUATION, END_HEADERS, sid, conn.block([(b"x-a", b"1")])))
    elif case == "6.10-preceded-by-data":
        block = conn.block(conn.req(mark, "rec", method="POST"))
        conn.send(raw(HEADERS, END_HEADERS, sid, block), raw(DATA, 0, sid, b"test"),
                  raw(CONTINUATION, END_HEADERS, sid, conn.block([(b"x-a", b"1")])))
    connection_error(conn, PROTOCOL_ERROR)
    if case not in ("6.10-after-end-headers", "6.10-after-continuation-end-headers",
                    "6.10-preceded-by-data"):
        never_forwarded(env, conn, mark)  # the block never completed


# == 8.1 HTTP message exchanges ===========================================================

def test_8_1_trailers_reach_an_http1_upstream(env, conn):
    mark = marker()
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(mark, "rec", method="POST",
                                                extra=[(b"te", b"trailers")]), end_stream=False),
              raw(DATA, 0, sid, b"hello"),
              conn.headers_frame(sid, [(b"x-checksum", b"abc")]))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200" and conn.body(sid) == b"ok"
    sent = env.rec.request_with(mark)
    assert b"transfer-encoding: chunked" in sent.lower(), sent
    assert b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n" in sent, sent
    usable(conn)


@pytest.mark.parametrize("path", ["/bytes?n=0&cl=1", "/bytes?n=0", "/bytes?n=5&cl=1"])
def test_8_1_end_stream_rides_on_the_last_frame(env, conn, path):
    """One relay for every upstream: END_STREAM goes with the head of a response without
    a body (Content-Length: 0, an empty chunked one: no empty DATA after it) and with the
    last DATA of a complete one without trailers."""
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(path)))
    assert conn.read(lambda: conn.ended(sid)), conn.frames
    frames = [f for f in conn.frames
              if f.stream_id == sid and isinstance(f, (HeadersFrame, DataFrame))]
    assert conn.status(sid) == b"200", conn.frames
    n = 5 if "n=5" in path else 0
    assert conn.body(sid) == b"x" * n
    assert "END_STREAM" in frames[-1].flags and len(frames) == (2 if n else 1), frames
    assert all("END_STREAM" not in f.flags for f in frames[:-1]), frames


def test_8_1_second_headers_without_end_stream(env, conn):
    mark = marker()
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(mark, "rec", method="POST"), end_stream=False),
              conn.headers_frame(sid, [(b"x-trailer", b"1")], end_stream=False))
    # a malformed message: a stream error PROTOCOL_ERROR (connection error allowed, §5.4.1)
    stream_error(conn, sid, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


def test_8_1_pseudo_header_in_trailers(env, conn):
    mark = marker()
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(mark, "rec", method="POST"), end_stream=False),
              conn.headers_frame(sid, [(b":method", b"GET")]))
    assert stream_error(conn, sid, PROTOCOL_ERROR) == "stream"
    never_forwarded(env, conn, mark)


# == 8.1.1 malformed messages, 8.2 header fields, 8.3 pseudo-header fields ===============

def _fields(case: str, path: str) -> list[tuple[bytes, bytes]]:
    method, scheme, p, auth = (b":method", b"GET"), (b":scheme", b"http"), (b":path", path.encode()), \
        (b":authority", b"rec")
    return {
        "8.2-uppercase-name": [method, scheme, p, auth, (b"X-Upper", b"1")],
        "8.2.2-connection": [method, scheme, p, auth, (b"connection", b"keep-alive")],
        "8.2.2-keep-alive": [method, scheme, p, auth, (b"keep-alive", b"timeout=5")],
        "8.2.2-proxy-connection": [method, scheme, p, auth, (b"proxy-connection", b"keep-alive")],
        "8.2.2-transfer-encoding": [method, scheme, p, auth, (b"transfer-encoding", b"chunked")],
        "8.2.2-upgrade": [method, scheme, p, auth, (b"upgrade", b"websocket")],
        "8.2.2-te-not-trailers": [method, scheme, p, auth, (b"te", b"trailers, deflate")],
        "8.2.1-crlf-in-value": [method, scheme, p, auth, (b"x-a", b"1\r\nx-injected: 1")],
        "8.2.1-nul-in-value": [method, scheme, p, auth, (b"x-a", b"a\x00b")],
        "8.2.1-leading-space-in-value": [method, scheme, p, auth, (b"x-a", b" 1")],
        "8.2.1-trailing-tab-in-value": [method, scheme, p, auth, (b"x-a", b"1\t")],
        "8.2.1-space-in-name": [method, scheme, p, auth, (b"x a", b"1")],
        "8.2.1-colon-in-name": [method, scheme, p, auth, (b"x:a", b"1")],
        "8.2.1-lf-in-name": [method, scheme, p, auth, (b"x\na", b"1")],
        "8.2.1-empty-name": [method, scheme, p, auth, (b"", b"1")],
        "8.3-pseudo-after-regular": [method, scheme, auth, (b"x-a", b"1"), p],
        "8.3-unknown-pseudo": [method, scheme, p, auth, (b":custom", b"1")],
        "8.3-response-pseudo-in-request": [method, scheme, p, auth, (b":status", b"200")],
        "8.3.1-empty-path": [method, scheme, (b":path", b""), auth, (b"x-mark", path.encode())],
        "8.3.1-missing-method": [scheme, p, auth],
        "8.3.1-missing-scheme": [method, p, auth],
        "8.3.1-missing-path": [method, scheme, auth, (b"x-mark", path.encode())],
        "8.3.1-duplicate-method": [method, method, scheme, p, auth],
        "8.3.1-duplicate-scheme": [method, scheme, scheme, p, auth],
        "8.3.1-duplicate-path": [method, scheme, p, p, auth],
    }[case]


HEADER_CASES = ["8.2-uppercase-name", "8.2.1-crlf-in-value", "8.2.1-nul-in-value",
                "8.2.1-leading-space-in-value", "8.2.1-trailing-tab-in-value", "8.2.1-space-in-name",
                "8.2.1-colon-in-name", "8.2.1-lf-in-name", "8.2.1-empty-name", "8.2.2-connection", "8.2.2-keep-alive",
                "8.2.2-proxy-connection", "8.2.2-transfer-encoding", "8.2.2-upgrade",
                "8.2.2-te-not-trailers", "8.3-pseudo-after-regular", "8.3-unknown-pseudo",
                "8.3-response-pseudo-in-request", "8.3.1-empty-path", "8.3.1-missing-method",
                "8.3.1-missing-scheme", "8.3.1-missing-path", "8.3.1-duplicate-method",
                "8.3.1-duplicate-scheme", "8.3.1-duplicate-path"]


@pytest.mark.parametrize("case", HEADER_CASES)
def test_8_malformed_request_headers(env, conn, case):
    mark = marker()
    sid = conn.sid()
    conn.send(raw(HEADERS, END_STREAM | END_HEADERS, sid, conn.block(_fields(case, mark))))
    # a malformed request: a stream error PROTOCOL_ERROR (§8.1.1), the connection stays
    # usable (meshd.proto.h2_headers), and never forwarded
    assert stream_error(conn, sid, PROTOCOL_ERROR) == "stream"
    never_forwarded(env, conn, mark)


def test_8_2_2_te_trailers_is_allowed(conn):
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req("/hello", extra=[(b"te", b"trailers")])))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200"


@pytest.mark.parametrize("case", ["more-data-than-length", "less-data-than-length",
                                  "several-data-frames-sum-differs"])
def test_8_1_1_content_length_mismatch(env, conn, case):
    mark = marker()
    sid = conn.sid()
    length = {"more-data-than-length": b"1", "less-data-than-length": b"10",
              "several-data-frames-sum-differs": b"8"}[case]
    frames = [conn.headers_frame(sid, conn.req(mark, "rec", method="POST",
                                               extra=[(b"content-length", length)]), end_stream=False)]
    if case == "several-data-frames-sum-differs":
        frames += [raw(DATA, 0, sid, b"test"), raw(DATA, 0, sid, b"test"), raw(DATA, END_STREAM, sid, b"x")]
    else:
        frames.append(raw(DATA, END_STREAM, sid, b"test"))
    conn.send(*frames)
    # a malformed request: a stream error PROTOCOL_ERROR (connection error allowed, §5.4.1);
    # sent in one write, meshd sees the mismatch before it forwards anything
    stream_error(conn, sid, PROTOCOL_ERROR)
    never_forwarded(env, conn, mark)


def test_8_1_head_request_has_no_content(conn):
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req("/hello", method="HEAD")))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200" and conn.body(sid) == b""


# == 8.2.3 compressing the Cookie header field ============================================

def test_8_2_3_cookie_crumbs_are_joined_for_http1(conn):
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req("/headers", extra=[
        (b"cookie", b"a=b"), (b"cookie", b"c=d"), (b"x-other", b"1"), (b"cookie", b"e=f")])))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200"
    seen = json.loads(conn.body(sid))
    assert seen["cookie"] == "a=b; c=d; e=f", seen
