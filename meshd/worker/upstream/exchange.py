"""One attempt's exchange with an upstream, whatever the protocol it goes over.

``UpstreamExchange`` is what the call's attempt loop (``meshd.worker.call.Call.run``)
drives: ``start`` sends the request head and, in a sender greenlet, its body;
``response`` waits for the final response head and gives its status; the client side
then reads the body with ``read`` (decoded pieces, None at the end) and ``trailers``;
``finish`` ends a complete exchange (the sender joined; the connection kept for the next
request when it can carry one) and ``abort`` a failed one (the sender killed, the
connection closed or the stream reset, ``reset_code`` kept). ``Http1Exchange`` goes over
a pooled HTTP/1.1 connection (``meshd.worker.upstream.http1``), ``H2Exchange`` over a
stream of a pooled HTTP/2 connection (``meshd.worker.upstream.h2``).

The client side supplies the sender (it knows where the body comes from) and, for
HTTP/1.1, the request head, built only for an attempt that goes HTTP/1.1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import gevent

from meshd.errors import BadRequest, UpstreamError
from meshd.proto import http1
from meshd.worker.upstream.http1 import Pool, UpstreamConn, read_response_head

if TYPE_CHECKING:
    from meshd.worker.upstream.h2 import H2Stream

Fields = list[tuple[bytes, bytes]]
Informational = Callable[[http1.ResponseHead], None]


class UpstreamExchange(Protocol):
    @property
    def protocol(self) -> str: ...            # "http1" | "h2"
    @property
    def endpoint(self) -> str: ...            # for error messages
    @property
    def reset_code(self) -> int | None: ...   # an HTTP/2 upstream's RST_STREAM code, once aborted

    def start(self) -> None: ...
    def response(self, try_deadline: float, deadline: float) -> int: ...
    def read(self, idle_timeout: float) -> bytes | None: ...
    @property
    def complete(self) -> bool: ...           # the body was read to its end
    @property
    def trailers(self) -> Fields: ...
    def finish(self) -> bool: ...
    def abort(self) -> None: ...


class Http1Exchange:
    """An attempt over an HTTP/1.1 connection. ``sender(conn, head)`` sends head and
    body and returns whether all of it went; without one the request is bodiless (sent
    by ``response``, again on a new connection when a reused one turns out closed)."""

    protocol = "http1"
    reset_code: int | None = None

    def __init__(self, pool: Pool, conn: UpstreamConn, head: bytes, method: bytes,
                 sender: Callable[[UpstreamConn, bytes], bool] | None, connect_timeout: float,
                 header_bytes: int, header_count: int,
                 informational: Informational | None = None, upgrade: bool = False) -> None:
        self.pool = pool
        self.method = method
        self.conn = conn
        self.head = head
        self.sender = sender
        self.connect_timeout = connect_timeout
        self.header_bytes = header_bytes
        self.header_count = header_count
        self.informational = informational  # told of 1xx heads other than 100 (else skipped)
        self.upgrade = upgrade              # a 101 is an answer (else an error)
        self.resp: http1.ResponseHead | None = None
        self.clean = True                   # the body ended by framing, not by close
        self._greenlet: gevent.Greenlet | None = None
        self._left = 0                      # of a Content-Length body
        self._decoder: http1.ChunkedDecoder | None = None
        self._trailers: Fields = []
        self._done = False

    @property
    def endpoint(self) -> str:
        return str(self.conn.endpoint)

    def start(self) -> None:
        if self.sender is not None:
            self._greenlet = gevent.spawn(self.sender, self.conn, self.head)

    def response(self, try_deadline: float, deadline: float) -> int:
        def read(conn: UpstreamConn) -> http1.ResponseHead:
            while True:
                resp = read_response_head(conn, try_deadline, deadline, self.header_bytes,
                                          self.header_count)
                if resp.status == 101:
                    if not self.upgrade:
                        raise UpstreamError(f"{conn.endpoint} switched protocols on an "
                                            "HTTP/2 request")
                    return resp
                if not 100 <= resp.status < 200:
                    return resp
                if resp.status != 100 and self.informational is not None:
                    self.informational(resp)

        if self._greenlet is None:
            self.conn, resp = self.pool.exchange_bodiless(self.conn, self.head,
                                                          self.connect_timeout, read)
        else:
            resp = read(self.conn)
        self.resp = resp
        if not http1.response_has_body(self.method, resp.status):
            self._done = True  # HEAD, 1xx, 204, 304: whatever the head says, no body
        elif resp.chunked:
            self._decoder = http1.ChunkedDecoder()
        elif resp.content_length is not None:
            self._left = resp.content_length
        else:
            self.clean = False
        return resp.status

    def read(self, idle_timeout: float) -> bytes | None:
        """The next piece of the body (chunked framing removed), None at its end."""
        conn = self.conn
        while not self._done:
            decoder = self._decoder
            if decoder is not None:
                try:
                    pieces = decoder.feed(conn.read_body(idle_timeout))
                except BadRequest as e:
                    raise UpstreamError(f"bad chunked body from upstream: {e.reason}") from None
                if decoder.done:
                    self._done = True
                    conn.buf += decoder.unconsumed
                    self._trailers = http1.forwardable_trailers(decoder.trailers)
                data = b"".join(pieces)
                if data:
                    return data
                continue
            if self.clean:  # Content-Length
                if self._left <= 0:
                    self._done = True
                    break
                data = conn.read_body(idle_timeout)
                if len(data) > self._left:
                    conn.buf += data[self._left:]
                    data = data[:self._left]
                self._left -= len(data)
                self._done = self._left <= 0
                return data
            data = conn.read_body(idle_timeout, False)  # until the upstream closes
            if data:
                return data
            self._done = True
        return None

    @property
    def complete(self) -> bool:
        """The body was read to its end."""
        return self._done

    @property
    def trailers(self) -> Fields:
        return self._trailers

    def finish(self) -> bool:
        """Whether the whole request was sent; the connection goes back to the pool when
        it can carry another request, else it is closed."""
        conn = self.conn
        g = self._greenlet
        if g is not None:
            g.join()
            if not g.successful() or g.value is not True:
                conn.close()
                return False
        resp = self.resp
        if resp is not None and resp.keep_alive and self.clean:
            self.pool.release(conn)
        else:
            conn.close()
        return True

    def abort(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()  # waits: the next attempt's sender reads the same source
        self.conn.close()  # the upstream sees the request cancelled


class H2Exchange:
    """An attempt over a stream of an HTTP/2 connection; ``sender(stream)`` sends the
    body (None: the head ended the stream)."""

    protocol = "h2"

    def __init__(self, stream: H2Stream, sender: Callable[[H2Stream], bool] | None) -> None:
        self.stream = stream
        self.sender = sender
        self.head: Fields = []
        self.reset_code: int | None = None
        self._greenlet: gevent.Greenlet | None = None

    @property
    def endpoint(self) -> str:
        return self.stream.upstream.name

    def start(self) -> None:
        if self.sender is not None:
            self._greenlet = gevent.spawn(self.sender, self.stream)

    def response(self, try_deadline: float, deadline: float) -> int:
        self.head = self.stream.response(try_deadline)
        return int(dict(self.head).get(b":status", b"502"))

    def read(self, idle_timeout: float) -> bytes | None:
        return self.stream.read(idle_timeout)

    @property
    def complete(self) -> bool:
        return self.stream.ended and not self.stream.buffered

    @property
    def trailers(self) -> Fields:
        return self.stream.trailers or []

    def finish(self) -> bool:
        g = self._greenlet
        if g is None:
            return True
        g.join()
        return g.successful() and g.value is True

    def abort(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
        self.reset_code = self.stream.reset_code
        self.stream.reset()  # the upstream sees the cancellation (a client's reset, a timeout)
