"""One direction of a byte tunnel (``meshd.worker.tunnel``): src -> dst until EOF.

A tunnel usually carries messages of a protocol meshd does not parse: a request, an
answer, each a few hundred bytes (issue 17: wrk through a TCP listener). Per message the
relay costs two system calls and no wait that could have been avoided
(docs/perf/tcp.md):

- a message is read into one buffer the whole worker shares (greenlets take turns: no
  switch between the read and the send), then sent; bytes the destination cannot take
  yet are copied out before waiting, so the buffer is free again. No memory per tunnel.
- a read that fills the buffer means bulk: the next reads splice through a pipe
  (socket -> pipe -> socket inside the kernel, the bytes never enter Python) for as
  long as they fill ``CHUNK``; a shorter one, or none ready, goes back to the buffer. The pipe is made
  on the first bulk read and lives as long as the direction.
- the source's read watcher is started once and stays armed while the direction lives,
  its callback switching straight back into the relay: no watcher started and stopped
  per message (each an ``epoll_ctl``, and libev's re-add fails with EEXIST:
  docs/perf/http1.md). It is stopped only while the relay waits for the destination
  to take bytes (level-triggered, it would fire on every loop iteration meanwhile).
- after a short read the relay waits before reading again (the peer has usually not
  answered yet: a read now would fail with EAGAIN); after a full one it reads first.

A TLS socket on either side (an upstream over TLS) is read and written through its own
recv/sendall, never the raw socket beneath it, and shut down beneath its TLS layer
(``sockio.shutdown``), so the other direction still reads it.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent

from meshd.worker.sockio import is_tls, raw_socket, sendall, shutdown, wait_writable

HAS_SPLICE = hasattr(os, "splice")
CHUNK = 1 << 16  # bytes per read: the shared buffer, a splice step
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_READ = 1        # libev EV_READ
_BUFFER = bytearray(CHUNK)
_VIEW = memoryview(_BUFFER)


def pump(src: socket.socket, dst: socket.socket, count: Callable[[int], None],
         write_timeout: float | None = None) -> None:
    """Copy src -> dst until EOF (``count`` told of each chunk moved), then half-close
    dst so the peer sees the end too; a reset on either side, or a dst that accepts no
    byte for ``write_timeout``, shuts both down at once."""
    try:
        if is_tls(src) or is_tls(dst):
            while data := src.recv(CHUNK):
                sendall(dst, data, write_timeout)
                count(len(data))
        else:
            _relay(src, dst, count, write_timeout)
    except OSError:  # TimeoutError (write_timeout) included
        for s in (src, dst):
            shutdown(s, socket.SHUT_RDWR)
        return
    shutdown(dst, socket.SHUT_WR)


def _relay(src: socket.socket, dst: socket.socket, count: Callable[[int], None],
           write_timeout: float | None) -> None:
    """Plain sockets both: see the module docstring."""
    g: Any = src
    hub = g.hub
    park = hub.switch
    reader: Any = hub.loop.io(src.fileno(), _READ)
    recv_into = raw_socket(src).recv_into
    send = raw_socket(dst).send
    pipe: tuple[int, int] | None = None
    wait_first = False
    reader.start(getcurrent().switch)
    try:
        while True:
            if wait_first:
                park()  # woken by the read watcher (or killed: GreenletExit)
            try:
                n = recv_into(_BUFFER)
            except BlockingIOError:
                wait_first = True
                continue
            if n == 0:
                return
            try:
                sent = send(_VIEW[:n])
            except BlockingIOError:
                sent = 0
            # the buffer is shared: what is left is copied out before anything else runs
            rest = bytes(_VIEW[sent:n]) if sent < n else b""
            count(n)
            if rest:
                reader.stop()
                sendall(dst, rest, write_timeout)
                reader.start(getcurrent().switch)
            if n < CHUNK:
                wait_first = True
                continue
            if not HAS_SPLICE:
                wait_first = False
                continue
            if pipe is None:
                pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            if _splice(src, dst, pipe, reader, count, write_timeout):
                return
            wait_first = True
    finally:
        reader.stop()
        reader.close()
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])


def _splice(src: socket.socket, dst: socket.socket, pipe: tuple[int, int], reader: Any,
            count: Callable[[int], None], write_timeout: float | None) -> bool:
    """Splice src -> pipe -> dst while each step fills ``CHUNK`` (bulk); True at EOF,
    False after a shorter step or when nothing is there (the pipe is empty again)."""
    rfd, wfd = pipe
    sfd, dfd = src.fileno(), dst.fileno()
    while True:
        try:
            n = os.splice(sfd, wfd, CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:  # a pause: what comes next may be a message again
            return False
        if n == 0:
            return True
        count(n)
        left = n
        while left:
            try:
                left -= os.splice(rfd, dfd, left, flags=_SPLICE_FLAGS)
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    raise
            reader.stop()
            wait_writable(dst, write_timeout)
            reader.start(getcurrent().switch)
        if n < CHUNK:
            return False
