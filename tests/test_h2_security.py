"""HTTP/2 attacks of issue 11 against a real meshd: H2.CL request smuggling to a pooled
HTTP/1.1 upstream, MadeYouReset (CVE-2025-8671), pseudo-headers HTTP/1.1 would refuse,
PING floods from a client that does not read, and the log lines a client can cause."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import h2.errors
import h2.events
import hpack
from hyperframe.frame import Frame, HeadersFrame, PingFrame, RstStreamFrame
from test_h2_server import (
    RawH2,
    _bounded,
    _goaway_code,
    _raw_connection,
    _read_frames,
    _worker_alive,
)

from meshd.testing.harness import http_get, process_usage, wait_for
from meshd.testing.tcp_server import TcpServer

_REQUEST_LINE = re.compile(rb"[A-Z]+ /\S* HTTP/1\.1")


class RecordingUpstream:
    """An HTTP/1.1 upstream that records each request per connection — (connection
    number, request line, headers, body) — and answers each as soon as its head arrived,
    before reading its body (as many servers do): a proxy that announces a body it does
    not send makes it read the next request's bytes as that body. A head that is not a
    request gets 400 and the connection closed."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, bytes, dict[bytes, bytes], bytes]] = []
        self.lock = threading.Lock()
        self.server = TcpServer(self._serve)

    def _serve(self, conn: socket.socket) -> None:
        number = self.server.accepted
        buf = b""
        with conn:
            conn.settimeout(30)
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    line, *lines = head.split(b"\r\n")
                    headers = {k.strip().lower(): v.strip() for k, _, v in
                               (x.partition(b":") for x in lines)}
                    entry = (number, line, headers, b"")
                    with self.lock:
                        self.requests.append(entry)
                    if not _REQUEST_LINE.fullmatch(line):
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                        return
                    answer = line.split(b" ")[1]
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(answer), answer))
                    length = int(headers.get(b"content-length", b"0"))
                    while len(buf) < length:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                    with self.lock:  # (the test may have cleared the list meanwhile)
                        at = next((i for i, r in enumerate(self.requests) if r is entry), None)
                        if at is not None:
                            self.requests[at] = (number, line, headers, body)
            except OSError:
                return

    @property
    def address(self) -> str:
        return self.server.address

    def lines(self) -> list[bytes]:
        with self.lock:
            return [line for _, line, _, _ in self.requests]

    def close(self) -> None:
        self.server.close()


def _reset_code(c: RawH2, sid: int) -> int | None:
    return next((e.error_code for e in c.events
                 if isinstance(e, h2.events.StreamReset) and e.stream_id == sid), None)


def _victim(port: int, up: RecordingUpstream) -> None:
    """A victim's request on the same worker (and so the same pooled upstream
    connection, if one was returned to the pool): it must arrive as its own request."""
    c = RawH2(port)
    sid = c.request("/victim/account", extra=[(b"cookie", b"session=victim-secret")])
    c.pump(lambda: c.ended(sid), timeout=20)
    head, body, _ = c.response(sid)
    assert head.get(b":status") == b"200" and body == b"/victim/account", (head, body, up.requests)
    victims = [r for r in up.requests if r[1] == b"GET /victim/account HTTP/1.1"]
    assert len(victims) == 1 and victims[0][2].get(b"cookie") == b"session=victim-secret", \
        up.requests
    c.close()


