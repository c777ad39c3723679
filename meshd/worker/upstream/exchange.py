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
HTTP/1.1, the request head, built only for an attempt that goes HTTP/1.1. The sender
writes the body through the exchange whatever the upstream speaks (``send_body``:
decoded pieces, the end and trailers; the exchange frames them: Content-Length or
chunked, or DATA and HEADERS), and the client side relays the response through it the
same way: the head and trailers translated for the client's protocol
(``http1_head``/``http1_trailers``, ``h2_head``/``h2_trailers``, pure functions of
``meshd.proto.translate``), the body from ``read``.
"""

from __future__ import annotations

import http
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import gevent

from meshd.errors import BadRequest, NotSent, UpstreamError
from meshd.proto import http1
from meshd.proto.translate import (
    H1_TO_H2_DROP,
    MESHD_ERROR,
    h2_forward,
    h2_response,
    http1_response_fields,
    strip_meshd_error,
)
from meshd.worker.upstream.http1 import Pool, UpstreamConn, read_response_head

if TYPE_CHECKING:
    from meshd.worker.upstream.h2 import H2Stream

Fields = list[tuple[bytes, bytes]]
# What an HTTP/1.1 response's head loses on its way to an HTTP/1.1 client (besides the
# fields its Connection lists): hop-by-hop fields, Content-Length (framing is
# ``response_framing``'s) and an application's ``meshd-error``.
_RESPONSE_DROP = http1.STRIPPED | {MESHD_ERROR}
Informational = Callable[[http1.ResponseHead], None]
# The client side's body sender, run in its own greenlet: True when all of the body went.
Sender = Callable[["UpstreamExchange"], bool]


class Http1Head(NamedTuple):
    """A response head as an HTTP/1.1 client gets it, before ``response_framing``."""

    reason: bytes
    fields: Fields                # without hop-by-hop fields and the framing ones
    content_length: bytes | None  # the upstream's
    chunked: bool                 # the upstream sent it chunked


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

    # The request body, from the sender greenlet. ``send_body`` raises UpstreamError
    # when the upstream takes no more (its response, or the attempt's failure, tells
    # why), UpstreamTimeout when an HTTP/2 upstream opens no window in time.
    def send_body(self, pieces: Sequence[bytes], end: bool = False,
                  trailers: Sequence[tuple[bytes, bytes]] = ()) -> None: ...
    def stop_body(self) -> None: ...          # the client's body broke: the upstream stops

    # The response translated for the client's protocol (after ``response``).
    def http1_head(self) -> Http1Head: ...
    def http1_trailers(self) -> Fields: ...
    def h2_head(self) -> Fields: ...
    def h2_trailers(self) -> Fields: ...
    def skip_body(self) -> None: ...          # the client side will not read the body


class Http1Exchange:
    """An attempt over an HTTP/1.1 connection. ``sender(exchange)`` sends the body
    through ``send_body`` (the head goes with its first bytes) and returns whether all
    of it went; without one the request is bodiless (sent by ``response``, again on a
    new connection when a reused one turns out closed). ``chunked``, ``length``: the
    body's framing, as the head announces it."""

    protocol = "http1"
    reset_code: int | None = None

    def __init__(self, pool: Pool, conn: UpstreamConn, head: bytes, method: bytes,
                 sender: Sender | None, connect_timeout: float,
                 header_bytes: int, header_count: int,
                 informational: Informational | None = None, upgrade: bool = False,
                 chunked: bool = False, length: int | None = None) -> None:
        self.pool = pool
        self.method = method
        self.conn = conn
        self.head = head
        self.sender = sender
        self.chunked = chunked
        self.unsent = length          # body bytes the head announced and not yet sent
        self.head_sent = False
        self.not_sent: NotSent | None = None  # the first write failed: nothing went
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
        self.complete = False               # the body was read to its end

    @property
    def endpoint(self) -> str:
        return str(self.conn.endpoint)

    def start(self) -> None:
        if self.sender is not None:
            self._greenlet = gevent.spawn(self.sender, self)

    def send_body(self, pieces: Sequence[bytes], end: bool = False,
                  trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Pieces of the body in the head's framing, in one write with the head when it
        has not gone yet (with no pieces: the head alone, now); ``end`` adds the last
        chunk and the forwardable ``trailers`` to a chunked body. BadRequest for a body
        that would not match the Content-Length announced."""
        first = not self.head_sent
        out = [self.head] if first else []
        for piece in pieces:
            if self.unsent is not None:
                if len(piece) > self.unsent:
                    raise BadRequest("request body longer than its Content-Length")
                self.unsent -= len(piece)
            if piece:
                out.append(http1.encode_chunk(piece) if self.chunked else piece)
        if end:
            if self.unsent:
                raise BadRequest("request body shorter than its Content-Length")
            if self.chunked:
                kept = http1.forwardable_trailers(trailers)
                out.append(http1.encode_trailers(kept) if kept else http1.LAST_CHUNK)
        try:
            data = b"".join(out)
            if first:
                try:
                    sent = self.conn.send_first(data)
                except NotSent as e:
                    self.not_sent = e
                    self.conn.shutdown()  # the response wait ends, and tells why
                    raise
                self.head_sent = True  # from here on the request may have been processed
                data = data[sent:]
            if data:
                self.conn.sendall(data)
        except OSError as e:
            raise UpstreamError(f"{self.conn.endpoint} took no more of the request: "
                                f"{e.strerror or e}") from None
        if end:
            self.conn.request_sent = True

    def stop_body(self) -> None:
        self.conn.shutdown()  # the response wait ends

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
            try:
                resp = read(self.conn)
            except UpstreamError as e:
                if self.not_sent is not None:
                    raise self.not_sent from None
                if not self.head_sent:  # the connection failed before a byte of it went
                    raise NotSent(f"nothing sent: {e.reason}") from None
                raise
        self.resp = resp
        if not http1.response_has_body(self.method, resp.status):
            self.complete = True  # HEAD, 1xx, 204, 304: whatever the head says, no body
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
        while not self.complete:
            decoder = self._decoder
            if decoder is not None:
                try:
                    pieces = decoder.feed(conn.read_body(idle_timeout))
                except BadRequest as e:
                    raise UpstreamError(f"bad chunked body from upstream: {e.reason}") from None
                if decoder.done:
                    self.complete = True
                    conn.buf += decoder.unconsumed
                    self._trailers = http1.forwardable_trailers(decoder.trailers)
                data = b"".join(pieces)
                if data:
                    return data
                continue
            if self.clean:  # Content-Length
                if self._left <= 0:
                    self.complete = True
                    break
                data = conn.read_body(idle_timeout)
                if len(data) > self._left:
                    conn.buf += data[self._left:]
                    data = data[:self._left]
                self._left -= len(data)
                self.complete = self._left <= 0
                return data
            data = conn.read_body(idle_timeout, False)  # until the upstream closes
            if data:
                return data
            self.complete = True
        return None

    @property
    def trailers(self) -> Fields:
        return self._trailers

    def http1_head(self) -> Http1Head:
        resp = self.resp
        assert resp is not None
        # strip_hop_by_hop and strip_meshd_error in one pass (one ``lower`` per field)
        tokens = resp.connection_tokens
        drop = _RESPONSE_DROP | tokens if tokens else _RESPONSE_DROP
        fields = [field for field in resp.headers if field[0].lower() not in drop]
        length = None if resp.content_length is None else b"%d" % resp.content_length
        return Http1Head(resp.reason, fields, length, resp.chunked)

    def http1_trailers(self) -> Fields:
        return strip_meshd_error(self._trailers)

    def h2_head(self) -> Fields:
        assert self.resp is not None
        return h2_response(self.resp)

    def h2_trailers(self) -> Fields:
        return [(k.lower(), v) for k, v in self._trailers if k.lower() != MESHD_ERROR]

    def skip_body(self) -> None:
        pass  # ``read`` gives None already: the method or status says there is no body

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
    """An attempt over a stream of an HTTP/2 connection; ``sender(exchange)`` sends the
    body (None: the head ended the stream), each wait for a window bounded by
    ``idle_timeout``. ``meshed``: the upstream is a peer meshd, whose ``meshd-error`` is
    its own and passes on (an application's does not)."""

    protocol = "h2"

    def __init__(self, stream: H2Stream, sender: Sender | None, idle_timeout: float,
                 meshed: bool = False) -> None:
        self.stream = stream
        self.sender = sender
        self.idle_timeout = idle_timeout
        self.meshed = meshed
        self.head: Fields = []
        self.status = 502
        self.reset_code: int | None = None
        self._greenlet: gevent.Greenlet | None = None

    @property
    def endpoint(self) -> str:
        return self.stream.upstream.name

    def start(self) -> None:
        if self.sender is not None:
            self._greenlet = gevent.spawn(self.sender, self)

    def send_body(self, pieces: Sequence[bytes], end: bool = False,
                  trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Pieces as DATA; ``end`` sends the trailers (names lower-cased, the
        connection-specific ones left out) or an empty END_STREAM."""
        stream = self.stream
        for piece in pieces:
            if piece:
                stream.send_data(piece, timeout=self.idle_timeout)
        if end:
            kept = h2_forward([(k.lower(), v) for k, v in trailers])
            if kept:
                stream.send_trailers(kept)
            else:
                stream.end()

    def stop_body(self) -> None:
        self.stream.reset()

    def response(self, try_deadline: float, deadline: float) -> int:
        self.head = self.stream.response(try_deadline)
        self.status = int(dict(self.head).get(b":status", b"502"))
        return self.status

    def read(self, idle_timeout: float) -> bytes | None:
        return self.stream.read(idle_timeout)

    @property
    def complete(self) -> bool:
        return self.stream.ended and not self.stream.buffered

    @property
    def trailers(self) -> Fields:
        return self.stream.trailers or []

    def http1_head(self) -> Http1Head:
        fields, length = http1_response_fields(self.head if self.meshed
                                               else strip_meshd_error(self.head))
        return Http1Head(_phrase(self.status), fields, length, False)

    def http1_trailers(self) -> Fields:
        kept = [(k, v) for k, v in self.trailers if k not in H1_TO_H2_DROP]
        return kept if self.meshed else strip_meshd_error(kept)

    def h2_head(self) -> Fields:
        return h2_forward(self.head, self.meshed)

    def h2_trailers(self) -> Fields:
        return h2_forward(self.trailers, self.meshed)

    def skip_body(self) -> None:
        self.stream.reset()  # a body it might still send is not wanted: free the stream

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


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
