"""py-consul's client, adapted for one long-polling watch.

Two additions to ``consul.Consul`` (std/requests flavour): the headers of the last answer
are kept (py-consul returns only ``(index, data)``, and ``X-Consul-Results-Filtered-By-ACLs``
is how Consul says a token may not see the results), and ``abort()`` shuts the sockets of
requests in flight, so a watch blocked for minutes in a blocking query ends at once
(closing a ``requests`` session only closes idle pooled connections).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from typing import Any

import consul
import consul.std
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class _Tracked:
    """Live connections of one client, so abort() can shut them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conns: weakref.WeakSet[Any] = weakref.WeakSet()  # dropped ones fall out
        self.aborted = False

    def add(self, conn: Any) -> None:
        with self.lock:
            self.conns.add(conn)
            aborted = self.aborted
        if aborted:
            _shut(conn)

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            conns = list(self.conns)
        for conn in conns:
            _shut(conn)


def _shut(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Adapter(HTTPAdapter):
    def __init__(self, tracked: _Tracked) -> None:
        self._tracked = tracked
        super().__init__(pool_connections=1, pool_maxsize=2)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        tracked = self._tracked

        class Conn(HTTPConnection):
            def connect(self) -> None:
                super().connect()
                tracked.add(self)

        class TlsConn(HTTPSConnection):
            def connect(self) -> None:
                super().connect()
                tracked.add(self)

        class Pool(HTTPConnectionPool):
            ConnectionCls = Conn

        class TlsPool(HTTPSConnectionPool):
            ConnectionCls = TlsConn

        self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TlsPool}


class _HTTPClient(consul.std.HTTPClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracked = _Tracked()
        self.last_headers: dict[str, str] = {}
        adapter = _Adapter(self.tracked)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def response(self, response: Any, raw: bool = False) -> Any:
        self.last_headers = dict(response.headers)
        return super().response(response, raw)

    def close(self) -> None:
        self.tracked.abort()
        self.session.close()


class Client(consul.Consul):
    """``consul.Consul`` whose ``http`` keeps the last headers and can be aborted."""

    http: _HTTPClient

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The token comes from token_file with each request; CONSUL_HTTP_TOKEN from the
        # environment (which py-consul would pick up) must not override the config.
        self.token = None

    def http_connect(self, host: str, port: int, scheme: Any, verify: bool | str = True,
                     cert: Any = None) -> _HTTPClient:
        return _HTTPClient(host, port, scheme, verify, cert,
                           connections_timeout=self.connections_timeout)

    def header(self, name: str) -> str:
        """A header of the last answer ('' if absent); names are case-insensitive."""
        want = name.lower()
        return next((v for k, v in self.http.last_headers.items() if k.lower() == want), "")

    def abort(self) -> None:
        self.http.close()
