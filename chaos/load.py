"""The load generator: client threads on blocking sockets (this process is not
monkey-patched), each holding one connection to meshd and recording every request.

Kinds: ``h1_get`` and ``h1_post`` (HTTP/1.1 keep-alive, a request id in ``x-request-id``;
POST bodies carry it too), ``h2_get`` (HTTP/2 with prior knowledge through the h2
library, one stream at a time per connection), ``tcp`` (opaque bytes through a tcp
listener to an echo server, each message checked) and ``ws`` (a WebSocket through the
HTTP listener, Host ``ws``: an Upgrade meshd tunnels to a WebSocket echo server, each
message checked; a new connection every 50 messages, as ``tcp``).

What a client does on its own, as ordinary clients do, and what it counts instead of a
failure: a reply with ``Connection: close`` or an HTTP/2 GOAWAY ends the connection and
the next request opens another; a GET that finds its kept-alive connection closed before
a single byte of answer came back is sent once more on a new connection (urllib3 and
browsers do the same: the server closed it idle) -- counted as ``stale_retries``; an
HTTP/2 stream the server refused (beyond a GOAWAY's last stream id, or REFUSED_STREAM)
is sent again whatever its method (RFC 9113 section 8.7) -- ``refused_retries``. A POST
is never sent twice.

Every connection gets an id; ``Conn`` keeps the client's local port, so the mapper in
``chaos.procs`` can tell which meshd worker accepted it.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events

TIMEOUT = 10.0           # per request: a stopped worker's client gives up after this
STALE_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                ConnectionAbortedError)


@dataclass
class Conn:
    id: int
    kind: str
    local_port: int
    opened: float
    closed: float = 0.0
    worker: int = 0          # pid of the meshd worker that accepted it (0: not known)


@dataclass
class Record:
    t: float                 # monotonic start
    kind: str
    conn: int
    ok: bool
    latency: float
    status: int = 0
    error: str = ""          # exception, or the meshd-error header
    backend: str = ""        # x-backend of the answer
    rid: str = ""


@dataclass
class Stats:
    stale_retries: int = 0
    refused_retries: int = 0
    reconnects: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Load:
    """Starts the clients; ``stop()`` ends them (each within one request's timeout)."""

    def __init__(self, host: str, http_port: int, tcp_port: int | None, *, n_get: int = 6,
                 n_post: int = 2, n_h2: int = 2, n_tcp: int = 2, pace: float = 0.01,
                 churn: int = 0, authority: str = "web", max_seconds: float = 3600.0,
                 keep_records: bool = True, n_ws: int = 0) -> None:
        self.host, self.http_port, self.tcp_port = host, http_port, tcp_port
        self.plan = [("h1_get", n_get), ("h1_post", n_post), ("h2_get", n_h2),
                     ("tcp", n_tcp if tcp_port else 0), ("ws", n_ws)]
        self.pace, self.churn, self.authority = pace, churn, authority
        self.max_seconds = max_seconds
        self.keep_records = keep_records
        self.records: list[Record] = []
        self.conns: dict[int, Conn] = {}
        self.stats = Stats()
        self.sent = 0
        self.failed = 0
        self._ids = itertools.count(1)
        self._rids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- bookkeeping ---------------------------------------------------------------------

    def _open(self, kind: str, sock: socket.socket) -> Conn:
        c = Conn(next(self._ids), kind, sock.getsockname()[1], time.monotonic())
        with self._lock:
            self.conns[c.id] = c
            self.stats.reconnects += 1
        return c

    def _close(self, c: Conn | None) -> None:
        if c is not None and not c.closed:
            c.closed = time.monotonic()

    def _record(self, r: Record) -> None:
        with self._lock:
            self.sent += 1
            self.failed += not r.ok
            if self.keep_records or not r.ok:
                self.records.append(r)

    def open_conns(self) -> list[Conn]:
        with self._lock:
            return [c for c in self.conns.values() if not c.closed and not c.worker]

    # -- life ----------------------------------------------------------------------------

    def start(self) -> Load:
        targets = {"h1_get": self._h1, "h1_post": self._h1, "h2_get": self._h2,
                   "tcp": self._tcp, "ws": self._ws}
        for kind, n in self.plan:
            for i in range(n):
                t = threading.Thread(target=targets[kind], args=(kind,), daemon=True,
                                     name=f"load-{kind}-{i}")
                t.start()
                self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(TIMEOUT + 5)

    def _running(self, deadline: float) -> bool:
        return not self._stop.is_set() and time.monotonic() < deadline

    def _pause(self) -> None:
        if self.pace:
            self._stop.wait(self.pace)

    # -- HTTP/1.1 ------------------------------------------------------------------------

    def _h1(self, kind: str) -> None:
        deadline = time.monotonic() + self.max_seconds
        post = kind == "h1_post"
        conn: http.client.HTTPConnection | None = None
        c: Conn | None = None
        used = 0
        while self._running(deadline):
            rid = f"{kind[3]}{next(self._rids)}"
            for attempt in (0, 1):
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.http_port, timeout=TIMEOUT)
                    try:
                        conn.connect()
                    except OSError as e:
                        self._record(Record(time.monotonic(), kind, 0, False, 0.0,
                                            error=f"connect: {e}", rid=rid))
                        conn = None
                        self._stop.wait(0.05)
                        break
                    assert conn.sock is not None
                    c, used = self._open(kind, conn.sock), 0
                assert c is not None
                started = time.monotonic()
                reused = used > 0
                try:
                    headers = {"Host": self.authority, "x-request-id": rid}
                    if post:
                        conn.request("POST", f"/post/{rid}", body=rid.encode(), headers=headers)
                    else:
                        conn.request("GET", f"/get/{rid}", headers=headers)
                    resp = conn.getresponse()
                    body = resp.read()
                except Exception as e:
                    conn.close()
                    conn = None
                    self._close(c)
                    if not post and reused and attempt == 0 and isinstance(e, STALE_ERRORS):
                        with self._lock:
                            self.stats.stale_retries += 1
                        continue  # nothing came back on a kept-alive connection: once more
                    self._record(Record(started, kind, c.id, False, time.monotonic() - started,
                                        error=f"{type(e).__name__}: {e}"[:200], rid=rid))
                    break
                used += 1
                ok = resp.status == 200 and (not post or body == rid.encode())
                self._record(Record(started, kind, c.id, ok, time.monotonic() - started,
                                    resp.status, resp.getheader("meshd-error") or "",
                                    resp.getheader("x-backend") or "", rid))
                if resp.will_close or (self.churn and used >= self.churn):
                    conn.close()
                    conn = None
                    self._close(c)
                break
            self._pause()
        if conn is not None:
            conn.close()
            self._close(c)

    # -- HTTP/2 --------------------------------------------------------------------------

    def _h2(self, kind: str) -> None:
        deadline = time.monotonic() + self.max_seconds
        client: _H2 | None = None
        c: Conn | None = None
        while self._running(deadline):
            rid = f"h{next(self._rids)}"
            for attempt in range(3):
                if client is None:
                    try:
                        client = _H2(self.host, self.http_port)
                    except OSError as e:
                        self._record(Record(time.monotonic(), kind, 0, False, 0.0,
                                            error=f"connect: {e}", rid=rid))
                        self._stop.wait(0.05)
                        break
                    c = self._open(kind, client.sock)
                assert c is not None
                started = time.monotonic()
                try:
                    status, headers, _ = client.get(f"/get/{rid}", self.authority, rid)
                except _Refused:
                    client.close()
                    client = None
                    self._close(c)
                    with self._lock:
                        self.stats.refused_retries += 1
                    continue
                except Exception as e:
                    stale = client.streams_done > 0 and not client.got_any and isinstance(
                        e, (*STALE_ERRORS, EOFError))
                    client.close()
                    client = None
                    self._close(c)
                    if stale and attempt == 0:
                        with self._lock:
                            self.stats.stale_retries += 1
                        continue
                    self._record(Record(started, kind, c.id, False, time.monotonic() - started,
                                        error=f"{type(e).__name__}: {e}"[:200], rid=rid))
                    break
                self._record(Record(started, kind, c.id, status == 200,
                                    time.monotonic() - started, status,
                                    headers.get("meshd-error", ""),
                                    headers.get("x-backend", ""), rid))
                if client.goaway or (self.churn and client.streams_done >= self.churn * 4):
                    client.close()
                    client = None
                    self._close(c)
                break
            self._pause()
        if client is not None:
            client.close()
            self._close(c)

    # -- opaque TCP ----------------------------------------------------------------------

    def _tcp(self, kind: str) -> None:
        assert self.tcp_port is not None
        deadline = time.monotonic() + self.max_seconds
        per_conn = self.churn or 50
        while self._running(deadline):
            try:
                sock = socket.create_connection((self.host, self.tcp_port), timeout=TIMEOUT)
            except OSError as e:
                self._record(Record(time.monotonic(), kind, 0, False, 0.0, error=f"connect: {e}"))
                self._stop.wait(0.05)
                continue
            c = self._open(kind, sock)
            with sock:
                for i in range(per_conn):
                    if not self._running(deadline):
                        break
                    msg = (f"{c.id}:{i}:".encode() + b"x" * 500)[:512]
                    started = time.monotonic()
                    try:
                        sock.sendall(msg)
                        got = b""
                        while len(got) < len(msg):
                            data = sock.recv(65536)
                            if not data:
                                raise EOFError("closed by meshd")
                            got += data
                        ok, error = got == msg, "" if got == msg else "echo mismatch"
                    except Exception as e:
                        ok, error = False, f"{type(e).__name__}: {e}"[:200]
                    self._record(Record(started, kind, c.id, ok, time.monotonic() - started,
                                        error=error))
                    if not ok:
                        break
                    self._pause()
            self._close(c)


    # -- WebSocket -----------------------------------------------------------------------

    def _ws(self, kind: str) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        deadline = time.monotonic() + self.max_seconds
        per_conn = self.churn or 50
        while self._running(deadline):
            started = time.monotonic()
            try:
                sock = socket.create_connection((self.host, self.http_port), timeout=TIMEOUT)
            except OSError as e:
                self._record(Record(started, kind, 0, False, 0.0, error=f"connect: {e}"))
                self._stop.wait(0.05)
                continue
            c = self._open(kind, sock)
            try:   # the handshake (meshd answers 101 once the echo server did) is a request
                ws = connect(f"ws://{WS_AUTHORITY}/chat/{c.id}", sock=sock,
                             open_timeout=TIMEOUT, close_timeout=1)
            except (OSError, WebSocketException) as e:
                sock.close()
                self._close(c)
                self._record(Record(started, kind, c.id, False, time.monotonic() - started,
                                    error=f"handshake: {type(e).__name__}: {e}"[:200]))
                self._stop.wait(0.05)
                continue
            with ws:
                for i in range(per_conn):
                    if not self._running(deadline):
                        break
                    msg = f"{c.id}:{i}:" + "w" * 200
                    started = time.monotonic()
                    try:
                        ws.send(msg)
                        got = ws.recv(timeout=TIMEOUT)
                        ok, error = got == msg, "" if got == msg else "echo mismatch"
                    except Exception as e:
                        ok, error = False, f"{type(e).__name__}: {e}"[:200]
                    self._record(Record(started, kind, c.id, ok, time.monotonic() - started,
                                        error=error))
                    if not ok:
                        break
                    self._pause()
            self._close(c)


