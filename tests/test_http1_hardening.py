"""HTTP/1.1 hardening through a real meshd: smuggling-shaped requests, size and time
limits, keep-alive and pipelining, max_connections and running out of file descriptors.

Malformed input goes over raw sockets. The upstream of service ``web`` is a recording
TCP server that never answers and keeps every byte it receives, so "the upstream never
sees the request" is checked on the wire, not inferred from the client's answer.
"""

from __future__ import annotations

import fcntl
import re
import resource
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import MeshFactory

from meshd.testing.harness import Backend, Meshd, http_get, process_usage, read_head, wait_for
from meshd.testing.tcp_server import TcpServer

SHARED_LIMITS = """
[limits]
header_read_timeout = "1s"
client_idle_timeout = "1s"
request_line_bytes = 512
header_bytes = 4096
header_count = 16
"""


class Recorder:
    """A TCP server that accepts, never answers, and records each connection's bytes."""

    def __init__(self) -> None:
        self.connections: list[bytearray] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.open: set[socket.socket] = set()
        self.server = TcpServer(self._read)
        self.address = self.server.address

    def _read(self, conn: socket.socket) -> None:
        record = bytearray()
        with self._lock:
            self.connections.append(record)
            self.open.add(conn)
        conn.setblocking(False)
        try:
            with conn:
                while not self._stop.is_set():
                    if not select.select([conn], [], [], 0.1)[0]:
                        continue
                    with self._lock:  # read and recorded in one step: see drained
                        try:
                            data = conn.recv(65536)
                        except BlockingIOError:
                            continue
                        except OSError:
                            return
                        record += data
                    if not data:
                        return
        finally:
            with self._lock:
                self.open.discard(conn)

    def drained(self) -> bool:
        """No byte sent to the recorder is left unread."""
        with self._lock:
            return all(_unread(c) == 0 for c in self.open)

    def received(self) -> bytes:
        with self._lock:
            return b"".join(bytes(r) for r in self.connections)

    def clear(self) -> None:
        with self._lock:
            self.connections.clear()

    def stop(self) -> None:
        self._stop.set()
        self.server.close(wait=2)


def _unread(sock: socket.socket) -> int:
    fd = sock.fileno()  # -1 once `with conn` closed it, before the reader's finally drops it
    if fd < 0:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0  # closed meanwhile


def nothing_more_upstream(m: Meshd, recorder: Recorder) -> None:
    """The barrier before asserting what the recorder did not get: meshd is done with
    every client connection (the test closed its own) and the recorder read all it was
    sent."""
    m.wait_idle("outbound")
    wait_for(recorder.drained, what="the recorder read everything sent to it")


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def real() -> Iterator[Backend]:
    b = Backend("a").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def other() -> Iterator[Backend]:
    b = Backend("b").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, recorder: Recorder,
           real: Backend, other: Backend) -> Iterator[Meshd]:
    """One meshd (one worker, small limits) for every test that does not reconfigure it:
    ``web`` is the recorder, ``real`` and ``other`` test backends "a" and "b"."""
    factory = MeshFactory(tmp_path_factory.mktemp("hardening"))
    services = {"web": [recorder.address], "real": [real.address], "other": [other.address]}
    text, ports = factory.config(services, workers=1, extra=SHARED_LIMITS)
    m = factory.start(text, ports)
    yield m
    m.stop()


@pytest.fixture
def web(shared: Meshd, recorder: Recorder) -> Iterator[Meshd]:
    """The shared meshd with a clean recording, checked for leftovers afterwards."""
    recorder.clear()
    before = shared.log().count("Traceback")
    yield shared
    assert shared.log().count("Traceback") == before, shared.log()[-3000:]


def port(m: Meshd) -> int:
    return int(m.ports["outbound"])  # type: ignore[attr-defined]