class FrameReader:
    """Reads the frames a server sends on ``sock`` in a thread, as they come."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames: list[Frame] = []
        self.closed = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        data = b""
        self.sock.settimeout(60)
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
                while len(data) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(data[:9]))
                    if len(data) < 9 + length:
                        break
                    frame.parse_body(memoryview(data[9:9 + length]))
                    self.frames.append(frame)
                    data = data[9 + length:]
        except OSError:
            pass
        self.closed = True

    def resets(self) -> int:
        return sum(1 for f in self.frames if isinstance(f, RstStreamFrame))

    def goaway(self) -> int | None:
        return _goaway_code(self.frames)


# -- item 2: H2.CL ------------------------------------------------------------------------

def _attack_end_stream_on_headers(c: RawH2) -> int:
    return c.request("/attack", method="POST", extra=[(b"content-length", b"43")])


def _post(c: RawH2, length: bytes) -> int:
    """HEADERS of a POST declaring ``length``, not yet written: the attack's frames go in
    one write, so meshd reads them together (before the upstream could answer)."""
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, [(b":method", b"POST"), (b":path", b"/attack"), (b":scheme", b"http"),
                              (b":authority", b"web"), (b"content-length", length)])
    return sid


def _attack_trailers_before_the_length(c: RawH2) -> int:
    sid = _post(c, b"43")
    c.conn.send_data(sid, b"0123456789")
    c.conn.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    c.flush()
    return sid


def _attack_more_data_than_declared(c: RawH2) -> int:
    sid = _post(c, b"5")
    c.conn.send_data(sid, b"0123456789" + b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
                     end_stream=True)
    c.flush()
    return sid


ATTACKS = [_attack_end_stream_on_headers, _attack_trailers_before_the_length,
           _attack_more_data_than_declared]


def test_h2_cl_smuggling_is_refused_and_the_victim_request_arrives_whole(mesh):
    """A content-length that disagrees with the DATA total (END_STREAM on HEADERS,
    trailers before the length, more DATA than declared) resets the stream with
    PROTOCOL_ERROR; the next client's request, on the same worker, arrives upstream as
    its own request (on 3e504a8 it was swallowed as the attacker's body)."""
    up = RecordingUpstream()
    try:
        m = mesh.run({"web": [up.address]}, workers=1)
        for attack in ATTACKS:
            c = RawH2(m.ports["outbound"])
            sid = attack(c)
            c.pump(lambda c=c, sid=sid: c.ended(sid) or c.goaway() is not None, timeout=20)
            _victim(m.ports["outbound"], up)
            assert _reset_code(c, sid) == h2.errors.ErrorCodes.PROTOCOL_ERROR, \
                (attack.__name__, c.events)
            assert c.goaway() is None, attack.__name__  # a stream error, not the connection's
            # nothing beyond the declared length, nor a smuggled request, went upstream
            assert b"GET /smuggled HTTP/1.1" not in up.lines(), up.requests
            assert all(len(body) <= 43 for *_, body in up.requests), up.requests
            c.close()
            with up.lock:
                up.requests.clear()
    finally:
        up.close()


def test_a_request_body_cut_short_never_returns_its_connection_to_the_pool():
    """Pool.release: a connection whose request was not sent in full (here: no body
    byte of the Content-Length announced) is closed, not kept for the next request."""
    from meshd.discovery.api import Endpoint
    from meshd.worker.upstream.http1 import Pool, UpstreamConn

    pool = Pool()
    ep = Endpoint("127.0.0.1", 9)
    a, b = socket.socketpair()
    with a, b:
        conn = UpstreamConn(a, ep)
        a.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 43\r\n\r\n")
        pool.release(conn)  # nobody said the request was complete
        assert a.fileno() == -1 and not pool._idle.get(("127.0.0.1", 9, ""))
    a, b = socket.socketpair()
    with a, b:
        conn = UpstreamConn(a, ep)
        conn.request_sent = True
        pool.release(conn)
        assert pool._idle[("127.0.0.1", 9, "")] == [conn] and not conn.request_sent
        pool.close_all()


# -- item 4: MadeYouReset ------------------------------------------------------------------

def test_streams_meshd_resets_count_in_the_reset_budget(mesh, backends):
    """CVE-2025-8671: HEADERS without END_STREAM (the upstream request starts), then
    trailers meshd must reset the stream for. 2,000 such streams: GOAWAY
    ENHANCE_YOUR_CALM after about h2_max_resets of them, and the upstream saw at most
    about that many requests (1,950 on 3e504a8, and no GOAWAY)."""
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1, extra="[limits]\nh2_max_resets = 100\n")
    s = _raw_connection(m.ports["outbound"])
    enc = hpack.Encoder()  # HPACK state: encoded in the order sent
    batches = []
    for first in range(0, 2000, 20):  # HEADERS of 20 streams, then their trailers
        heads, trailers = [], []
        for i in range(first, first + 20):
            h = HeadersFrame(1 + 2 * i)
            h.data = enc.encode([(b":method", b"POST"), (b":path", b"/mr"), (b":scheme", b"http"),
                                 (b":authority", b"web")])
            h.flags.add("END_HEADERS")
            heads.append(h.serialize())
        for i in range(first, first + 20):
            t = HeadersFrame(1 + 2 * i)
            t.data = enc.encode([(b"connection", b"close")])  # connection-specific: malformed
            t.flags.add("END_HEADERS")
            t.flags.add("END_STREAM")
            trailers.append(t.serialize())
        batches.append((b"".join(heads), b"".join(trailers)))
    reader = FrameReader(s)
    try:
        for n, (heads, trailers) in enumerate(batches):
            s.sendall(heads)
            s.sendall(trailers)
            # paced as a client would: the streams are answered (reset) before the next
            # ones open, so they never exceed SETTINGS_MAX_CONCURRENT_STREAMS
            wait_for(lambda n=n: reader.resets() >= 20 * (n + 1) or reader.goaway() is not None
                     or reader.closed, timeout=20, what="the resets")
            if reader.goaway() is not None:
                break
    except OSError:
        pass  # closed on us midway: the point
    wait_for(lambda: reader.closed, timeout=20, what="the connection closed")
    s.close()
    assert reader.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, reader.frames[-3:]
    assert reader.resets() <= 120, reader.resets()  # about h2_max_resets, not 2,000
    assert _worker_alive(m)  # and every stream of the attack is over by now
    started = json.loads(http_get("127.0.0.1", a.port, "/_counts")[2]).get("POST /mr", 0)
    assert started <= 200, started


