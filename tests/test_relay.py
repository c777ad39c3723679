"""meshd.worker.relay, a tunnel's direction: messages through the shared buffer, bulk
spliced, back and forth on one connection; a destination that stops reading (the bytes
it could not take are kept, the other direction still moves, ``write_timeout`` ends
it); half-close in order; a reset; an idle tunnel's relays ended with their watchers.

In-process on gevent's own TCP sockets over loopback (``gevent.socket``), like
test_sockio: the pytest process is not monkey-patched. Each tunnel sits between two
connected pairs: app client <-> meshd's client side, meshd's upstream side <-> app
server."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest

from meshd.worker import relay
from meshd.worker.tunnel import Tunnel

GSock = gevent.socket.socket


def _connected_pair() -> tuple[GSock, GSock]:
    with gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        a = gevent.socket.create_connection(lsn.getsockname(), timeout=10)
        b, _ = lsn.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(20)
    return a, b


@pytest.fixture
def fresh_clock() -> None:
    gevent.get_hub().loop.update_now()  # the hub's clock may be minutes old (test_sockio)


@pytest.fixture
def ends(fresh_clock: None) -> Iterator[tuple[GSock, GSock, GSock, GSock]]:
    """(app client, meshd's client side, meshd's upstream side, app server)."""
    client, m_client = _connected_pair()
    m_upstream, server = _connected_pair()
    socks = (client, m_client, m_upstream, server)
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def splices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes of each spliced step (the bulk path)."""
    steps: list[int] = []
    original = relay.os.splice

    def splice(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        n = original(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]
        steps.append(n)
        return n
    monkeypatch.setattr(relay.os, "splice", splice)
    return steps


def _read_exactly(sock: GSock, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = sock.recv(min(1 << 16, n - len(got)))
        assert data, f"EOF after {len(got)} of {n} bytes"
        got += data
    return bytes(got)


def _start(tunnel: Tunnel) -> gevent.Greenlet:
    return gevent.spawn(tunnel.run)


def _payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def test_messages_then_bulk_then_messages_on_one_tunnel(ends, splices) -> None:
    client, m_client, m_upstream, server = ends
    tunnel = Tunnel(m_client, m_upstream, idle_timeout=30, write_timeout=20)
    run = _start(tunnel)
    up = down = 0
    for i in range(20):  # request, answer: the buffer's path, nothing spliced
        request = b"GET /%d HTTP/1.1\r\n\r\n" % i
        client.sendall(request)
        assert _read_exactly(server, len(request)) == request
        answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        server.sendall(answer)
        assert _read_exactly(client, len(answer)) == answer
        up, down = up + len(request), down + len(answer)
    assert splices == []
    bulk = _payload(8 << 20)  # bulk both ways at once: reads fill the buffer, then splice
    back = _payload(3 << 20)[::-1]
    senders = [gevent.spawn(client.sendall, bulk), gevent.spawn(server.sendall, back)]
    got_up = gevent.spawn(_read_exactly, server, len(bulk))
    got_down = _read_exactly(client, len(back))
    gevent.joinall(senders, raise_error=True, timeout=60)
    assert hashlib.sha256(got_up.get(timeout=60)).digest() == hashlib.sha256(bulk).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(back).digest()
    assert any(n == relay.CHUNK for n in splices), "bulk was never spliced"
    up, down = up + len(bulk), down + len(back)
    spliced = len(splices)
    for i in range(5):  # messages again: back on the buffer's path
        client.sendall(b"ping %d" % i)
        assert _read_exactly(server, 6) == b"ping %d" % i
        server.sendall(b"pong %d" % i)
        assert _read_exactly(client, 6) == b"pong %d" % i
        up, down = up + 6, down + 6
    assert len(splices) == spliced
    client.shutdown(socket.SHUT_WR)
    assert server.recv(10) == b""
    server.shutdown(socket.SHUT_WR)
    assert client.recv(10) == b""
    run.get(timeout=20)
    assert (tunnel.bytes_up, tunnel.bytes_down) == (up, down)
    assert not tunnel.idled


def test_a_destination_that_stops_reading_gets_every_byte_later(ends) -> None:
    client, m_client, m_upstream, server = ends
    tunnel = Tunnel(m_client, m_upstream, idle_timeout=30, write_timeout=20)
    run = _start(tunnel)
    data = _payload(16 << 20)  # far more than the kernel buffers: the relay must wait
    sender = gevent.spawn(client.sendall, data)
    # the relay waits for the server to read; meanwhile the other direction still moves
    gevent.wait([sender], timeout=0.3)
    assert not sender.ready(), "16 MiB went through a server that reads nothing"
    server.sendall(b"still here")
    assert _read_exactly(client, 10) == b"still here"
    got = _read_exactly(server, len(data))
    sender.get(timeout=30)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    client.close()  # both ends gone: the tunnel ends
    server.close()
    run.get(timeout=20)
    assert tunnel.bytes_up == len(data)
    assert tunnel.bytes_down == 10


def test_a_destination_that_accepts_nothing_ends_the_tunnel_after_write_timeout(ends) -> None:
    client, m_client, m_upstream, server = ends
    tunnel = Tunnel(m_client, m_upstream, idle_timeout=30, write_timeout=0.5)
    run = _start(tunnel)
    sender = gevent.spawn(client.sendall, _payload(32 << 20))
    run.get(timeout=30)  # ended: the server never read
    assert not tunnel.idled
    # both sides were shut down: the server sees EOF after what the kernel buffered,
    # the client's send fails once meshd closes its side (as serve_opaque's caller does)
    m_client.close()
    sender.join(timeout=20)
    assert sender.ready()
    while server.recv(1 << 16):
        pass


def test_half_close_carries_each_direction_in_order(ends) -> None:
    client, m_client, m_upstream, server = ends
    tunnel = Tunnel(m_client, m_upstream, idle_timeout=30, write_timeout=20)
    run = _start(tunnel)
    client.sendall(b"the whole request")
    client.shutdown(socket.SHUT_WR)  # the client has finished writing, still reads
    assert _read_exactly(server, 17) == b"the whole request"
    assert server.recv(10) == b""  # the end came through after the bytes
    assert not run.ready()
    server.sendall(b"an answer after the request's end")
    server.shutdown(socket.SHUT_WR)
    assert _read_exactly(client, 33) == b"an answer after the request's end"
    assert client.recv(10) == b""
    run.get(timeout=20)  # both directions ended: the tunnel with them
    assert (tunnel.bytes_up, tunnel.bytes_down) == (17, 33)


def test_a_reset_shuts_down_the_other_side(ends) -> None:
    client, m_client, m_upstream, server = ends
    tunnel = Tunnel(m_client, m_upstream, idle_timeout=30, write_timeout=20)
    run = _start(tunnel)
    client.sendall(b"hello")
    assert _read_exactly(server, 5) == b"hello"
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server.close()  # an RST
    try:
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass
    run.get(timeout=20)
    assert tunnel.bytes_up == 5


def test_an_idle_tunnel_ends_and_its_relays_with_it(ends) -> None:
    client, m_client, m_upstream, server = ends
    tunnel = Tunnel(m_client, m_upstream, idle_timeout=0.3, write_timeout=20)
    run = _start(tunnel)
    client.sendall(b"x")
    assert _read_exactly(server, 1) == b"x"
    run.get(timeout=20)
    assert tunnel.idled
    # the relays are gone, their watchers with them: meshd's sides close cleanly and
    # the apps see the end
    m_client.close()
    m_upstream.close()
    assert client.recv(10) == b""
    assert server.recv(10) == b""


def test_many_tunnels_at_once_share_the_buffer_without_mixing_bytes(fresh_clock) -> None:
    """Twelve tunnels, each carrying its own bytes (messages of every size, some past the
    buffer, to a server that reads in small, irregular pieces): each server gets exactly
    its client's bytes, in order."""
    pairs = []
    for _ in range(12):
        client, m_client = _connected_pair()
        m_upstream, server = _connected_pair()
        pairs.append((client, m_client, m_upstream, server))
    try:
        runs = [_start(Tunnel(mc, mu, idle_timeout=30, write_timeout=20))
                for _c, mc, mu, _s in pairs]

        def send(i: int, sock: GSock) -> bytes:
            sent = bytearray()
            for k in range(40):
                size = (k * 7919 + i * 104729) % (3 * relay.CHUNK) + 1
                piece = bytes([i]) * size
                sock.sendall(piece)
                sent += piece
                if k % 5 == 0:
                    gevent.sleep(0)
            sock.shutdown(socket.SHUT_WR)
            return bytes(sent)

        def receive(i: int, sock: GSock) -> bytes:
            got = bytearray()
            k = 0
            while data := sock.recv(1000 + (k * 37 + i) % 9000):
                got += data
                k += 1
            return bytes(got)
        senders = [gevent.spawn(send, i, p[0]) for i, p in enumerate(pairs)]
        receivers = [gevent.spawn(receive, i, p[3]) for i, p in enumerate(pairs)]
        gevent.joinall(senders + receivers, raise_error=True, timeout=60)
        for sender, receiver in zip(senders, receivers, strict=True):
            assert receiver.get(timeout=1) == sender.get(timeout=1)
        for _client, _mc, _mu, server in pairs:
            server.shutdown(socket.SHUT_WR)
        gevent.joinall(runs, raise_error=True, timeout=30)
        assert all(r.ready() for r in runs)
    finally:
        for p in pairs:
            for s in p:
                s.close()
