"""meshd.worker.upstream.h2 against a scripted h2 server and a real grpcio server.

How this runs in the shared pytest process: the module under test uses gevent's own
sockets (``gevent.socket``), never the patched stdlib, so it is cooperative without
``monkey.patch_all()``. The test body runs in the main greenlet; each wait in the client
(an Event, a socket read) switches to the hub, which runs the connection's reader
greenlet. The servers are ordinary OS threads with blocking stdlib sockets (the
scripted one) or grpcio's own C-core threads; nothing here is patched, so the two
worlds only meet on loopback sockets.

The scripted server (``H2Server``) is a select() loop per connection on the h2 library:
the request path picks a behaviour (echo, delay, trailers, RST_STREAM, GOAWAY, big
bodies), and it honours flow control both ways with windows that can be made small.
"""

from __future__ import annotations

import collections
import hashlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import gevent
import gevent.ssl
import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import GoAwayFrame

from meshd.errors import EndpointsBusy, PeerSilent, StreamRefused, UpstreamError, UpstreamTimeout
from meshd.testing.certs import TestCA
from meshd.testing.harness import free_port
from meshd.testing.tcp_server import TcpServer
from meshd.worker.upstream.h2 import STREAM_WINDOW, H2Upstream, StreamNotOpened
from meshd.worker.upstream.h2_pool import H2Pool
from meshd.worker.upstream.tls import TlsTarget

MB = 1 << 20
EARLY = ("/rst-now", "/goaway-now", "/early")  # answered at the request head, not its end
BAD_FIELDS = {"upper": (b"X-Upper", b"1"), "connection": (b"connection", b"close"),
              "crlf": (b"x-a", b"1\r\nx-injected: 1"), "pseudo": (b":path", b"/")}


# -- a scripted HTTP/2 server ------------------------------------------------------------

class _ServerStream:
    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.id = stream_id
        self.headers = dict(headers)
        url = urlsplit(self.headers[b":path"].decode())
        self.path = url.path
        self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.body = bytearray()
        self.actions: collections.deque[tuple[Any, ...]] = collections.deque()
        self.sent = 0        # DATA bytes sent
        self.done = False


