"""HTTP/2 from clients through a real meshd (prior knowledge) to HTTP/1.1 upstreams: real
clients (curl, nghttp, h2load), then the rules a proxy must keep, with raw frames
(hyperframe, hpack, and h2 as a permissive client): flow control, trailers, header
rules, GOAWAY on drain, Rapid Reset, CONTINUATION flood, HPACK bomb."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame, SettingsFrame

from meshd.testing.harness import process_usage, read_head, wait_for
from meshd.testing.tcp_server import TcpServer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--http2-prior-knowledge", *args], capture_output=True,
                          timeout=30)


def test_curl_get_and_post_over_h2(mesh, backends, tmp_path):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    url = f"http://127.0.0.1:{m.ports['outbound']}"
    r = _curl("-D", "-", "-H", "Host: web", f"{url}/hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"HTTP/2 200"), r.stdout
    assert r.stdout.endswith(b"a /hello\n")
    blob = os.urandom(3_000_000)
    (tmp_path / "blob").write_bytes(blob)
    r = _curl("-H", "Host: web", "--data-binary", f"@{tmp_path / 'blob'}", f"{url}/echo")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()
    # chunked (no content-length) upload: curl streams from stdin
    r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web", "-T", "-",
                        "-X", "POST", f"{url}/upload"], input=blob[:100_000], capture_output=True,
                       timeout=30)
    assert hashlib.sha256(blob[:100_000]).hexdigest().encode() in r.stdout, r.stdout
    r = _curl("-D", "-", "-H", "Host: nowhere", f"{url}/")
    assert r.stdout.startswith(b"HTTP/2 503") and b"meshd-error: unknown service" in r.stdout


def test_nghttp_and_h2load_multiplex_over_one_connection(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    url = f"http://127.0.0.1:{m.ports['outbound']}"
    started = time.monotonic()
    r = subprocess.run(["nghttp", "-n", "-s", "-H", ":authority: web",
                        *[f"{url}/slow?ms=1000&i={i}" for i in range(20)]],
                       capture_output=True, timeout=30)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.decode().splitlines() if "/slow?ms=1000" in line]
    assert len(lines) == 20 and all(" 200 " in line for line in lines), r.stdout
    # 20 streams of 1 s each on one connection ran side by side, not one after another
    assert elapsed < 10, elapsed
    r = subprocess.run(["h2load", "-n", "2000", "-c", "16", "-m", "10", "-H", ":authority: web",
                        f"{url}/"], capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert "2000 succeeded, 0 failed, 0 errored" in out, out
    assert "status codes: 2000 2xx" in out, out


class RawH2:
    """A permissive HTTP/2 client over a plain socket, for the rule tests."""

    def __init__(self, port: int, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str = "/", host: str = "web", extra: list | None = None,
                end: bool = True, method: str = "GET") -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
                   (b":authority", host.encode()), *(extra or [])]
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def pump(self, until, timeout: float = 10.0, ack: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            try:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                data = b""
                if time.monotonic() < deadline:
                    continue
            if not data:
                self.closed = True
                return
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if ack and isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.flush()

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                   and e.stream_id == sid for e in self.events)

    def response(self, sid: int) -> tuple[dict[bytes, bytes], bytes, list]:
        head: dict[bytes, bytes] = {}
        body = b""
        trailers: list = []
        for e in self.events:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, h2.events.ResponseReceived):
                head = dict(e.headers)
            elif isinstance(e, h2.events.DataReceived):
                body += e.data
            elif isinstance(e, h2.events.TrailersReceived):
                trailers = list(e.headers)
        return head, body, trailers

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def close(self) -> None:
        self.sock.close()


def test_flow_control_a_client_with_a_small_window_gets_every_byte(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    c = RawH2(m.ports["outbound"], window=1000)
    sid = c.request("/bytes?n=2000000&cl=1")
    c.pump(lambda: c.ended(sid), timeout=30)
    head, body, _ = c.response(sid)
    assert head[b":status"] == b"200"
    assert body == b"x" * 2_000_000
    c.close()


def test_a_client_that_opens_no_window_is_bounded_and_others_go_on(mesh, backends):
    """A stream whose reader never acknowledges holds its window, not the whole response,
    and other streams on other connections are served meanwhile."""
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    stuck = RawH2(m.ports["outbound"], window=16384)
    sid = stuck.request("/bytes?n=50000000")
    stuck.pump(lambda: False, timeout=1.0, ack=False)
    got = sum(len(e.data) for e in stuck.events if isinstance(e, h2.events.DataReceived))
    assert 0 < got <= 65535, got  # some, and the connection window at most
    assert not stuck.ended(sid)  # held, not finished
    other = RawH2(m.ports["outbound"])
    sid2 = other.request("/hello")
    other.pump(lambda: other.ended(sid2))
    assert other.response(sid2)[0][b":status"] == b"200"
    stuck.close()
    other.close()


def _trailer_upstream() -> TcpServer:
    def serve(conn: socket.socket) -> None:
        with conn:
            read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                         b"5\r\nhello\r\n0\r\ngrpc-status: 7\r\ngrpc-message: denied\r\n\r\n")
    return TcpServer(serve)


def test_chunked_trailers_from_http1_become_h2_trailers(mesh):
    with _trailer_upstream() as srv:
        m = mesh.run({"web": [srv.address]})
        c = RawH2(m.ports["outbound"])
        sid = c.request("/", extra=[(b"te", b"trailers")])
        c.pump(lambda: c.ended(sid))
        head, body, trailers = c.response(sid)
        assert head[b":status"] == b"200" and body == b"hello"
        assert (b"grpc-status", b"7") in trailers and (b"grpc-message", b"denied") in trailers
        c.close()


def test_header_rules_uppercase_and_connection_specific_fields_are_rejected(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    for bad in ([(b"X-Upper", b"1")], [(b"connection", b"keep-alive")], [(b"te", b"gzip")]):
        c = RawH2(m.ports["outbound"])
        sid = c.request("/headers", extra=bad)
        c.pump(lambda c=c, sid=sid: c.ended(sid) or c.goaway() is not None or c.closed)
        head, _, _ = c.response(sid)
        assert b":status" not in head, (bad, head)  # reset or GOAWAY, never forwarded
        c.close()
    # content-length that disagrees with DATA
    c = RawH2(m.ports["outbound"])
    sid = c.request("/echo", method="POST", end=False, extra=[(b"content-length", b"10")])
    c.conn.send_data(sid, b"12345", end_stream=True)
    c.flush()
    c.pump(lambda: c.ended(sid) or c.goaway() is not None or c.closed)
    assert b":status" not in c.response(sid)[0]
    c.close()


def test_drain_sends_goaway_and_finishes_streams_in_flight(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    c = RawH2(m.ports["outbound"])
    sid = c.request("/slow?ms=6000")
    m.wait_metric("request_total", 'service="web"')  # in flight before the HUP
    m.signal(signal.SIGHUP)  # a new generation; this worker drains
    # read raw frames: h2's own client state machine refuses frames after a GOAWAY
    frames = _read_frames(c.sock, timeout=20)
    c.close()
    kinds = [(type(f).__name__, getattr(f, "stream_id", 0), sorted(f.flags)) for f in frames]
    goaways = [i for i, f in enumerate(frames) if isinstance(f, GoAwayFrame)]
    assert goaways, kinds
    first = frames[goaways[0]]
    assert first.error_code == 0 and first.last_stream_id >= sid, kinds
    # the stream in flight was answered in full after the GOAWAY
    after = frames[goaways[0]:]
    assert any(isinstance(f, HeadersFrame) and f.stream_id == sid for f in after), kinds
    assert any(f.stream_id == sid and "END_STREAM" in f.flags for f in after), kinds


def _raw_connection(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(PREFACE + SettingsFrame(0).serialize())
    return s


def _read_frames(s: socket.socket, timeout: float = 10.0) -> list[Frame]:
    """Frames until the server closes the connection (or the timeout)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        frames.append(frame)
        data = data[9 + length:]
    return frames


