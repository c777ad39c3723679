"""A scripted TCP peer on loopback for tests: a listener whose connections go to a
function the test writes (an upstream that records, stalls, echoes, or answers with
exactly the bytes the test wants).

    with TcpServer(echo) as srv:          # echo(conn) serves one connection
        mesh.run({"web": [srv.address]})
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType


class TcpServer:
    """Listens on 127.0.0.1 (a free port) and hands each accepted connection to
    ``handler(conn)``, which owns it (closes it or leaves it open: the server does not).

    The accept loop runs on a daemon thread, and each handler on a daemon thread of its
    own: OS threads on blocking stdlib sockets (the pytest process is not monkey-patched),
    so a test body that waits on gevent runs on while a handler blocks.

    ``limit``: accept that many connections, no more (later ones stay in the backlog).

    ``close(wait)`` (also at the end of a ``with``) stops accepting (a shutdown wakes the
    blocked accept), closes the listener, and then waits up to ``wait`` seconds for each
    thread it started, handlers included (0: waits for none). ``accepted`` counts the
    connections accepted so far.
    """

    def __init__(self, handler: Callable[[socket.socket], object], *,
                 limit: int | None = None, backlog: int = 64) -> None:
        self.handler = handler
        self.limit = limit
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while self.limit is None or self.accepted < self.limit:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            t = threading.Thread(target=self.handler, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def close(self, wait: float = 0.0) -> None:
        with contextlib.suppress(OSError):  # not listening (any more)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        if wait > 0:
            for t in self.threads:  # the accept thread first: no thread is added after it
                t.join(wait)

    def __enter__(self) -> TcpServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def echo(conn: socket.socket) -> None:
    """A handler that sends back what it reads until the peer ends (or breaks) its side."""
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
