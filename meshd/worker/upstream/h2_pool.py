"""A worker's pool of HTTP/2 upstream connections (``meshd.worker.upstream.h2``): one
connection per endpoint while it has room for another stream, up to
``max_connections_per_endpoint``; beyond that ``EndpointsBusy`` (503) rather than a
queue. Connections that received GOAWAY, are draining or went silent (no PING answer)
leave the pool and finish their streams on their own; each closes itself once idle for
its service's ``idle_timeout`` (``H2Upstream``'s watchdog).

A service with ``[service.NAME.tls]`` passes its ``TlsTarget`` (``meshd.worker.upstream.tls``):
its connections are TLS with ALPN "h2" and pooled apart from plaintext ones to the same
address. ``adopt`` takes a TLS connection the HTTP/1.1 pool opened on which the endpoint
selected "h2".
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import gevent.lock

from meshd.errors import EndpointsBusy, UpstreamTimeout
from meshd.shm import Stripe
from meshd.worker.upstream.h2 import (
    CONNECTION_WINDOW,
    IDLE_TIMEOUT,
    STREAM_WINDOW,
    H2Stream,
    H2Upstream,
    Headers,
    StreamNotOpened,
    check_headers,
)

if TYPE_CHECKING:
    from meshd.worker.upstream.tls import TlsTarget

Key = tuple[str, int] | tuple[str, int, str]  # an address; with a TLS target's service too


_FREE = gevent.lock.Semaphore()  # stands for an endpoint nobody is connecting to


def _key(address: tuple[str, int], tls: TlsTarget | None) -> Key:
    return address if tls is None else (address[0], address[1], tls.service)


class H2Pool:
    """A worker's HTTP/2 upstream connections: one per endpoint while it has room, up to
    ``max_connections_per_endpoint``; connections that received GOAWAY or are draining
    leave the pool and finish their streams on their own."""

    def __init__(self, max_connections_per_endpoint: int = 4, *,
                 stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW) -> None:
        self.max_connections_per_endpoint = max_connections_per_endpoint
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.connections: dict[Key, list[H2Upstream]] = {}
        self.retired: set[H2Upstream] = set()  # out of the pool, streams still finishing
        self.events: Stripe | None = None   # the worker's: connection events (H2Upstream.events)
        self._connecting: dict[Key, gevent.lock.Semaphore] = {}

    def stream(self, address: tuple[str, int], headers: Headers, end_stream: bool,
               connect_timeout: float, tls: TlsTarget | None = None,
               checked: bool = False, idle_timeout: float = IDLE_TIMEOUT,
               ping_timeout: float = 0.0, row: int = -1) -> H2Stream:
        """A new stream to ``address``, on a pooled connection with room or a new one
        (over TLS with ``tls``). Raises ``EndpointsBusy`` when every allowed connection
        is full. ``checked``: the head is valid by construction (``check_headers`` would
        pass it). The connection takes ``idle_timeout`` and ``ping_timeout`` (the
        service's) for its watchdog."""
        if not checked:
            check_headers(headers)  # an invalid head fails the same on every connection
        key = _key(address, tls)
        conns = self.connections.setdefault(key, [])
        for _ in range(3):  # a connection may fill or die between the pick and the open
            up = self._pick(conns)
            if up is None:
                up = self._connect(address, key, conns, connect_timeout, tls)
            up.idle_timeout = idle_timeout
            up.ping_timeout = ping_timeout
            up.events, up.row = self.events, row   # its events count on the last stream's row
            try:
                return up.open_stream(headers, end_stream, checked=True)
            except StreamNotOpened:
                continue  # nothing was sent: the next pick will not choose it again
        raise StreamNotOpened(f"no HTTP/2 connection to {address[0]}:{address[1]} "
                            "took the stream")

    def _pick(self, conns: list[H2Upstream]) -> H2Upstream | None:
        keep = []
        for up in conns:
            if up.alive and not up.draining and not up.closed:
                keep.append(up)
            elif not up.closed:
                self.retired.add(up)
        conns[:] = keep
        if self.retired:
            self.retired = {up for up in self.retired if not up.closed}
        for up in conns:
            if up.available():
                return up
        return None

    def _connect(self, address: tuple[str, int], key: Key, conns: list[H2Upstream],
                 timeout: float, tls: TlsTarget | None) -> H2Upstream:
        # One connect per endpoint at a time: the greenlets that wait for it then share
        # the new connection instead of each opening their own.
        gate = self._connecting.setdefault(key, gevent.lock.Semaphore())
        if not gate.acquire(timeout=timeout):
            raise UpstreamTimeout(f"connect to {address[0]}:{address[1]} timed out "
                                  "(waiting for another connect)")
        try:
            up = self._pick(conns)
            if up is not None:
                return up
            if len(conns) >= self.max_connections_per_endpoint:
                raise EndpointsBusy(f"{address[0]}:{address[1]}: "
                                    f"{len(conns)} HTTP/2 connections, all full")
            if tls is not None:
                deadline = time.monotonic() + timeout
                up = H2Upstream.start_on(tls.connect_h2(address, timeout), address, deadline,
                                         stream_window=self.stream_window,
                                         connection_window=self.connection_window)
            else:
                up = H2Upstream.connect(address, timeout, stream_window=self.stream_window,
                                        connection_window=self.connection_window)
            conns.append(up)
            return up
        finally:
            gate.release()

    def adopt(self, sock: Any, address: tuple[str, int], tls: TlsTarget, timeout: float) -> None:
        """Take a TLS connection on which ALPN selected "h2" (opened by the HTTP/1.1
        pool): HTTP/2 starts on it and it joins the pool, unless the endpoint has all the
        connections it may (then it is closed; the next stream uses those)."""
        conns = self.connections.setdefault(_key(address, tls), [])
        up = H2Upstream.start_on(sock, address, time.monotonic() + timeout,
                                 stream_window=self.stream_window,
                                 connection_window=self.connection_window)
        self._pick(conns)  # drops the dead ones
        if len(conns) < self.max_connections_per_endpoint:
            conns.append(up)
        else:
            up.close()

    def reap(self) -> int:
        """Forget the connections that closed themselves (idle past their idle_timeout,
        lost, drained) and the endpoints left without any: a worker that once talked
        to many endpoints keeps nothing of them. How many were forgotten."""
        dropped = 0
        for key, conns in list(self.connections.items()):
            live = [up for up in conns if not up.closed]
            dropped += len(conns) - len(live)
            if live:
                conns[:] = live
            elif not self._connecting.get(key, _FREE).locked():
                del self.connections[key]
                self._connecting.pop(key, None)
        if self.retired:
            before = len(self.retired)
            self.retired = {up for up in self.retired if not up.closed}
            dropped += before - len(self.retired)
        return dropped

    def drain_all(self) -> None:
        """Graceful: every connection takes no new stream and closes after its last."""
        for conns in self.connections.values():
            for up in conns:
                up.goaway()
                self.retired.add(up)
        self.connections.clear()

    def close_all(self) -> None:
        """Close every connection (GOAWAY, then close); their open streams fail."""
        for conns in self.connections.values():
            for up in conns:
                up.close()
        for up in self.retired:
            up.close()
        self.connections.clear()
        self.retired.clear()
