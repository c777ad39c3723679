"""Socket calls for the hot path, with fewer system calls than gevent's cooperative ones.

gevent's ``sendall`` asks the kernel for SO_SNDBUF (a getsockopt) on every call to size
its chunks; on loopback and for responses of ordinary size one ``send`` takes
everything. ``sendall`` here tries the raw non-blocking send first and waits on the
socket's own write watcher only when the kernel buffer is full, so a typical request
costs one system call per write (PERF.md: the biggest single lever is fewer calls).
``recv`` and ``recv_after_wait`` take the wait's timeout as an argument and wait with
one timer watcher, not a ``gevent.Timeout`` and a ``settimeout`` before and after
(issue 17: about 15 % of a worker's CPU per proxied request went there).

This relies on long-stable attributes of gevent's socket (``_sock``, the real
non-blocking socket, and ``_wait``/``_read_event``/``_write_event``, the reusable
watchers), here alone:
the HTTP/2 server's own writer gets them through ``raw_socket`` and ``wait_writable``.
The test suite exercises them on every request. A TLS socket (an upstream over
``[service.X.tls]``) goes through its own ``sendall``/``recv`` instead: its ``_sock``
carries the encrypted records.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import gevent
import gevent.socket
import gevent.ssl
from gevent.exceptions import ConcurrentObjectUseError
from gevent.hub import Waiter

from meshd.errors import UpstreamError, UpstreamTimeout

_SSLSocket = gevent.ssl.SSLSocket
_TLS_PIECE = 1 << 16  # bytes per bounded TLS write (write_timeout)
_SOCKET: Any = object()     # recv's timeout by default: the socket's own
_TIMED_OUT = object()       # what a wait's timer hands its waiter


def is_tls(sock: socket.socket) -> bool:
    """A TLS socket (an upstream over ``[service.X.tls]`` or mTLS, a client connection
    ``client.inbound_tls`` terminated): its bytes go through its own recv/sendall, never
    the raw socket beneath it, nor splice."""
    return isinstance(sock, _SSLSocket)


def sendall(sock: socket.socket, data: bytes, timeout: float | None = None) -> None:
    """Send all of ``data``. ``timeout``: the longest the peer may accept no byte at all
    (each wait for room in the kernel buffer gets it afresh; ``TimeoutError`` after it):
    a peer that reads slowly but steadily is never cut off, one that stopped reading is."""
    if isinstance(sock, _SSLSocket):
        if timeout is None:
            sock.sendall(data)
        else:  # its records are written whole: bound each of them
            view = memoryview(data)
            while view:
                with gevent.Timeout(timeout, TimeoutError("the peer accepts no bytes")):
                    sock.sendall(view[:_TLS_PIECE])
                view = view[_TLS_PIECE:]
        return
    g: Any = sock
    raw = g._sock
    try:
        sent = raw.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        if timeout is None:
            g._wait(g._write_event)
        else:
            gevent.socket.wait(g._write_event, timeout, TimeoutError("the peer accepts no bytes"))
        try:
            sent = raw.send(view)
        except BlockingIOError:
            continue
        view = view[sent:]


def raw_socket(sock: socket.socket) -> socket.socket:
    """The real non-blocking socket beneath a gevent (plain) socket: its ``send`` never
    waits (BlockingIOError when the kernel buffer is full)."""
    g: Any = sock
    raw: socket.socket = g._sock
    return raw


def wait_writable(sock: socket.socket, timeout: float | None) -> None:
    """Wait on the socket's own write watcher until the kernel buffer has room
    (TimeoutError after ``timeout``, None: no limit, whatever the socket's own timeout says)."""
    g: Any = sock
    gevent.socket.wait(g._write_event, timeout)


def recv(sock: socket.socket, size: int, timeout: float | None | object = _SOCKET) -> bytes:
    """``recv`` with the raw non-blocking call first, waiting on the socket's own read
    watcher (within ``timeout``, by default the socket's own; TimeoutError after it)
    only when nothing is there: no timer or exception when data is waiting."""
    if isinstance(sock, _SSLSocket):
        return _tls_recv(sock, size, timeout)
    g: Any = sock
    raw: socket.socket = g._sock
    while True:
        try:
            return raw.recv(size)
        except BlockingIOError:
            _wait_read(g, g.timeout if timeout is _SOCKET else timeout)


def recv_after_wait(sock: socket.socket, size: int,
                    timeout: float | None | object = _SOCKET) -> bytes:
    """``recv`` for an answer to what was just sent: wait for the socket to be readable
    first (within ``timeout``, by default the socket's own; TimeoutError after it), then
    one raw recv. The usual recv tries first and, since the peer cannot have answered
    yet, pays a failed system call and an exception for nothing. (TLS: the socket's own
    recv, which knows the bytes it has decrypted already.)"""
    if isinstance(sock, _SSLSocket):
        return _tls_recv(sock, size, timeout)
    g: Any = sock
    raw: socket.socket = g._sock
    if timeout is _SOCKET:
        timeout = g.timeout
    while True:
        _wait_read(g, timeout)
        try:
            return raw.recv(size)
        except BlockingIOError:  # a spurious wakeup: wait again
            continue


def _wait_read(g: Any, timeout: Any) -> None:
    """Wait on the socket's own read watcher, TimeoutError after ``timeout`` (None: no
    limit). What gevent's cooperative wait does, with one timer watcher instead of a
    ``gevent.Timeout`` (a Python object, started, entered, exited and closed on every
    wait) and without the caller setting the socket's timeout before and after each
    read (each ``settimeout`` is a Python call too): on the hot path, two waits per
    request."""
    watcher = g._read_event
    if watcher is None:  # closed meanwhile (by another greenlet)
        raise OSError(errno.EBADF, "socket closed")
    if watcher.callback is not None:  # as gevent's own wait refuses it
        raise ConcurrentObjectUseError(f"socket already waited on by {watcher.callback!r}")
    hub = g.hub
    if timeout is None:
        hub.wait(watcher)
        return
    waiter = Waiter(hub)
    timer = hub.loop.timer(max(timeout, 0.0))
    watcher.start(waiter.switch, waiter)
    try:
        timer.start(waiter.switch, _TIMED_OUT)
        if waiter.get() is _TIMED_OUT:
            raise TimeoutError("timed out")
    finally:
        watcher.stop()
        timer.close()


def _tls_recv(sock: Any, size: int, timeout: Any) -> bytes:
    """A TLS socket's own recv within ``timeout`` (its own timeout by default)."""
    if timeout is _SOCKET:
        return sock.recv(size)
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        return sock.recv(size)
    finally:
        sock.settimeout(old)


def tcp_connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """A cooperative TCP connection with TCP_NODELAY (to an upstream: failures are
    ``UpstreamTimeout`` / ``UpstreamError`` naming the address)."""
    name = address_name(address)
    try:
        sock = gevent.socket.create_connection(address, timeout=timeout)
    except TimeoutError:
        raise UpstreamTimeout(f"connect to {name} timed out") from None
    except OSError as e:
        raise UpstreamError(f"connect to {name} failed: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def peer_address(sock: socket.socket) -> bytes:
    """The client's address as header bytes (x-forwarded-for, a hash on the client):
    b"" when the client is gone. Callers cache it per connection."""
    try:
        return str(sock.getpeername()[0]).encode()
    except OSError:
        return b""


def address_name(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def shutdown(sock: socket.socket, how: int) -> None:
    """``sock.shutdown(how)``, errors ignored. A TLS socket's TCP socket is shut down
    instead: gevent's SSLSocket.shutdown drops the TLS layer, and a reader still on it
    would then read the raw records (no close_notify is sent: a FIN ends the direction,
    as for plain TCP)."""
    try:
        if isinstance(sock, _SSLSocket):
            gevent.socket.socket.shutdown(sock, how)
        else:
            sock.shutdown(how)
    except OSError:
        pass

