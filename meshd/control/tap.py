"""Admin ``/tap`` in the control process: the tap socket workers send records to, the
filter file they follow, and the NDJSON streams of the tap clients (``meshd.tap`` says
how the pieces fit).

``TapHub`` owns all three. Each ``/tap`` request becomes a ``TapClient``: its filter, a
queue of lines bounded in count and bytes, and the greenlet of its WSGI response, which
writes what is queued. The receive loop never waits for a client: a line that finds its
client's queue full (the reader is slow, or its socket buffer is) is dropped and counted
(``meshd_tap_dropped_total{reason="client"}``). At most MAX_TAPS clients tap at once
(503 past it). A client that goes away ends its stream (a greenlet reads its socket and
sees EOF); one that accepts no byte for WRITE_TIMEOUT is closed. When the control
process stops (a reload retires its generation), every stream writes what is queued and
ends (the last chunk: the client sees a clean end and taps the next generation), and a
new tap is refused (503).

The filter file holds the filters of every open tap and a version (no filter: nobody
taps; it is written at the first tap of a generation). A new tap's response head is sent
once every serving worker reported that version (or after ACK_WAIT): when a client has
its head, the workers send what it asked for.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import msgpack

from meshd import tap as core
from meshd.control.counters import COUNTERS
from meshd.private_files import write_atomic
from meshd.ratelog import Throttle
from meshd.shm import F_WORKER, KIND_WORKER, ROW_UNKNOWN, STATE_SERVING, WORKER_COUNTS

if TYPE_CHECKING:
    from meshd.control.process import Control

log = logging.getLogger("meshd.control")
_quiet = Throttle(log)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

MAX_TAPS = 16            # tap clients at once (503 past it)
CLIENT_LINES = 1024      # lines queued for one client at most (then dropped, counted)
CLIENT_BYTES = 1 << 20   # and bytes: 16 slow clients hold 16 MB at most
CHUNK_BYTES = 64 * 1024  # lines written to a client at once at most
ACK_WAIT = 2.0           # seconds a new tap waits for the workers to apply its filter
WRITE_TIMEOUT = 30.0     # a client that accepts no byte this long is closed
IDLE_CHECK = 1.0         # seconds between a quiet stream's checks that it should go on
MAX_REPORTERS = 4096     # worker pids whose counts are kept (restarts make new ones)


class TapClient:
    __slots__ = ("filter", "everything", "lines", "size", "wake", "gone", "dropped", "sent")

    def __init__(self, filt: core.Filter) -> None:
        self.filter = filt
        self.everything = filt.everything
        self.lines: collections.deque[bytes] = collections.deque()
        self.size = 0            # bytes in lines
        self.wake = gevent.event.Event()
        self.gone = False
        self.dropped = 0
        self.sent = 0


class TapHub:
    def __init__(self, control: Control, socket_path: str, filter_path: str) -> None:
        self.control = control
        self.socket_path = socket_path
        self.filter_path = filter_path
        self.clients: list[TapClient] = []
        self.version = 0
        self.acked: dict[int, int] = {}          # worker pid -> filter version it applied
        self.worker_counts: dict[int, tuple[int, int]] = {}  # pid -> (sent, dropped)
        self.acks = gevent.event.Event()
        self.received = 0        # records received from workers
        self.dropped_client = 0  # lines a slow client did not take
        self.refused = 0         # taps refused at MAX_TAPS
        self.bad = 0             # datagrams that were not a worker's
        self._folded = (0, 0)    # counts of pids no longer kept
        self.stopping = False    # the control process stops: streams end, no new taps

    def start(self) -> None:
        for path in (self.socket_path, self.filter_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        mask = os.umask(0o177)   # 0600 from the start, like the control socket
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(mask)
        gevent.spawn(self._receive_loop, sock)

    def end_streams(self) -> None:
        """The control process stops: each stream ends once its queue is written."""
        self.stopping = True
        for client in self.clients:
            client.wake.set()

    def close(self) -> None:
        for path in (self.socket_path, self.filter_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- from the workers ---------------------------------------------------------------

    def _receive_loop(self, sock: socket.socket) -> None:
        while True:
            data = sock.recv(1 << 17)   # a worker's batch is under 64 KB
            try:
                msg = msgpack.unpackb(data, raw=False, max_bin_len=0, max_ext_len=0,
                                      max_map_len=0, max_array_len=1 << 16)
                kind = msg[0]
                if kind == core.MSG_RECORDS:
                    received = self.received
                    try:
                        for rec in msg[1]:
                            self._dispatch(rec)
                    finally:   # one count per datagram, not per record
                        COUNTERS.add(RECEIVED, self.received - received)
                elif kind == core.MSG_STATE:
                    _, pid, version, sent, dropped = msg
                    self._state(int(pid), int(version), int(sent), int(dropped))
                else:
                    raise ValueError(kind)
            except (ValueError, TypeError, IndexError, msgpack.UnpackException):
                self.bad += 1
                _quiet.warning("tap.bad", "tap: a datagram that is not a worker's (%d so far)",
                               self.bad)

    def _dispatch(self, rec: Any) -> None:
        if not isinstance(rec, list) or len(rec) != len(core.FIELDS):
            raise ValueError("not a record")
        self.received += 1
        line: bytes | None = None
        for client in self.clients:
            if not client.everything and not client.filter.matches(
                    rec[3], rec[5], rec[6], rec[7], rec[1]):  # service method path status direction
                continue
            if len(client.lines) >= CLIENT_LINES or client.size >= CLIENT_BYTES:
                client.dropped += 1
                self.dropped_client += 1
                COUNTERS.add(DROPPED_CLIENT)
                continue
            if line is None:
                line = core.to_line(rec)
            client.lines.append(line)
            client.size += len(line)
            client.wake.set()

    def _state(self, pid: int, version: int, sent: int, dropped: int) -> None:
        if pid not in self.worker_counts and len(self.worker_counts) >= MAX_REPORTERS:
            old, (s, d) = next(iter(self.worker_counts.items()))
            del self.worker_counts[old]
            self.acked.pop(old, None)
            self._folded = (self._folded[0] + s, self._folded[1] + d)
        self.worker_counts[pid] = (sent, dropped)
        self.acked[pid] = version
        self.acks.set()

    # -- the filter file ----------------------------------------------------------------

    def _publish(self) -> None:
        """Write the open taps' filters, a new version."""
        self.version += 1
        try:  # with no client: an empty list, which the workers acknowledge too
            write_atomic(self.filter_path, core.encode_filters(
                self.version, [c.filter for c in self.clients]))
        except OSError as e:
            _quiet.log(logging.ERROR, "tap.publish", "tap: cannot write %s: %s",
                       self.filter_path, e.strerror or e)

    def _workers(self) -> tuple[int, int]:
        """(serving workers of this generation, those that applied the current filters)."""
        generation = self.control.ctx.generation
        serving = current = 0
        for s in self.control.region.slots_in_use():
            if s.kind == KIND_WORKER and s.state == STATE_SERVING and s.generation == generation:
                serving += 1
                current += self.acked.get(s.pid, 0) >= self.version
        return serving, current

    def _workers_applied(self) -> bool:
        serving, current = self._workers()
        return current == serving

    def _wait_applied(self) -> None:
        deadline = time.monotonic() + ACK_WAIT
        while not self._workers_applied():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.acks.clear()
            self.acks.wait(min(left, 0.1))

    # -- the /tap endpoint --------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def answer(status: str, text: str) -> list[bytes]:
            body = text.encode() + b"\n"
            start_response(status, [("Content-Type", "text/plain"),
                                    ("Content-Length", str(len(body)))])
            return [body]

        if environ.get("REQUEST_METHOD") != "GET":
            return answer("405 Method Not Allowed", "GET only")
        try:
            filt = core.parse_query(environ.get("QUERY_STRING", ""))
        except core.FilterError as e:
            return answer("400 Bad Request", f"tap: {e}")
        if self.stopping:
            return answer("503 Service Unavailable",
                          "tap: this generation of meshd stops (reload or shutdown); tap again")
        if len(self.clients) >= MAX_TAPS:
            self.refused += 1
            COUNTERS.add(REFUSED)
            return answer("503 Service Unavailable", f"tap: {MAX_TAPS} taps already open")
        client = TapClient(filt)
        self.clients.append(client)
        try:
            self._publish()
            self._wait_applied()
            sock = environ.get("meshd.socket")
            if sock is not None:
                sock.settimeout(WRITE_TIMEOUT)
                gevent.spawn(_watch, sock, client)
            write = start_response("200 OK", [("Content-Type", "application/x-ndjson"),
                                              ("Cache-Control", "no-store"),
                                              ("Connection", "close")])
            write(b"")  # the head now: the client knows the workers tap
        except BaseException:
            self._leave(client)
            raise
        return self._stream(client)

    def _stream(self, client: TapClient) -> Iterator[bytes]:
        try:
            while not client.gone:
                if not client.lines:
                    if self.stopping:
                        return
                    client.wake.clear()
                    client.wake.wait(IDLE_CHECK)
                    continue
                out = []
                size = 0
                while client.lines and size < CHUNK_BYTES:
                    line = client.lines.popleft()
                    out.append(line)
                    size += len(line)
                client.size -= size
                client.sent += len(out)
                yield b"".join(out)
        finally:
            self._leave(client)

    def _leave(self, client: TapClient) -> None:
        client.gone = True
        client.wake.set()
        if client in self.clients:
            self.clients.remove(client)
            self._publish()

    # -- /metrics -----------------------------------------------------------------------

    def prometheus(self) -> Iterator[str]:
        # Counted in the workers' stripes (cumulative per slot: a worker replaced or a
        # new control process takes nothing away), not from the workers' reports.
        totals = self.control.region.row_totals(ROW_UNKNOWN)
        sent = totals[F_WORKER + WORKER_COUNTS.index("tap_sent")]
        worker_dropped = totals[F_WORKER + WORKER_COUNTS.index("tap_dropped")]
        yield "# HELP meshd_tap_clients Admin /tap streams open."
        yield "# TYPE meshd_tap_clients gauge"
        yield f"meshd_tap_clients {len(self.clients)}"
        yield ("# HELP meshd_tap_workers_current Serving workers that applied the open "
               "taps' filters (the others start or stop tapping within 100 ms).")
        yield "# TYPE meshd_tap_workers_current gauge"
        yield f"meshd_tap_workers_current {self._workers()[1]}"
        yield ("# HELP meshd_tap_records_sent_total Tap records workers sent to the control "
               "process (as the workers last reported).")
        yield "# TYPE meshd_tap_records_sent_total counter"
        yield f"meshd_tap_records_sent_total {sent}"
        yield "# HELP meshd_tap_records_received_total Tap records the control process received."
        yield "# TYPE meshd_tap_records_received_total counter"
        yield f"{RECEIVED} {COUNTERS.value(RECEIVED)}"
        yield ("# HELP meshd_tap_dropped_total Tap lines dropped: client (a tap reader that "
               "did not keep up), worker (a worker's queue or the control's socket full).")
        yield "# TYPE meshd_tap_dropped_total counter"
        yield f"{DROPPED_CLIENT} {COUNTERS.value(DROPPED_CLIENT)}"
        yield f'meshd_tap_dropped_total{{reason="worker"}} {worker_dropped}'
        yield "# HELP meshd_tap_refused_total Taps refused: as many open as allowed (16)."
        yield "# TYPE meshd_tap_refused_total counter"
        yield f"{REFUSED} {COUNTERS.value(REFUSED)}"


# Counters kept in the region's control tables (meshd.control.counters), by their name.
RECEIVED = "meshd_tap_records_received_total"
DROPPED_CLIENT = 'meshd_tap_dropped_total{reason="client"}'
REFUSED = "meshd_tap_refused_total"


def _watch(sock: socket.socket, client: TapClient) -> None:
    """Read the client's socket until EOF: a client that leaves ends its stream even
    when no line is due (nothing else reads it; what a client sends is discarded)."""
    junk = 0
    while not client.gone and junk < 65536:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        junk += len(data)
    client.gone = True
    client.wake.set()