class _ServerConn:
    """One client connection of ``H2Server``, served on its own thread."""

    def __init__(self, server: H2Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        # Sent heads are not validated, so a path can script a malformed one.
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(cfg)
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: server.initial_window,
        })
        self.out = bytearray()
        self.streams: dict[int, _ServerStream] = {}
        self.close_when_idle = False
        self.closed = False
        self.frozen_until = 0.0  # /freeze: reads and writes nothing until then (a stopped peer)

    def run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self.conn
        conn.initiate_connection()
        self.out += conn.data_to_send()
        try:
            if self.server.tls is not None:
                self.sock = self.server.tls.wrap_socket(self.sock, server_side=True)
            while not self.closed and not self.server.stopping:
                if time.monotonic() < self.frozen_until:
                    time.sleep(0.01)
                    continue
                r, w, _ = select.select([self.sock], [self.sock] if self.out else [], [], 0.01)
                if r or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    for event in conn.receive_data(data):
                        self.on_event(event)
                self.pump()
                self.out += conn.data_to_send()
                if w and self.out:
                    n = self.sock.send(self.out)
                    del self.out[:n]
                if self.close_when_idle and not self.out and all(
                        s.done for s in self.streams.values()):
                    break
        except (OSError, h2.exceptions.ProtocolError):
            pass  # the client went away or closed h2's state (its GOAWAY)
        finally:
            self.sock.close()

    def on_event(self, event: h2.events.Event) -> None:
        srv = self.server
        if isinstance(event, h2.events.RequestReceived):
            stream = _ServerStream(event.stream_id, event.headers)
            self.streams[event.stream_id] = stream
            srv.requests.append(stream)
            if stream.path == "/freeze":
                self.frozen_until = time.monotonic() + float(stream.query["for"])
            if stream.path in EARLY:
                self.respond(stream)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams[event.stream_id]
            stream.body += event.data
            if stream.path != "/noack":
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams[event.stream_id]
            if stream.path not in EARLY:
                self.respond(stream)
        elif isinstance(event, h2.events.PingReceived):
            srv.pings += 1
        elif isinstance(event, (h2.events.PingAckReceived, h2.events.SettingsAcknowledged)):
            srv.acks.append(type(event).__name__)
        elif isinstance(event, h2.events.StreamReset):
            srv.resets.append((event.stream_id, int(event.error_code)))
            stream = self.streams[event.stream_id]
            stream.actions.clear()
            stream.done = True

    def respond(self, s: _ServerStream) -> None:
        """Queue the actions the request path asks for."""
        q = s.query
        ok = [(b":status", b"200"), (b"server", b"scripted")]
        act = s.actions.append
        if "delay" in q:
            act(("sleep", time.monotonic() + float(q["delay"])))
        if s.path == "/echo":
            if "informational" in q:
                act(("headers", [(b":status", b"103"), (b"link", b"</a>; rel=preload")], False))
            act(("headers", ok + [(b"x-request-bytes", str(len(s.body)).encode())], False))
            if "trailers" in q:
                act(("data", bytes(s.body), False))
                digest = hashlib.sha256(s.body).hexdigest().encode()
                act(("trailers", [(b"x-sha256", digest)]))
            else:
                act(("data", bytes(s.body), True))
        elif s.path == "/big":
            act(("headers", ok, False))
            act(("data", b"x" * int(q["size"]), True))
        elif s.path in ("/rst", "/rst-now"):
            if "partial" in q:
                act(("headers", ok, False))
                act(("data", b"partial", False))
            act(("rst", int(q.get("code", "2"))))
        elif s.path == "/early":  # answers in full, then stops the upload (RFC 9113 §8.1)
            act(("headers", ok, False))
            act(("data", b"early", True))
            act(("rst", 0))
        elif s.path in ("/goaway", "/goaway-now"):
            act(("goaway", int(q.get("code", "0")), int(q.get("last", "0"))))
        elif s.path == "/ping-and-settings":
            self.conn.ping(b"12345678")
            self.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 7})
            act(("headers", ok, True))
        elif s.path == "/kill":
            act(("kill",))
        elif s.path == "/bad-head":
            act(("headers", [(b":status", b"200"), BAD_FIELDS[q["field"]]], True))
        elif s.path == "/bad-trailers":
            act(("headers", ok, False))
            act(("data", b"body", False))
            act(("trailers", [BAD_FIELDS[q["field"]]]))
        else:  # /, /noack
            act(("headers", ok, True))

    def pump(self) -> None:
        """Run queued actions in order, as flow control and timers allow."""
        conn = self.conn
        now = time.monotonic()
        for s in list(self.streams.values()):
            while s.actions and not self.closed:
                a = s.actions.popleft()
                kind = a[0]
                if kind == "sleep":
                    if now < a[1]:
                        s.actions.appendleft(a)
                        break
                elif kind == "headers":
                    conn.send_headers(s.id, a[1], end_stream=a[2])
                    s.done = a[2]
                elif kind == "trailers":
                    conn.send_headers(s.id, a[1], end_stream=True)
                    s.done = True
                elif kind == "data":
                    data: bytes = a[1]
                    end: bool = a[2]
                    if not data and end:
                        conn.end_stream(s.id)
                    while data:
                        size = min(len(data), conn.local_flow_control_window(s.id),
                                   conn.max_outbound_frame_size)
                        if size <= 0:
                            break
                        conn.send_data(s.id, data[:size], end_stream=end and size == len(data))
                        s.sent += size
                        data = data[size:]
                    if data:
                        s.actions.appendleft(("data", data, end))
                        break
                    s.done = end
                elif kind == "rst":
                    conn.reset_stream(s.id, a[1])
                    s.done = True
                elif kind == "goaway":
                    # By hand: h2's close_connection() would close its state and end the
                    # streams below last_stream_id too.
                    self.out += conn.data_to_send()
                    self.out += GoAwayFrame(0, last_stream_id=a[2], error_code=a[1]).serialize()
                    self.close_when_idle = True
                    s.done = True
                    for other in self.streams.values():
                        if other.id > a[2]:
                            other.actions.clear()
                            other.done = True
                elif kind == "kill":
                    self.sock.shutdown(socket.SHUT_RDWR)
                    self.closed = True
                    return