def read_until_closed(s: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything the server sends until it closes: (bytes, "eof" | "reset" | "timeout")."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, "timeout"
        s.settimeout(remaining)
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            return data, "timeout"
        except ConnectionResetError:
            return data, "reset"
        if not chunk:
            return data, "eof"
        data += chunk


def exchange(m: Meshd, *pieces: bytes, pause: float = 0.0) -> tuple[bytes, str]:
    """Send ``pieces`` (``pause`` apart) on a new connection; what comes back until close."""
    with socket.create_connection(("127.0.0.1", port(m)), timeout=5) as s:
        for i, piece in enumerate(pieces):
            if i and pause:
                time.sleep(pause)
            try:
                s.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # meshd already answered and closed: read what it said
        return read_until_closed(s)


def statuses(data: bytes) -> list[int]:
    """The status of every response in ``data`` (a body may end without a newline)."""
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n"


def head(*fields: bytes, line: bytes = b"POST /x HTTP/1.1") -> bytes:
    return b"\r\n".join([line, *fields, b"", b""])


@pytest.mark.parametrize(("raw", "status"), [
    pytest.param(head(b"Host: web", b"Content-Length: 5", b"Transfer-Encoding: chunked")
                 + b"0\r\n\r\n" + SMUGGLED, 400, id="cl-and-te"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding: chunked", b"Content-Length: 5")
                 + b"0\r\n\r\n" + SMUGGLED, 400, id="te-and-cl"),
    pytest.param(head(b"Host: web", b"Content-Length: 5", b"Content-Length: 5") + b"hello",
                 400, id="two-cl-equal"),
    pytest.param(head(b"Host: web", b"Content-Length: 5", b"Content-Length: 41") + b"hello"
                 + SMUGGLED, 400, id="two-cl-different"),
    pytest.param(head(b"Host: web", b"Content-Length: 5, 5") + b"hello", 400, id="cl-list"),
    pytest.param(head(b"Host: web", b"Content-Length: +5") + b"hello", 400, id="cl-sign"),
    pytest.param(head(b"Host: web", b"Content-Length: 0x5") + b"hello", 400, id="cl-hex"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n",
                 400, id="te-chunked-twice"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
                 + b"0\r\n\r\n", 400, id="te-two-fields"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding: chunked, gzip") + b"0\r\n\r\n",
                 400, id="te-chunked-not-last"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding: xchunked") + b"0\r\n\r\n",
                 501, id="te-xchunked"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding: chunked;q=1") + b"0\r\n\r\n",
                 400, id="te-chunked-params"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding: chunked", line=b"POST /x HTTP/1.0")
                 + b"0\r\n\r\n" + SMUGGLED, 400, id="te-on-http10"),
    pytest.param(head(b"Host: web", b"X-Folded: a", b" b"), 400, id="obs-fold"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding:", b" chunked") + b"0\r\n\r\n",
                 400, id="obs-fold-te"),
    pytest.param(head(b"Host: web", b"X-Cr: a\rb"), 400, id="bare-cr-in-value"),
    pytest.param(head(b"Host: web", b"X-Lf: a\nb"), 400, id="bare-lf-in-value"),
    pytest.param(head(b"Host: web", b"X-Nul: a\x00b"), 400, id="nul-in-value"),
    pytest.param(head(b"Host: web", b"X-N\x00ul: a"), 400, id="nul-in-name"),
    pytest.param(head(b"Host: web", b"Content-Length : 5") + b"hello", 400,
                 id="space-before-colon"),
    pytest.param(head(b"Host: web", b"Transfer-Encoding\t: chunked") + b"0\r\n\r\n", 400,
                 id="tab-before-colon"),
    pytest.param(head(b"X-No-Host: 1"), 400, id="missing-host"),
    pytest.param(head(b"Host: web", b"Host: other"), 400, id="two-hosts"),
    pytest.param(head(b"Host: web", b"Host: web"), 400, id="two-equal-hosts"),
    pytest.param(head(b"Host: web", line=b"GET /x HTTP/1.2"), 400, id="http-1.2"),
    pytest.param(head(b"Host: web", line=b"GET /x y HTTP/1.1"), 400, id="space-in-target"),
])
def test_ambiguous_request_is_refused_and_never_forwarded(web: Meshd, recorder: Recorder,
                                                         raw: bytes, status: int) -> None:
    data, how = exchange(web, raw)
    assert statuses(data) == [status], data
    assert how == "eof"
    assert b"meshd-error: " in data
    nothing_more_upstream(web, recorder)
    assert recorder.received() == b""


@pytest.mark.parametrize("size", [b"zz", b"-1", b"0x10", b"5 ", b" 5", b"",
                                  b"10000000000000000", b"8000000000000000"])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "later-write"])