WS_AUTHORITY = "ws"      # the service of the WebSocket echo server (chaos.procs)


class _Refused(Exception):
    """The server never processed the stream (GOAWAY past it, or REFUSED_STREAM)."""


class _GoawayTolerant(h2.connection.H2Connection):
    """The h2 library closes its state machine on any GOAWAY, and then rejects the frames
    of the streams the GOAWAY let finish (a ProtocolError), which RFC 9113 section 6.8
    says to process: after a graceful GOAWAY the connection stays open for them."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        out = super()._receive_goaway_frame(frame)
        if frame.error_code == 0:
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return out


class _H2:
    """A minimal HTTP/2 client connection (prior knowledge), one stream at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.conn = _GoawayTolerant(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.goaway = False
        self.streams_done = 0
        self.got_any = False   # any byte for the current stream

    def get(self, path: str, authority: str, rid: str) -> tuple[int, dict[str, str], bytes]:
        if self.goaway:
            raise _Refused()
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "http"),
                                     (":authority", authority), ("x-request-id", rid)],
                               end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.got_any = False
        status, headers, body = 0, {}, b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed by meshd")
            events = self.conn.receive_data(data)
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    self.got_any = True
                    hdrs: dict[str, str] = {str(k): str(v) for k, v in ev.headers}
                    status, headers = int(hdrs.get(":status", "0")), hdrs
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    body += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.streams_done += 1
                    out = self.conn.data_to_send()
                    if out:
                        self.sock.sendall(out)
                    return status, headers, body
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    if ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                        raise _Refused()
                    raise ConnectionError(f"stream reset: {ev.error_code!r}")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.goaway = True
                    if ev.last_stream_id is None or ev.last_stream_id < sid:
                        raise _Refused()
                    if ev.error_code != h2.errors.ErrorCodes.NO_ERROR:
                        raise ConnectionError(f"GOAWAY {ev.error_code!r}")
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)
        raise TimeoutError("no answer")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