class H2Server:
    """An h2 server on 127.0.0.1:0, one thread per connection."""

    def __init__(self, *, initial_window: int = 65535, max_concurrent_streams: int = 100,
                 tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.initial_window = initial_window
        self.max_concurrent_streams = max_concurrent_streams
        self.requests: list[_ServerStream] = []
        self.resets: list[tuple[int, int]] = []
        self.acks: list[str] = []
        self.pings = 0
        self.stopping = False
        self.tcp = TcpServer(lambda sock: _ServerConn(self, sock).run())
        self.address = ("127.0.0.1", self.tcp.port)

    @property
    def connections(self) -> int:
        return self.tcp.accepted

    def stop(self) -> None:
        self.stopping = True
        self.tcp.close(wait=5)


@pytest.fixture
def server_factory() -> Any:
    servers: list[H2Server] = []

    def start(**kw: Any) -> H2Server:
        s = H2Server(**kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(server_factory: Any) -> H2Server:
    return server_factory()


@pytest.fixture
def up(server: H2Server) -> Iterator[H2Upstream]:
    """An H2Upstream connected to ``server``, closed after the test (if it has not been)."""
    upstream = H2Upstream.connect(server.address, 5)
    yield upstream
    upstream.close()


def req(server: H2Server | tuple[str, int], path: str, method: bytes = b"GET",
        extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    address = server.address if isinstance(server, H2Server) else server
    return [(b":method", method), (b":scheme", b"http"), (b":path", path.encode()),
            (b":authority", f"{address[0]}:{address[1]}".encode())] + (extra or [])


def read_all(stream: Any, timeout: float = 10.0) -> bytes:
    out = bytearray()
    while (chunk := stream.read(timeout)) is not None:
        assert chunk
        out += chunk
    return bytes(out)


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        gevent.sleep(0.01)


# -- against the scripted server -------------------------------------------------------

def test_get_and_echo(server: H2Server, up: H2Upstream) -> None:
    assert up.alive and up.available()
    s = up.open_stream(req(server, "/"), end_stream=True)
    assert s.stream_id == 1
    head = s.response(time.monotonic() + 5)
    assert (b":status", b"200") in head and (b"server", b"scripted") in head
    assert s.read(5) is None
    s2 = up.open_stream(req(server, "/echo", b"POST"), end_stream=False)
    s2.send_data(b"hello ")
    s2.send_data(b"world", end_stream=True)
    assert dict(s2.response(time.monotonic() + 5))[b":status"] == b"200"
    assert read_all(s2) == b"hello world"
    assert s2.trailers is None
    assert not up.streams  # both finished and left the connection
    up.close()
    assert not up.alive
    with pytest.raises(StreamNotOpened, match="takes no new streams: closed by meshd"):
        up.open_stream(req(server, "/"), end_stream=True)


def test_answers_ping_and_settings(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/ping-and-settings"), end_stream=True)
    assert s.read(5) is None
    wait_for(lambda: sorted(server.acks) == ["PingAckReceived", "SettingsAcknowledged",
                                             "SettingsAcknowledged"])
    assert up.conn.remote_settings.max_concurrent_streams == 7


def test_idle_connection_closes(server: H2Server, monkeypatch: Any) -> None:
    monkeypatch.setattr("meshd.worker.upstream.h2.WRITE_TIMEOUT", 0.05)
    up = H2Upstream.connect(server.address, 5)
    up.idle_timeout = 0.2
    s = up.open_stream(req(server, "/?delay=0.3"), end_stream=True)
    assert s.read(5) is None
    assert up.alive
    wait_for(lambda: up.closed, timeout=2)
    assert up.close_reason == "idle for 0.2s"


def test_silent_peer_is_taken_out_of_use(server: H2Server) -> None:
    """Streams wait and the peer answers nothing, not even our PING: the connection takes
    no new stream, a waiting stream that may be retried fails at once (PeerSilent), one
    that may not waits on and gets its answer when the peer is back; then the connection
    closes."""
    up = H2Upstream.connect(server.address, 5)
    up.ping_timeout = 0.4
    safe = up.open_stream(req(server, "/freeze?for=2"), end_stream=True)
    safe.retry_safe = True
    gevent.sleep(0.1)  # the peer is frozen now
    other = up.open_stream(req(server, "/"), end_stream=True)  # a POST, say: not retry-safe
    with pytest.raises(PeerSilent, match="answered no PING within 0.4s"):
        safe.response(time.monotonic() + 10)
    assert up.silent and not up.alive and not up.available()
    assert not other.ended and other._error is None  # still waiting
    assert dict(other.response(time.monotonic() + 10))[b":status"] == b"200"
    wait_for(lambda: up.closed)
    assert "no PING answer" in up.close_reason


def test_pool_forgets_connections_closed_for_idleness(server: H2Server) -> None:
    pool = H2Pool()
    s = pool.stream(server.address, req(server, "/"), True, 5, idle_timeout=0.2)
    assert s.read(5) is None
    (up,) = pool.connections[server.address]
    wait_for(lambda: up.closed, timeout=3)
    assert up.close_reason == "idle for 0.2s"
    assert pool.reap() == 1
    assert pool.connections == {} and not pool.retired


def test_slow_peer_that_answers_ping_keeps_its_connection(server: H2Server) -> None:
    up = H2Upstream.connect(server.address, 5)
    up.ping_timeout = 0.3
    s = up.open_stream(req(server, "/?delay=1"), end_stream=True)
    s.retry_safe = True
    assert dict(s.response(time.monotonic() + 10))[b":status"] == b"200"
    assert server.pings >= 2  # one per 0.15 s of silence
    assert up.alive and not up.silent
    up.close()


def test_refused_stream_raises_stream_refused(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/rst-now?code=7", b"POST"), end_stream=True)
    with pytest.raises(StreamRefused, match="REFUSED_STREAM"):
        s.response(time.monotonic() + 5)


def test_trailers_and_informational(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/echo?trailers=1&informational=1", b"POST"), False)
    s.send_data(b"abc")
    s.send_trailers([(b"x-client-trailer", b"1")])
    head = s.response(time.monotonic() + 5)
    assert dict(head)[b":status"] == b"200"
    assert [dict(h)[b":status"] for h in s.informational] == [b"103"]
    assert read_all(s) == b"abc"
    assert s.trailers == [(b"x-sha256", hashlib.sha256(b"abc").hexdigest().encode())]
    wait_for(lambda: len(server.requests) == 1 and server.requests[0].body == b"abc")


def test_many_concurrent_streams_share_one_connection(server: H2Server) -> None:
    pool = H2Pool()
    bodies = {i: f"body-{i}-".encode() * (i + 1) for i in range(100)}

    def one(i: int) -> bytes:
        s = pool.stream(server.address, req(server, "/echo?delay=0.2", b"POST"), False, 5)
        s.send_data(bodies[i], end_stream=True)
        s.response(time.monotonic() + 10)
        return read_all(s)

    try:
        started = time.monotonic()
        jobs = [gevent.spawn(one, i) for i in range(100)]
        gevent.joinall(jobs, timeout=30, raise_error=True)
        elapsed = time.monotonic() - started
        assert [j.value for j in jobs] == [bodies[i] for i in range(100)]
        assert server.connections == 1
        assert len(pool.connections[server.address]) == 1
        assert elapsed < 5, "streams ran one after another, not concurrently"
    finally:
        pool.close_all()


def test_pool_opens_a_second_connection_past_max_concurrent_streams(
        server_factory: Any) -> None:
    server = server_factory(max_concurrent_streams=10)
    pool = H2Pool(max_connections_per_endpoint=2)
    try:
        streams = [pool.stream(server.address, req(server, "/?delay=0.3"), True, 5)
                   for _ in range(20)]
        assert server.connections == 2
        with pytest.raises(EndpointsBusy):
            pool.stream(server.address, req(server, "/"), True, 5)
        for s in streams:
            assert dict(s.response(time.monotonic() + 5))[b":status"] == b"200"
            assert s.read(5) is None
        # Streams finished: the pooled connections have room again.
        s = pool.stream(server.address, req(server, "/"), True, 5)
        assert s.read(5) is None
        assert server.connections == 2
    finally:
        pool.close_all()


def test_five_megabytes_both_ways_through_small_windows(server_factory: Any) -> None:
    # The server advertises 16 KiB stream windows (and h2's 64 KiB connection window):
    # the upload waits for WINDOW_UPDATEs hundreds of times. meshd advertises 64 KiB
    # for the download, so the echo waits on our acknowledgements as we read.
    server = server_factory(initial_window=16384)
    body = bytes(range(256)) * (5 * MB // 256) + b"tail"
    up = H2Upstream.connect(server.address, 5, stream_window=65535, connection_window=65535)
    try:
        s = up.open_stream(req(server, "/echo?trailers=1", b"POST"), end_stream=False)
        sender = gevent.spawn(s.send_data, body, False, 10)
        assert sender.get(timeout=20) is None
        s.send_trailers([(b"x-done", b"1")])
        head = s.response(time.monotonic() + 20)  # the server answers at the request's end
        assert dict(head)[b"x-request-bytes"] == str(len(body)).encode()
        got = bytearray()
        while (chunk := s.read(10)) is not None:
            assert s.buffered <= 65535
            got += chunk
        assert bytes(got) == body
        assert s.trailers == [(b"x-sha256", hashlib.sha256(body).hexdigest().encode())]
    finally:
        up.close()


def test_slow_reader_holds_at_most_its_window(server: H2Server, up: H2Upstream) -> None:
    size = 5 * MB
    s = up.open_stream(req(server, f"/big?size={size}"), end_stream=True)
    s.response(time.monotonic() + 5)
    sent = server.requests[0]
    wait_for(lambda: sent.sent >= STREAM_WINDOW)
    gevent.sleep(0.3)  # the server would send more if it could
    assert sent.sent == STREAM_WINDOW
    assert s.buffered == STREAM_WINDOW
    assert len(read_all(s)) == size


def test_deadline_raises_timeout_and_resets_the_stream(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/?delay=5"), end_stream=True)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        s.response(started + 0.2)
    assert time.monotonic() - started < 3  # the deadline, not the 5 s the server takes
    wait_for(lambda: server.resets == [(s.stream_id, h2.errors.ErrorCodes.CANCEL)])
    with pytest.raises(UpstreamError):
        s.read(1)
    s.reset()  # idempotent
    # The connection is fine for the next stream.
    s2 = up.open_stream(req(server, "/"), end_stream=True)
    assert dict(s2.response(time.monotonic() + 5))[b":status"] == b"200"


def test_read_timeout_resets(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/echo?delay=5", b"POST"), end_stream=False)
    with pytest.raises(UpstreamTimeout):
        s.read(0.2)
    wait_for(lambda: server.resets == [(s.stream_id, h2.errors.ErrorCodes.CANCEL)])
    with pytest.raises(UpstreamError):
        s.send_data(b"late")


def test_send_without_window_times_out(server_factory: Any) -> None:
    server = server_factory(initial_window=1000)
    up = H2Upstream.connect(server.address, 5)
    try:
        s = up.open_stream(req(server, "/noack", b"POST"), end_stream=False)
        with pytest.raises(UpstreamTimeout, match="no send window"):
            s.send_data(b"x" * 5000, timeout=0.2)
        wait_for(lambda: server.resets == [(s.stream_id, h2.errors.ErrorCodes.CANCEL)])
        assert server.requests[0].body == b"x" * 1000
    finally:
        up.close()


@pytest.mark.parametrize(("code", "refused"), [(7, True), (2, False)])
def test_rst_stream(server: H2Server, up: H2Upstream, code: int, refused: bool) -> None:
    s = up.open_stream(req(server, f"/rst-now?code={code}", b"POST"), end_stream=False)
    name = h2.errors.ErrorCodes(code).name
    with pytest.raises(UpstreamError, match=name):
        s.response(time.monotonic() + 5)
    assert s.refused is refused
    with pytest.raises(UpstreamError, match=name):
        s.send_data(b"more")
    s.reset()  # a no-op now
    assert up.alive and not up.streams


def test_rst_stream_mid_body(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/rst?partial=1&code=2"), end_stream=True)
    s.response(time.monotonic() + 5)
    with pytest.raises(UpstreamError, match="INTERNAL_ERROR"):
        read_all(s)  # the partial body is dropped: the response is broken
    assert not s.refused


def test_complete_response_then_rst_no_error_stops_the_upload(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/early", b"POST"), end_stream=False)
    assert read_all(s) == b"early"
    wait_for(lambda: not up.streams)  # the RST_STREAM(NO_ERROR) arrived
    s.send_data(b"the rest nobody wants")  # dropped quietly, not an error
    s.end()
    assert s.read(1) is None and not s.refused
    s2 = up.open_stream(req(server, "/rst-now?code=0", b"POST"), end_stream=False)
    with pytest.raises(UpstreamError, match="NO_ERROR"):
        s2.response(time.monotonic() + 5)  # NO_ERROR before any response is an error


def test_goaway_refuses_later_streams_and_finishes_earlier_ones(server: H2Server) -> None:
    pool = H2Pool()
    try:
        slow = pool.stream(server.address, req(server, "/echo?delay=0.3", b"POST"), False, 5)
        later = pool.stream(server.address, req(server, "/?delay=5"), True, 5)
        up = pool.connections[server.address][0]
        # Stream 5 asks for GOAWAY(last_stream_id=1): stream 1 goes on, 3 and 5 were not
        # processed.
        bye = pool.stream(server.address, req(server, "/goaway-now?last=1"), True, 5)
        with pytest.raises(UpstreamError, match=r"GOAWAY\(NO_ERROR\) with last stream 1"):
            later.response(time.monotonic() + 5)
        assert later.refused and not up.alive and not up.available()
        with pytest.raises(UpstreamError):
            bye.response(time.monotonic() + 5)
        assert bye.refused
        # The stream below last_stream_id still runs, both ways.
        slow.send_data(b"still here", end_stream=True)
        assert dict(slow.response(time.monotonic() + 5))[b":status"] == b"200"
        assert read_all(slow) == b"still here"
        assert not slow.refused
        wait_for(lambda: up.closed)  # closed once its last stream ended
        # New streams go to a new connection.
        s = pool.stream(server.address, req(server, "/"), True, 5)
        assert s.read(5) is None
        assert server.connections == 2
    finally:
        pool.close_all()


def test_pool_drain_and_close_reach_retired_connections(server: H2Server) -> None:
    pool = H2Pool()
    first = pool.stream(server.address, req(server, "/?delay=5"), True, 5)
    pool.drain_all()  # the connection finishes `first`, takes nothing new
    assert first.upstream.draining and first.upstream in pool.retired
    second = pool.stream(server.address, req(server, "/?delay=5"), True, 5)
    assert second.upstream is not first.upstream
    pool.close_all()  # reaches the retired one too
    for s in (first, second):
        assert s.upstream.closed
        with pytest.raises(UpstreamError, match="closed by meshd"):
            s.response(time.monotonic() + 1)


def test_goaway_with_error_fails_every_stream(server: H2Server, up: H2Upstream) -> None:
    a = up.open_stream(req(server, "/?delay=5"), end_stream=True)
    up.open_stream(req(server, "/goaway-now?code=2&last=0"), end_stream=True)
    with pytest.raises(UpstreamError, match="INTERNAL_ERROR"):
        a.response(time.monotonic() + 5)
    assert a.refused
    wait_for(lambda: up.closed)


def test_connection_loss_fails_open_streams(server: H2Server, up: H2Upstream) -> None:
    done = up.open_stream(req(server, "/big?size=1000"), end_stream=True)
    done.response(time.monotonic() + 5)
    wait_for(lambda: done.ended)
    pending = up.open_stream(req(server, "/?delay=5"), end_stream=True)
    up.open_stream(req(server, "/kill"), end_stream=True)
    with pytest.raises(UpstreamError, match="lost"):
        pending.response(time.monotonic() + 5)
    assert not pending.refused  # it may have been processed: not safe to retry
    assert not up.alive
    assert len(read_all(done)) == 1000  # a complete response survives the loss


def test_goaway_by_us_drains(server: H2Server, up: H2Upstream) -> None:
    s = up.open_stream(req(server, "/?delay=0.2"), end_stream=True)
    up.goaway()
    assert not up.available()
    with pytest.raises(UpstreamError, match="draining"):
        up.open_stream(req(server, "/"), end_stream=True)
    assert dict(s.response(time.monotonic() + 5))[b":status"] == b"200"
    assert s.read(5) is None
    assert up.closed


def test_invalid_request_head_does_not_leak_a_stream(server: H2Server, up: H2Upstream) -> None:
    with pytest.raises(UpstreamError, match="invalid request head.*TE"):
        up.open_stream(req(server, "/", extra=[(b"te", b"gzip")]), True)
    assert not up.streams and not up.conn.streams and up.available()
    s = up.open_stream(req(server, "/echo", b"POST"), end_stream=False)
    with pytest.raises(UpstreamError, match="invalid trailers"):
        s.send_trailers([(b":path", b"/nope")])
    s.send_data(b"ok", end_stream=True)
    assert read_all(s) == b"ok"
    s = up.open_stream(req(server, "/"), end_stream=True)
    assert s.read(5) is None


@pytest.mark.parametrize("field", sorted(BAD_FIELDS))
def test_malformed_response_head_fails_only_its_stream(server: H2Server, up: H2Upstream, field: str) -> None:
    s = up.open_stream(req(server, f"/bad-head?field={field}"), end_stream=True)
    with pytest.raises(UpstreamError, match="malformed response head"):
        s.response(time.monotonic() + 5)
    t = up.open_stream(req(server, f"/bad-trailers?field={field}"), end_stream=True)
    assert t.response(time.monotonic() + 5)[0] == (b":status", b"200")
    with pytest.raises(UpstreamError, match="malformed trailers"):
        read_all(t)
    wait_for(lambda: not up.streams)
    ok = up.open_stream(req(server, "/"), end_stream=True)  # the connection goes on
    assert ok.response(time.monotonic() + 5)[0] == (b":status", b"200")
    assert up.alive and not up.closed


def test_connect_errors() -> None:
    address = ("127.0.0.1", free_port())
    with pytest.raises(UpstreamError, match="connect to"):
        H2Upstream.connect(address, 2)

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but says nothing
    try:
        with pytest.raises(UpstreamTimeout, match="SETTINGS"):
            H2Upstream.connect(silent.getsockname()[:2], 0.3)
    finally:
        silent.close()


def test_http1_upstream_is_a_protocol_error() -> None:
    def answer(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        time.sleep(0.5)
        conn.close()

    listener = TcpServer(answer, limit=1)
    try:
        with pytest.raises(UpstreamError, match="does not speak HTTP/2.*HTTP/1.1 400"):
            H2Upstream.connect(("127.0.0.1", listener.port), 5)
    finally:
        listener.close(wait=5)


@pytest.mark.parametrize("alpn", ["h2", "http/1.1"])
def test_tls_with_alpn(server_factory: Any, tmp_path: Path, alpn: str) -> None:
    ca = TestCA.create(tmp_path)
    issued = ca.issue("localhost", ips=["127.0.0.1"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(issued.cert, issued.key)
    server_ctx.set_alpn_protocols([alpn])
    server = server_factory(tls=server_ctx)
    client_ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(ca.cert_file)
    client_ctx.set_alpn_protocols(["h2"])
    target = TlsTarget("web", client_ctx, None, True, {})
    if alpn != "h2":
        with pytest.raises(UpstreamError, match="did not select ALPN h2"):
            target.connect_h2(server.address, 5)
        return
    pool = H2Pool()
    try:
        body = b"t" * 300_000  # several TLS records, windows and frames
        s = pool.stream(server.address, req(server, "/echo", b"POST"), False, 5, target)
        s.send_data(body, end_stream=True)
        assert dict(s.response(time.monotonic() + 5))[b":status"] == b"200"
        assert read_all(s) == body
    finally:
        pool.close_all()


def test_oversized_frame_fails_without_buffering_it() -> None:
    done = threading.Event()

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an empty SETTINGS
        conn.recv(65536)
        # A DATA frame header announcing 1 MiB (over the 16 KiB maximum), then a trickle.
        conn.sendall((1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + b"x" * 100)
        done.wait(10)
        conn.close()

    listener = TcpServer(serve, limit=1)
    try:
        started = time.monotonic()
        try:  # the bad frame may come before connect() returns, or right after
            up = H2Upstream.connect(("127.0.0.1", listener.port), 5)
            wait_for(lambda: up.closed, timeout=5)
            reason = up.close_reason
        except UpstreamError as e:
            reason = str(e)
        assert "FRAME_SIZE_ERROR" in reason
        assert time.monotonic() - started < 5  # long before the server closes (10 s)
    finally:
        done.set()
        listener.close(wait=5)


# -- against grpcio --------------------------------------------------------------------


@pytest.fixture
def grpc_server() -> Any:
    def echo(request: bytes, context: Any) -> bytes:
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler("meshd.test.Echo", {
        # No (de)serializers: the messages are raw bytes, no protoc needed.
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield ("127.0.0.1", port)
    server.stop(None)


@pytest.fixture
def grpc_up(grpc_server: tuple[str, int]) -> Iterator[H2Upstream]:
    """An H2Upstream connected to ``grpc_server``, closed after the test."""
    upstream = H2Upstream.connect(grpc_server, 5)
    yield upstream
    upstream.close()


def grpc_call(up: H2Upstream, address: tuple[str, int],
              message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes, dict[bytes, bytes]]:
    s = up.open_stream(req(address, "/meshd.test.Echo/Echo", b"POST", [
        (b"content-type", b"application/grpc"), (b"te", b"trailers")]), end_stream=False)
    s.send_data(b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
    head = s.response(time.monotonic() + 5)
    body = read_all(s)
    # A trailers-only answer (an error before any message) carries grpc-status in the head.
    trailers = dict(s.trailers) if s.trailers is not None else dict(head)
    return head, body, trailers


def test_grpc_unary_call(grpc_server: tuple[str, int], grpc_up: H2Upstream) -> None:
    head, body, trailers = grpc_call(grpc_up, grpc_server, b"hello")
    assert dict(head)[b":status"] == b"200"
    assert dict(head)[b"content-type"].startswith(b"application/grpc")
    assert body[0] == 0 and struct.unpack(">I", body[1:5])[0] == len(body) - 5
    assert body[5:] == b"echo:hello"
    assert trailers[b"grpc-status"] == b"0"

    _, body, trailers = grpc_call(grpc_up, grpc_server, b"fail")
    assert body == b""
    assert trailers[b"grpc-status"] == b"5"  # NOT_FOUND
    assert trailers[b"grpc-message"] == b"no such thing"


def test_grpc_many_concurrent_calls(grpc_server: tuple[str, int], grpc_up: H2Upstream) -> None:
    big = b"m" * 200_000  # over the 64 KiB windows grpcio starts with

    def one(i: int) -> bytes:
        _, body, trailers = grpc_call(grpc_up, grpc_server, b"%d:" % i + big)
        assert trailers[b"grpc-status"] == b"0"
        return body[5:]

    jobs = [gevent.spawn(one, i) for i in range(50)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [j.value for j in jobs] == [b"echo:%d:" % i + big for i in range(50)]
    assert grpc_up.alive