def test_invalid_chunk_size(web: Meshd, recorder: Recorder, size: bytes, split: bool) -> None:
    """The head is valid, so meshd may already have sent it (and the chunks before the bad
    one) upstream when the bad size arrives. What must hold: the client gets 400 and a
    closed connection, and the upstream never gets a complete body: no last chunk, and
    nothing after the bad size (the smuggled request) in any framing."""
    first = head(b"Host: web", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n"
    rest = size + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    data, how = exchange(web, first, rest, pause=0.3) if split else exchange(web, first + rest)
    assert statuses(data) == [400], data
    assert how == "eof"
    nothing_more_upstream(web, recorder)
    seen = recorder.received()
    if split:  # the head and the good chunk went ahead of the bad size
        assert seen.startswith(b"POST /x HTTP/1.1\r\n") and seen.endswith(b"5\r\nhello\r\n"), seen
    assert b"0\r\n\r\n" not in seen and b"smuggled" not in seen, seen


def send_and_record(m: Meshd, recorder: Recorder, raw: bytes,
                    done: Callable[[bytes], bool]) -> bytes:
    """Send ``raw`` (to the silent recorder), wait until what it received is ``done``
    (and a little more, for anything extra), then hang up."""
    with socket.create_connection(("127.0.0.1", port(m)), timeout=5) as s:
        s.sendall(raw)
        wait_for(lambda: done(recorder.received()), 3, what="the request at the recorder")
        time.sleep(0.1)
    return recorder.received()


def test_upstream_sees_only_meshds_framing(web: Meshd, recorder: Recorder) -> None:
    """What goes upstream is re-framed from what was parsed: a normalized Content-Length,
    chunk sizes and extensions re-encoded, Connection-listed fields removed."""
    seen = send_and_record(web, recorder, head(
        b"Host: web", b"Content-Length: 005", b"Connection: x-hop", b"X-Hop: 1",
        b"Keep-Alive: 5") + b"hello", done=lambda b: b.endswith(b"hello"))
    assert seen == b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
    recorder.clear()
    seen = send_and_record(web, recorder, head(b"Host: web", b"Transfer-Encoding: Chunked")
                           + b"0005;name=value\r\nhello\r\n0\r\n\r\n", done=lambda b: b.endswith(b"\r\n0\r\n\r\n"))
    assert seen == (b"POST /x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n")


def test_framing_fields_in_trailers_are_not_forwarded(web: Meshd, recorder: Recorder) -> None:
    seen = send_and_record(web, recorder, head(b"Host: web", b"Transfer-Encoding: chunked")
                           + b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\nContent-Length: 50\r\n"
                           b"Transfer-Encoding: gzip\r\nHost: evil\r\n\r\n",
                           done=lambda b: b"hello\r\n0\r\n" in b and b.endswith(b"\r\n\r\n"))
    trailers = seen.partition(b"5\r\nhello\r\n")[2].lower()
    assert trailers.startswith(b"0\r\n") and trailers.endswith(b"\r\n\r\n")
    assert b"content-length" not in trailers and b"transfer-encoding" not in trailers
    assert b"host" not in trailers


def test_absolute_form_target_wins_over_host(web: Meshd) -> None:
    data, how = exchange(web, head(b"Host: real", b"Connection: close",
                                   line=b"GET http://other/abs HTTP/1.1"))
    assert statuses(data) in ([200], [400]), data
    assert b"x-backend: a" not in data.lower()  # never the service Host names


def test_request_line_over_limit_is_414(web: Meshd, recorder: Recorder) -> None:
    data, how = exchange(web, head(b"Host: web", line=b"GET /" + b"a" * 600 + b" HTTP/1.1"))
    assert statuses(data) == [414] and how == "eof"
    nothing_more_upstream(web, recorder)
    assert recorder.received() == b""


def test_request_line_over_header_bytes_is_414(web: Meshd) -> None:
    data, _ = exchange(web, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: web\r\n\r\n")
    assert statuses(data) == [414]


def test_header_bytes_over_limit_is_431(web: Meshd, recorder: Recorder) -> None:
    data, how = exchange(web, head(b"Host: web", b"X-Big: " + b"b" * 5000))
    assert statuses(data) == [431] and how == "eof"
    # Without the end of the head: refused once header_bytes are in, not at the timeout.
    # (At the timeout the answer would be 408: 431 says it was the size, with no time
    # bound that a busy machine breaks.)
    data, how = exchange(web, b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: " + b"b" * 5000)
    assert statuses(data) == [431] and how == "eof"
    nothing_more_upstream(web, recorder)
    assert recorder.received() == b""


def test_header_count_over_limit_is_431(web: Meshd, recorder: Recorder) -> None:
    fields = [b"Host: web", *[b"X-%d: v" % i for i in range(16)]]
    data, how = exchange(web, head(*fields))
    assert statuses(data) == [431] and how == "eof"
    ok, _ = exchange(web, head(*fields[:15], b"Connection: close", line=b"GET /ok HTTP/1.1")
                     .replace(b"Host: web", b"Host: real"))
    assert statuses(ok) == [200]  # exactly header_count fields pass
    nothing_more_upstream(web, recorder)
    assert recorder.received() == b""


def test_slowloris_gets_408_and_close(web: Meshd, recorder: Recorder) -> None:
    """A head sent a byte every 150 ms never completes within header_read_timeout (1 s)."""
    request = head(b"Host: web", b"X-Slow: " + b"s" * 40, line=b"GET /slow HTTP/1.1")
    with socket.create_connection(("127.0.0.1", port(web)), timeout=5) as s:
        started = time.monotonic()
        for byte in request:
            s.sendall(bytes([byte]))
            if select.select([s], [], [], 0.15)[0] or time.monotonic() - started > 4:
                break
        data, how = read_until_closed(s, timeout=5)
        elapsed = time.monotonic() - started
    assert statuses(data) == [408], data
    assert how == "eof"
    assert 0.9 < elapsed < 2.9  # header_read_timeout (1 s); the upper bound: not never
    nothing_more_upstream(web, recorder)
    assert recorder.received() == b""


def test_idle_keep_alive_connection_is_closed(web: Meshd) -> None:
    with socket.create_connection(("127.0.0.1", port(web)), timeout=5) as s:
        s.sendall(head(b"Host: real", line=b"GET /one HTTP/1.1"))
        data = read_head(s, b"a /one\n")
        assert data.endswith(b"a /one\n"), data
        assert statuses(data) == [200] and b"connection: close" not in data.lower()
        idle_from = time.monotonic()
        rest, how = read_until_closed(s, timeout=6)
        idle = time.monotonic() - idle_from
    assert rest == b"" and how == "eof"  # closed without a word
    assert 0.8 < idle < 3.5  # client_idle_timeout (1 s); the upper bound: not never


def test_pipelined_requests_are_answered_in_order(web: Meshd) -> None:
    body = b"ping"
    pipeline = (head(b"Host: real", line=b"GET /p1 HTTP/1.1")
                + head(b"Host: real", b"Content-Length: 4", line=b"POST /echo HTTP/1.1") + body
                + head(b"Host: real", b"Transfer-Encoding: chunked", line=b"POST /echo HTTP/1.1")
                + b"3\r\npon\r\n1\r\ng\r\n0\r\n\r\n"
                + head(b"Host: real", line=b"GET /p4 HTTP/1.1")
                + head(b"Host: real", b"Connection: close", line=b"GET /p5 HTTP/1.1"))
    data, how = exchange(web, pipeline)
    assert statuses(data) == [200] * 5 and how == "eof"
    order = [data.index(marker) for marker in (b"a /p1\n", b"ping", b"pong", b"a /p4\n", b"a /p5\n")]
    assert order == sorted(order)


def test_connection_close_gets_response_and_close(web: Meshd) -> None:
    data, how = exchange(web, head(b"Host: real", b"Connection: close", line=b"GET /c HTTP/1.1"))
    assert statuses(data) == [200] and how == "eof"
    assert b"\r\nconnection: close\r\n" in data.lower() and data.endswith(b"a /c\n")


def test_http10_without_keep_alive_gets_close(web: Meshd) -> None:
    data, how = exchange(web, head(b"Host: real", line=b"GET /ten HTTP/1.0"))
    assert statuses(data) == [200] and how == "eof" and data.endswith(b"a /ten\n")
    assert b"\r\nconnection: close\r\n" in data.lower()
    # With keep-alive asked for, it stays open for a second request.
    with socket.create_connection(("127.0.0.1", port(web)), timeout=5) as s:
        for path in (b"/k1", b"/k2"):
            s.sendall(head(b"Host: real", b"Connection: keep-alive",
                           line=b"GET %s HTTP/1.0" % path))
            got = b""
            while not got.endswith(b"a %s\n" % path):
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            assert b"\r\nconnection: keep-alive\r\n" in got.lower()


# -- max_connections and file descriptors ---------------------------------------------


def _metric(m: Meshd, name: str) -> float:
    status, _, body = http_get("127.0.0.1", int(m.ports["admin"]), "/metrics")  # type: ignore[attr-defined]
    assert status == 200
    found = re.search(rb"^%s (\S+)$" % name.encode(), body, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


def _answered(s: socket.socket, wait: float) -> bool:
    return bool(select.select([s], [], [], wait)[0])


def _read_response(s: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    while not data.endswith(marker):
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_max_connections_queues_the_rest(mesh: MeshFactory, real: Backend) -> None:
    """With max_connections = 4 and one worker, connections 5..8 wait in the kernel's
    accept queue (not refused, not reset) and are served as soon as others close."""
    text, ports = mesh.config({"real": [real.address]}, workers=1)
    text = text.replace('protocol = "http"\n', 'protocol = "http"\nmax_connections = 4\n', 1)
    mesh.start(text, ports)
    socks = [socket.create_connection(("127.0.0.1", ports["outbound"]), timeout=5)
             for _ in range(8)]
    try:
        for i, s in enumerate(socks):
            s.sendall(head(b"Host: real", line=b"GET /c%d HTTP/1.1" % i))
        wait_for(lambda: sum(_answered(s, 0) for s in socks) >= 4, 5, what="4 answers")
        time.sleep(0.3)
        served = [s for s in socks if _answered(s, 0)]
        waiting = [s for s in socks if s not in served]
        assert len(served) == 4
        for s in served:
            assert statuses(_read_response(s, b"\n")) == [200]
        # The admin port answers meanwhile.
        assert http_get("127.0.0.1", ports["admin"], "/ready")[0] == 200
        for s in served:
            s.close()
        for s in waiting:
            i = socks.index(s)
            assert statuses(_read_response(s, b"a /c%d\n" % i)) == [200]
    finally:
        for s in socks:
            s.close()


EMFILE_LIMIT = 96  # the worker starts with ~10 descriptors and runs out near 90 connections


def _start_starved(mesh: MeshFactory, real: Backend) -> tuple[Meshd, list[socket.socket]]:
    """A one-worker meshd with RLIMIT_NOFILE = EMFILE_LIMIT, and 200 connections open to
    it, once its worker has logged a failed accept."""
    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (EMFILE_LIMIT, EMFILE_LIMIT))

    text, ports = mesh.config({"real": [real.address]}, workers=1)
    m = mesh.start(text, ports, preexec_fn=low_nofile)
    socks: list[socket.socket] = []
    try:
        for _ in range(200):
            socks.append(socket.create_connection(("127.0.0.1", ports["outbound"]), timeout=5))
        wait_for(lambda: "accept failed" in m.log(), 5, what="EMFILE in the worker's log")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return m, socks


def test_emfile_does_not_kill_the_worker(mesh: MeshFactory, real: Backend) -> None:
    """With RLIMIT_NOFILE low enough that the worker runs out of descriptors under 200
    connections, accept() fails with EMFILE: the worker backs off, stays alive (same
    pid, no restart) and serves again once connections close."""
    m, socks = _start_starved(mesh, real)
    try:
        (worker,) = m.worker_pids()
        # some rounds of accept errors and back-off: the worker's heartbeat (every 1 s)
        # moves on twice meanwhile
        first = next(s.heartbeat for s in m.slots() if s.pid == worker)
        wait_for(lambda: any(s.pid == worker and s.heartbeat >= first + 1.5 for s in m.slots()),
                 10, what="two more heartbeats of the starved worker")
        assert m.worker_pids() == [worker]
        assert _metric(m, "meshd_worker_restarts_total") == 0
    finally:
        for s in socks:
            s.close()
    assert _request_ok(m)
    assert m.worker_pids() == [worker]
    assert _metric(m, "meshd_worker_restarts_total") == 0


def test_request_while_out_of_descriptors_gets_an_answer(mesh: MeshFactory,
                                                         real: Backend) -> None:
    m, socks = _start_starved(mesh, real)
    try:
        # The first connection was accepted; proxying needs one more descriptor upstream.
        socks[0].sendall(head(b"Host: real", line=b"GET /starved HTTP/1.1"))
        data, _ = read_until_closed(socks[0], timeout=3)
    finally:
        for s in socks:
            s.close()
    assert statuses(data) in ([502], [503]), data
    assert "Traceback" not in m.log()


def _request_ok(m: Meshd) -> bool:
    def ok() -> bool:
        try:
            return http_get("127.0.0.1", port(m), "/", {"Host": "real"}, timeout=2)[0] == 200
        except OSError:
            return False
    return bool(wait_for(ok, 10, what="a request served after EMFILE"))



def test_many_slowloris_connections_are_bounded(web: Meshd, recorder: Recorder) -> None:
    """200 connections trickling a head byte by byte: each is answered 408 and closed at
    header_read_timeout, and the worker's memory and CPU stay small meanwhile."""
    (pid,) = web.worker_pids()

    before = process_usage(pid)
    request = head(b"Host: web", b"X-Slow: " + b"s" * 40, line=b"GET /slow HTTP/1.1")
    socks = [socket.create_connection(("127.0.0.1", port(web)), timeout=5) for _ in range(200)]
    answered: dict[int, bytes] = {}
    try:
        started = time.monotonic()
        for byte in request:
            for i, s in enumerate(socks):
                if i in answered:
                    continue
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    answered[i] = b""
            readable, _, _ = select.select([s for i, s in enumerate(socks) if i not in answered],
                                           [], [], 0.15)
            for s in readable:
                answered[socks.index(s)] = read_until_closed(s, timeout=2)[0]
            if len(answered) == len(socks) or time.monotonic() - started > 5:
                break
        for i, s in enumerate(socks):
            if i not in answered:
                answered[i] = read_until_closed(s, timeout=3)[0]
    finally:
        for s in socks:
            s.close()
    assert all(statuses(data) == [408] for data in answered.values() if data), \
        {i: d[:40] for i, d in answered.items() if statuses(d) != [408]}
    # the rest were closed while the test still wrote (a reset loses the 408), never served
    assert sum(1 for d in answered.values() if d) >= 150, len([d for d in answered.values() if d])
    rss, cpu = process_usage(pid)
    assert rss - before[0] < 48, f"RSS grew {rss - before[0]:.1f} MiB"
    assert cpu - before[1] < 4.0, f"{cpu - before[1]:.2f} s of CPU"
    nothing_more_upstream(web, recorder)
    assert recorder.received() == b""