# -- item 5: pseudo-headers HTTP/1.1 would refuse -----------------------------------------

BAD_HEADS = [
    {"method": "GET /admin?x="},
    {"path": "/a b"},
    {"path": "http://other-host/admin"},
    {"path": "admin"},
    {"path": "*"},  # only for OPTIONS
    {"host": "web@evil.example"},
    {"extra": [(b"x-a", b"1\x0b2")]},
    {"extra": [(b"x-a", b"\x01")]},
    {"extra": [(b"x-a", b"1\x7f")]},
]


def test_pseudo_headers_http1_would_refuse_are_reset_and_never_forwarded(mesh):
    up = RecordingUpstream()
    try:
        m = mesh.run({"web": [up.address]}, workers=1,
                     extra="[limits]\nh2_max_resets = 1000\n")
        c = RawH2(m.ports["outbound"])
        for bad in BAD_HEADS:
            sid = c.request(**bad)  # type: ignore[arg-type]
            c.pump(lambda sid=sid: c.ended(sid), timeout=20)
            assert _reset_code(c, sid) == h2.errors.ErrorCodes.PROTOCOL_ERROR, (bad, c.events)
        # a valid request after them: once it arrived, the upstream saw nothing else
        sid = c.request("/ok", method="OPTIONS")
        c.pump(lambda: c.ended(sid), timeout=20)
        assert c.response(sid)[0].get(b":status") == b"200"
        assert up.lines() == [b"OPTIONS /ok HTTP/1.1"], up.requests
        sid = c.request("*", method="OPTIONS")
        c.pump(lambda: c.ended(sid), timeout=20)
        assert up.lines()[-1] == b"OPTIONS * HTTP/1.1"
        # a CTL in a trailer (HTTP/1.1 chunked trailers upstream): reset as well
        sid = c.conn.get_next_available_stream_id()  # HEADERS, DATA, trailers: one write
        c.conn.send_headers(sid, [(b":method", b"POST"), (b":path", b"/t"), (b":scheme", b"http"),
                                  (b":authority", b"web")])
        c.conn.send_data(sid, b"body")
        c.conn.send_headers(sid, [(b"x-t", b"a\x0bb")], end_stream=True)
        c.flush()
        c.pump(lambda: c.ended(sid), timeout=20)
        assert _reset_code(c, sid) == h2.errors.ErrorCodes.PROTOCOL_ERROR, [e for e in c.events if getattr(e, "stream_id", 0) == sid]
        c.close()
    finally:
        up.close()


