"""What an ended HTTP/2 client connection leaves to the garbage collector: nothing.

h2's connection is a web of reference cycles (its frame dispatch table holds its own
bound methods), so an ended connection with its streams, its record of closed streams and
its HPACK tables (about 110 KB after 750 streams) waited for a full collection, which a
worker runs seldom: each burst of HTTP/2 connections (h2load -c8) left about 1 MB in
every worker and the heap kept the high-water mark (issue 20's soak). Once a connection
ends, meshd empties it (``H2Connection.release``) and it is freed with its last
reference. The tests run with the collector off: what is not freed by reference counting
is what a worker would keep until its next full collection.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from types import SimpleNamespace

import gevent
import gevent.socket
import h2.config
import h2.connection
import h2.events
import pytest
from test_h2_closed_streams import _exchange, _pair

from meshd.config import LimitsConfig, ListenerConfig, parse_address
from meshd.worker.client.h2_server import H2ServerConnection


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_released_connection_is_freed_without_the_collector(no_gc: None) -> None:
    client, server = _pair()
    _exchange(client, server, 300)
    assert len(server._closed_streams) >= 299  # what it held: one record per stream
    server.release()
    assert not server.streams and not server._closed_streams
    ref = weakref.ref(server)
    del server
    assert ref() is None


def test_an_unreleased_connection_waits_for_the_collector(no_gc: None) -> None:
    """The cycle ``release`` breaks (this test fails the day h2 has none, and
    ``release`` may go)."""
    client, server = _pair()
    _exchange(client, server, 10)
    ref = weakref.ref(server)
    del server
    assert ref() is not None
    gc.collect()
    assert ref() is None


MALFORMED = 50  # requests without :path, each reset by the server: a closed stream each


def test_an_ended_server_connection_leaves_nothing_to_the_collector(no_gc: None) -> None:
    """A real ``H2ServerConnection`` on a socket pair: a client opens the connection,
    sends MALFORMED requests the server resets (stream state, no stream task), and
    closes. Once ``serve`` returns, the h2 connection is freed by reference counting."""
    worker = SimpleNamespace(config=SimpleNamespace(limits=LimitsConfig()), draining=False)
    listener = ListenerConfig(name="mem", listen=parse_address("127.0.0.1:1"))
    ours, theirs = gevent.socket.socketpair()
    server = H2ServerConnection(worker, listener, ours)  # type: ignore[arg-type]
    conn_ref = weakref.ref(server.conn)
    serving = gevent.spawn(server.serve)

    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False))
    client.initiate_connection()
    for _ in range(MALFORMED):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                  (b":authority", b"web")], end_stream=True)
    theirs.sendall(client.data_to_send())
    resets = 0
    with gevent.Timeout(10):
        while resets < MALFORMED:  # the server reset every stream: all were processed
            data = theirs.recv(65536)
            assert data, "the server closed before resetting every stream"
            resets += sum(1 for e in client.receive_data(data)
                          if isinstance(e, h2.events.StreamReset))
    held = server.conn
    assert len(held.streams) + len(held._closed_streams) >= MALFORMED  # h2 keeps them
    del held
    theirs.close()
    serving.join(10)
    assert serving.dead and serving.exception is None
    del serving, server
    assert conn_ref() is None
    ours.close()