def _goaway_code(frames: list[Frame]) -> int | None:
    codes = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    return codes[-1] if codes else None


def _bounded(pid: int, before: tuple[float, float], mib: float, cpu: float) -> None:
    """The worker grew by less than ``mib`` and spent less than ``cpu`` seconds on the
    attack (generous bounds: an unbounded attack costs many times more)."""
    rss, seconds = process_usage(pid)
    assert rss - before[0] < mib, f"RSS grew {rss - before[0]:.1f} MiB"
    assert seconds - before[1] < cpu, f"{seconds - before[1]:.2f} s of CPU"


def _wait_cpu_idle(pid: int, timeout: float = 30.0) -> None:
    """Wait until ``pid`` used (almost) no CPU over a whole half second: it has done
    what the test's input makes it do (a barrier that holds on a busy machine, where
    a fixed sleep may end before the work does)."""
    last = process_usage(pid)[1]

    def idle() -> bool:
        nonlocal last
        time.sleep(0.5)
        now = process_usage(pid)[1]
        quiet, last = now - last < 0.02, now
        return quiet
    wait_for(idle, timeout, interval=0, what=f"process {pid} idle")


def _worker_alive(m) -> bool:
    c = RawH2(m.ports["outbound"])
    sid = c.request("/hello")
    c.pump(lambda: c.ended(sid))
    ok = c.response(sid)[0].get(b":status") == b"200"
    c.close()
    return ok


