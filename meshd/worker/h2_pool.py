"""A worker's pool of HTTP/2 upstream connections (``meshd.worker.h2_upstream``): one
connection per endpoint while it has room for another stream, up to
``max_connections_per_endpoint``; beyond that ``EndpointsBusy`` (503) rather than a
queue. Connections that received GOAWAY or are draining leave the pool and finish
their streams on their own.
"""

from __future__ import annotations

from typing import Any

import gevent.lock

from meshd.errors import EndpointsBusy, UpstreamTimeout
from meshd.worker.h2_upstream import (
    CONNECTION_WINDOW,
    STREAM_WINDOW,
    H2Stream,
    H2Upstream,
    Headers,
    StreamNotOpened,
    check_headers,
)


class H2Pool:
    """A worker's HTTP/2 upstream connections: one per endpoint while it has room, up to
    ``max_connections_per_endpoint``; connections that received GOAWAY or are draining
    leave the pool and finish their streams on their own."""

    def __init__(self, max_connections_per_endpoint: int = 4, *, tls_context: Any = None,
                 stream_window: int = STREAM_WINDOW,
                 connection_window: int = CONNECTION_WINDOW) -> None:
        self.max_connections_per_endpoint = max_connections_per_endpoint
        self.tls_context = tls_context
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.connections: dict[tuple[str, int], list[H2Upstream]] = {}
        self.retired: set[H2Upstream] = set()  # out of the pool, streams still finishing
        self._connecting: dict[tuple[str, int], gevent.lock.Semaphore] = {}

    def stream(self, address: tuple[str, int], headers: Headers, end_stream: bool,
               connect_timeout: float) -> H2Stream:
        """A new stream to ``address``, on a pooled connection with room or a new one.
        Raises ``EndpointsBusy`` when every allowed connection is full."""
        check_headers(headers)  # an invalid head fails the same on every connection
        conns = self.connections.setdefault(address, [])
        for _ in range(3):  # a connection may fill or die between the pick and the open
            up = self._pick(conns)
            if up is None:
                up = self._connect(address, conns, connect_timeout)
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

    def _connect(self, address: tuple[str, int], conns: list[H2Upstream],
                 timeout: float) -> H2Upstream:
        # One connect per endpoint at a time: the greenlets that wait for it then share
        # the new connection instead of each opening their own.
        gate = self._connecting.setdefault(address, gevent.lock.Semaphore())
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
            up = H2Upstream.connect(address, timeout, tls_context=self.tls_context,
                                    stream_window=self.stream_window,
                                    connection_window=self.connection_window)
            conns.append(up)
            return up
        finally:
            gate.release()

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
