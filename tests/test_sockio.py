"""meshd.worker.sockio's reads with an explicit timeout (the hot path's two waits per
request): data, timeout, a closed socket and a second reader behave as gevent's own
cooperative reads do, without a ``gevent.Timeout`` or a change to the socket's timeout.

In-process on gevent's own sockets (``gevent.socket``), like test_h2_upstream: the
pytest process is not monkey-patched."""

from __future__ import annotations

import time
from collections.abc import Iterator

import gevent
import gevent.socket
import pytest
from gevent.exceptions import ConcurrentObjectUseError
from gevent.timeout import Timeout

from meshd.worker import sockio


@pytest.fixture
def pair() -> Iterator[tuple[gevent.socket.socket, gevent.socket.socket]]:
    # The hub's loop clock is cached: in the pytest process it may be minutes old (the
    # loop did not run during earlier tests), and timers count from it. Fresh, so the
    # 10 s read timeouts below do not expire before the 0.01 s sender runs.
    gevent.get_hub().loop.update_now()
    a, b = gevent.socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def no_gevent_timeout(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every gevent.Timeout started meanwhile (its seconds)."""
    started: list[float] = []
    original = Timeout.start

    def start(self: Timeout, *args: object, **kwargs: object) -> None:
        started.append(self.seconds)
        original(self, *args, **kwargs)
    monkeypatch.setattr(Timeout, "start", start)
    return started


@pytest.mark.parametrize("read", [sockio.recv, sockio.recv_after_wait])
def test_a_read_with_a_timeout_returns_what_arrives_later(
        pair: tuple[gevent.socket.socket, gevent.socket.socket], read: object,
        no_gevent_timeout: list[float]) -> None:
    a, b = pair
    sender = gevent.spawn_later(0.01, b.sendall, b"hello")
    assert read(a, 100, 10.0) == b"hello"  # type: ignore[operator]
    sender.join(5)
    assert a.gettimeout() is None
    assert no_gevent_timeout == []


@pytest.mark.parametrize("read", [sockio.recv, sockio.recv_after_wait])
def test_a_read_times_out_without_a_gevent_timeout(
        pair: tuple[gevent.socket.socket, gevent.socket.socket], read: object,
        no_gevent_timeout: list[float]) -> None:
    a, _b = pair
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        read(a, 100, 0.05)  # type: ignore[operator]
    # no lower bound: libev times from its loop's cached clock, which may lag monotonic()
    assert time.monotonic() - started < 5
    assert a.gettimeout() is None
    assert no_gevent_timeout == []
    # the watcher was stopped: a later read waits again and gets its data
    gevent.spawn_later(0.01, _b.sendall, b"x")
    assert sockio.recv_after_wait(a, 100, 10.0) == b"x"


def test_without_a_timeout_argument_the_sockets_own_applies(
        pair: tuple[gevent.socket.socket, gevent.socket.socket]) -> None:
    a, _b = pair
    a.settimeout(0.05)
    with pytest.raises(TimeoutError):
        sockio.recv_after_wait(a, 100)
    with pytest.raises(TimeoutError):
        sockio.recv(a, 100)


def test_a_socket_closed_by_another_greenlet_wakes_its_reader(
        pair: tuple[gevent.socket.socket, gevent.socket.socket]) -> None:
    a, _b = pair
    gevent.spawn_later(0.01, a.close)
    with pytest.raises(OSError):
        sockio.recv_after_wait(a, 100, 10.0)


def test_a_second_reader_of_one_socket_is_refused(
        pair: tuple[gevent.socket.socket, gevent.socket.socket]) -> None:
    a, b = pair
    first = gevent.spawn(sockio.recv_after_wait, a, 100, 10.0)
    gevent.sleep(0.01)  # the first reader waits now
    with pytest.raises(ConcurrentObjectUseError):
        sockio.recv_after_wait(a, 100, 10.0)
    b.sendall(b"one")
    assert first.get(timeout=5) == b"one"
