"""A worker's side of tap (``meshd.tap`` says how the pieces fit).

``TapSender.poll`` runs in the worker's snapshot loop: a stat() of the filter file the
control process writes when taps come and go. It returns the sender while the file
lists filters and None otherwise; the worker keeps that in its ``tap`` attribute (and
in ``observing``, which the request path tests: ``meshd.worker.observe``): with nobody
tapping, a request costs one attribute load, builds nothing and makes no syscall.

While tapping, ``request`` (at the end of each request, where the access log records
its line) keeps a tuple of what the request path already holds when the request matches
one of the taps' filters, on a bounded deque (full: dropped, counted). A greenlet wakes
every FLUSH_INTERVAL, makes the records (fields cut, the gRPC status read), and sends
them in msgpack batches of at most BATCH_BYTES as non-blocking datagrams: when the
control's socket is full (``net.unix.max_dgram_qlen`` is often 10) the batch is dropped
and counted, never waited for. The worker reports its counts (records sent, dropped) and
the filter version it applied in a small state datagram from the same poll when they
changed: the control process shows them on /metrics and holds a new tap's response head
until every serving worker applied its filter. The file stays once the last tap left,
with no filter in it and a new version: the workers stop, and say they did.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import gevent
import msgpack

from meshd import tap as core
from meshd.private_files import read_trusted
from meshd.proto.grpc_status import text_of_answer
from meshd.shm import F_WORKER, ROW_UNKNOWN, WORKER_COUNTS, Stripe

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.call import Call
    from meshd.worker.peer import Peer
    from meshd.worker.upstream.exchange import UpstreamExchange

log = logging.getLogger("meshd.worker")

QUEUE = 4096             # records waiting for the sender at most (then dropped, counted)
FLUSH_INTERVAL = 0.02    # seconds between the sender's turns
BATCH_BYTES = 48 * 1024  # a datagram's records at most (one record is under 8 KB: the
                         # control reads datagrams of up to 128 KB)
_STRINGS = (2, 3, 4, 5, 6, 10, 12)  # a record's strings (meshd.tap.FIELDS)

# (listener, service, peer, method, authority, path, status, call, started, ended (both
#  time.monotonic), the exchange of a gRPC answer or None)
Pending = tuple["ListenerConfig", str, "Peer", bytes, "bytes | None", bytes, int,
                "Call | None", float, float, "UpstreamExchange | None"]

F_SENT = F_WORKER + WORKER_COUNTS.index("tap_sent")
F_DROPPED = F_WORKER + WORKER_COUNTS.index("tap_dropped")


class TapSender:
    def __init__(self, socket_path: str, filter_path: str) -> None:
        self.socket_path = socket_path
        self.filter_path = filter_path
        self.filters: tuple[core.Filter, ...] = ()
        self.everything = False     # a tap without a filter: no matching needed
        self.version = -1           # of the filters applied; -1: none yet
        self.queue: collections.deque[Pending] = collections.deque()
        self.sent = 0               # records that went out in a datagram
        self.dropped = 0            # records dropped: the queue or the control's socket full
        self._reported: tuple[int, int, int] | None = None
        self._file_id: tuple[int, int] | None = None
        self._sock: socket.socket | None = None
        self._sender: gevent.Greenlet | None = None
        self.stripe: Stripe | None = None   # the worker's: sent and dropped counted there too

    # -- the snapshot poll --------------------------------------------------------------

    def poll(self) -> TapSender | None:
        """Follow the filter file; the sender while someone taps, else None."""
        try:
            st = os.stat(self.filter_path)
        except OSError:   # nobody tapped yet, or a restarted control process removed it
            self.filters, self.everything, self._file_id = (), False, None
            return None
        file_id = (st.st_ino, st.st_mtime_ns)
        if file_id != self._file_id:
            try:
                self.version, self.filters = core.decode_filters(read_trusted(self.filter_path))
                self.everything = any(f.everything for f in self.filters)
                self._file_id = file_id
            except (OSError, ValueError) as e:  # replaced meanwhile, or not the control's
                log.debug("tap filter file %s: %s", self.filter_path, e)
        self._report()
        if not self.filters:  # the last tap left: the file says so, with a new version
            return None
        if self._sender is None or self._sender.dead:
            self._sender = gevent.spawn(self._send_loop)
        return self

    def _report(self) -> None:
        state = (self.version, self.sent, self.dropped)
        if state != self._reported and self.version >= 0:
            if self._send(msgpack.packb([core.MSG_STATE, os.getpid(), *state])):
                self._reported = state

    # -- the request path ---------------------------------------------------------------

    def request(self, listener: ListenerConfig, service: str, peer: Peer, method: bytes,
                authority: bytes | None, path: bytes, status: int, call: Call | None,
                started: float, answered: UpstreamExchange | None = None) -> None:
        """One finished request: kept when it matches a filter and the queue has room."""
        if not self.everything and not core.any_matches(self.filters, service, method, path,
                                                        status, listener.direction):
            return
        if len(self.queue) >= QUEUE:
            self.dropped += 1
            if self.stripe is not None:
                self.stripe.add(ROW_UNKNOWN, F_DROPPED)
            return
        self.queue.append((listener, service, peer, method, authority, path, status, call,
                           started, time.monotonic(), answered))

    # -- the sender ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            self.flush()
            if not self.filters and not self.queue:
                return  # nobody taps: the next poll that finds the file starts a new one

    def flush(self) -> None:
        queue = self.queue
        # one wall clock reading per batch: a record's time is its end on the monotonic
        # clock, shifted (the request path reads one clock, not two)
        shift = time.time() - time.monotonic()
        while queue:
            batch: list[list[Any]] = []
            size = 0
            while queue and size < BATCH_BYTES:
                rec = _record(queue.popleft(), shift)
                batch.append(rec)
                size += 96 + sum(len(rec[i]) for i in _STRINGS)
            ok = self._send(msgpack.packb([core.MSG_RECORDS, batch]))
            if ok:
                self.sent += len(batch)
            else:
                self.dropped += len(batch)
            if self.stripe is not None:
                self.stripe.add(ROW_UNKNOWN, F_SENT if ok else F_DROPPED, len(batch))

    def _send(self, data: bytes) -> bool:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto(data, self.socket_path)
            return True
        except OSError:  # full (EAGAIN), or the control process is restarting
            return False


def _record(p: Pending, shift: float) -> list[Any]:
    """The record (``meshd.tap.FIELDS`` in order) of a finished request."""
    (listener, service, peer, method, authority, path, status, call, started, ended,
     answered) = p
    endpoint = ""
    attempts = 0
    if call is not None and call.tried:
        attempts = len(call.tried)
        ep = call.endpoints[call.tried[-1]]
        endpoint = f"[{ep.host}]:{ep.port}" if ":" in ep.host else f"{ep.host}:{ep.port}"
    return [ended + shift, listener.direction, listener.name, service[:core.MAX_SERVICE],
            core.cut_authority(authority), core.cut_method(method), core.cut_path(path),
            status, text_of_answer(answered),
            (ended - started) * 1000, endpoint, peer.tls, peer.client_id, attempts]