def test_rapid_reset_ends_in_goaway_enhance_your_calm(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1, extra="[limits]\nh2_max_resets = 100\n")
    pids = m.worker_pids()
    before = process_usage(pids[0])
    c = RawH2(m.ports["outbound"])
    try:
        for _ in range(3000):
            sid = c.request("/slow?ms=1000")
            c.conn.reset_stream(sid)
        c.flush()
    except OSError:
        pass  # closed on us midway: the point
    c.pump(lambda: c.goaway() is not None or c.closed, timeout=10)
    goaway = c.goaway()
    assert goaway is not None and goaway.error_code == 0xb, c.events[-3:]  # ENHANCE_YOUR_CALM
    c.close()
    assert _worker_alive(m) and m.worker_pids() == pids
    _bounded(pids[0], before, mib=32, cpu=3.0)


def test_continuation_flood_is_bounded(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    pids = m.worker_pids()
    before = process_usage(pids[0])
    s = _raw_connection(m.ports["outbound"])
    enc = hpack.Encoder()
    block = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                        (b":authority", b"web")])
    h = HeadersFrame(1)
    h.data = block
    out = [h.serialize()]
    filler = ContinuationFrame(1)
    filler.data = b"\x00" * 16000  # never END_HEADERS
    out += [filler.serialize()] * 2000  # 32 MB of header block, never ending
    try:
        s.sendall(b"".join(out))
    except OSError:
        pass  # the server may close while we still write: that is the point
    frames = _read_frames(s)
    s.close()
    assert _goaway_code(frames) not in (None, 0), frames
    assert _worker_alive(m) and m.worker_pids() == pids
    _bounded(pids[0], before, mib=16, cpu=3.0)


def test_hpack_bomb_is_bounded(mesh, backends):
    """One large header stored in the dynamic table, then referenced thousands of times:
    the decoded list would be hundreds of MB; meshd stops at header_bytes."""
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    pids = m.worker_pids()
    before = process_usage(pids[0])
    s = _raw_connection(m.ports["outbound"])
    enc = hpack.Encoder()
    first = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                        (b":authority", b"web"), (b"x-bomb", b"b" * 4000)])
    index = enc.encode([(b"x-bomb", b"b" * 4000)])  # now a one-byte table reference
    assert len(index) <= 2
    h = HeadersFrame(1)
    h.data = first + index * 5000
    h.flags.add("END_HEADERS")
    h.flags.add("END_STREAM")
    s.sendall(h.serialize())
    frames = _read_frames(s)
    s.close()
    assert _goaway_code(frames) not in (None, 0), frames
    assert _worker_alive(m) and m.worker_pids() == pids
    _bounded(pids[0], before, mib=16, cpu=3.0)  # decoded in full: 20 MB of headers