# -- item 9: PING flood without reading ----------------------------------------------------

def test_ping_flood_from_a_client_that_does_not_read_is_bounded(mesh, backends):
    """30 MiB of PINGs, never reading the ACKs: meshd stops reading from the client while
    its output queue is full and ends the connection (GOAWAY ENHANCE_YOUR_CALM past
    MAX_CONTROL_QUEUED); the worker's memory stays bounded (3e504a8: +26 MB) and another
    connection is served meanwhile."""
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    [worker] = m.worker_pids()
    before = process_usage(worker)
    s = _raw_connection(m.ports["outbound"])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    block = ping.serialize() * (1 << 16)  # about 1 MiB
    sent = 0
    s.settimeout(20)
    closed = False
    try:
        while sent < 30 << 20:
            s.sendall(block)
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError):
        closed = True  # meshd closed the connection on us: the point
    except TimeoutError:
        pass  # meshd stopped reading: it must still end the connection (below)
    assert sent < 30 << 20 or closed, "meshd read all 30 MiB without answering the flood"
    frames = _read_frames(s, timeout=20)
    s.close()
    assert closed or _goaway_code(frames) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, frames[-3:]
    assert _worker_alive(m)
    _bounded(worker, before, mib=12, cpu=20)


# -- item 12: log lines a client can cause ---------------------------------------------------

def test_malformed_streams_log_a_burst_then_one_suppressed_line(mesh, backends):
    """2,000 malformed streams log at most the Throttle's burst (10) per interval, then
    one "N more similar lines suppressed" line (3e504a8: one line per stream)."""
    from meshd.ratelog import BURST, INTERVAL

    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1, extra="[limits]\nh2_max_resets = 100000\n")
    s = _raw_connection(m.ports["outbound"])
    enc = hpack.Encoder()
    out = []
    for i in range(2001):
        h = HeadersFrame(1 + 2 * i)
        h.data = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                             (b":authority", b"web"), (b"X-Upper", b"1")])
        h.flags.add("END_HEADERS")
        h.flags.add("END_STREAM")
        out.append(h.serialize())
    reader = FrameReader(s)
    for first in range(0, 2000, 50):  # paced: within SETTINGS_MAX_CONCURRENT_STREAMS
        s.sendall(b"".join(out[first:first + 50]))
        # every stream was answered (reset) before the log is looked at
        wait_for(lambda first=first: reader.resets() >= first + 50 or reader.closed,
                 timeout=20, what="the resets")
    assert reader.resets() == 2000 and not reader.closed
    lines = [line for line in m.log().splitlines() if "malformed HTTP/2 request" in line]
    assert 1 <= len(lines) <= BURST, len(lines)
    time.sleep(INTERVAL + 0.5)  # the interval ends: the next line brings the count
    s.sendall(out[2000])
    suppressed = wait_for(lambda: re.search(r"h2-malformed: (\d+) more similar lines suppressed",
                                            m.log()), timeout=20, what="the suppressed line")
    assert int(suppressed.group(1)) == 2000 - len(lines)
    s.close()


def test_protocol_errors_log_a_burst_per_listener(mesh, backends):
    """50 connections that each end in a protocol error (a SETTINGS ACK with a payload)
    log at most the burst (3e504a8: one line each)."""
    from meshd.ratelog import BURST

    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    bad = b"\x00\x00\x06\x04\x01\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"  # ACK, 6 bytes
    for _ in range(50):
        s = _raw_connection(m.ports["outbound"])
        s.sendall(bad)
        assert _goaway_code(_read_frames(s)) == h2.errors.ErrorCodes.FRAME_SIZE_ERROR
        s.close()
    lines = [line for line in m.log().splitlines() if "HTTP/2 protocol error" in line]
    assert 1 <= len(lines) <= BURST, len(lines)
    assert _worker_alive(m)