def test_concurrent_streams_beyond_the_setting_are_refused(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1, extra="[limits]\nh2_max_concurrent_streams = 5\n")
    c = RawH2(m.ports["outbound"])
    c.pump(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in c.events), timeout=5)
    sids = [c.request("/slow?ms=800") for _ in range(5)]
    # bypass the client's own limit check: a sixth HEADERS frame written by hand
    extra = HeadersFrame(sids[-1] + 2)
    extra.data = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/"),
                                         (b":scheme", b"http"), (b":authority", b"web")])
    extra.flags.add("END_HEADERS")
    extra.flags.add("END_STREAM")
    c.sock.sendall(extra.serialize())
    frames = _read_frames(c.sock, timeout=3)
    c.close()
    # the sixth is refused (RST_STREAM REFUSED_STREAM or PROTOCOL_ERROR) or the connection
    # is closed with an error; the first five are answered
    assert any(getattr(f, "stream_id", 0) == sids[-1] + 2 and f.type == 0x3 for f in frames) \
        or _goaway_code(frames) not in (None, 0), frames
    wait_for(lambda: _worker_alive(m), timeout=5)


def _resetting_h2_upstream(code: int) -> TcpServer:
    """An HTTP/2 upstream (prior knowledge) that answers each request with a head and a
    piece of body, then resets the stream with ``code``."""

    def serve(sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None))
        conn.initiate_connection()
        with sock:
            try:
                sock.sendall(conn.data_to_send())
                while data := sock.recv(65536):
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            conn.send_headers(event.stream_id, [(b":status", b"200")])
                            conn.send_data(event.stream_id, b"partial")
                            sock.sendall(conn.data_to_send())
                            time.sleep(0.3)  # the head and body reach the client first
                            conn.reset_stream(event.stream_id, code)
                    sock.sendall(conn.data_to_send())
            except OSError:
                return
    return TcpServer(serve)


def test_upstream_reset_reaches_the_client_with_its_own_code(mesh):
    """RST_STREAM from an HTTP/2 upstream after the response began is passed on with the
    upstream's code (CANCEL reaches a gRPC client as CANCELLED), not INTERNAL_ERROR."""
    for code in (h2.errors.ErrorCodes.CANCEL, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM):
        with _resetting_h2_upstream(code) as srv:
            m = mesh.run({"web": [srv.address]}, workers=1,
                         extra='[service.web]\nprotocol = "h2"\n')
            c = RawH2(m.ports["outbound"])
            sid = c.request("/")
            c.pump(lambda c=c, sid=sid: c.ended(sid))
            resets = [e for e in c.events if isinstance(e, h2.events.StreamReset)]
            assert [(e.stream_id, e.error_code) for e in resets] == [(sid, code)], c.events
            assert c.response(sid)[:2] == ({b":status": b"200"}, b"partial")
            c.close()
            m.stop()


def test_output_to_a_client_that_does_not_read_is_bounded(mesh, backends):
    """A client that opens huge flow-control windows and then stops reading its socket:
    meshd queues at most OUT_LIMIT (256 KiB) beyond what the kernel buffers hold, not
    the 50 MB the windows allow, and other connections are served meanwhile."""
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    [worker] = m.worker_pids()
    # The baseline after one whole large response over HTTP/2: h2 imported, the upstream
    # connection and buffers of the relay allocated (none of that is the client's doing).
    warm = RawH2(m.ports["outbound"], window=2**31 - 1)
    sid = warm.request("/bytes?n=2000000")
    warm.pump(lambda: warm.ended(sid), timeout=30)
    warm.close()
    before = process_usage(worker)
    greedy = RawH2(m.ports["outbound"], window=2**31 - 1)
    greedy.conn.increment_flow_control_window(2**31 - 1 - 65535)
    greedy.flush()
    greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    for i in range(2):
        greedy.request(f"/bytes?n=25000000&i={i}")
    # meshd writes until the socket is full, then holds the streams: its CPU time stands
    # still (without the bound it would stand still only after queueing all 50 MB)
    _wait_cpu_idle(worker)
    assert _worker_alive(m)
    _bounded(worker, before, mib=16, cpu=5)  # without the bound: +44 MiB, with it: +1-3
    # reading again resumes the responses where they stopped
    greedy.pump(lambda: sum(len(e.data) for e in greedy.events
                            if isinstance(e, h2.events.DataReceived)) > 2_000_000, timeout=20)
    assert not greedy.closed and greedy.goaway() is None
    greedy.close()
    assert _worker_alive(m)
