"""A client's HTTP/1.1 request body on its way upstream, kept for replay while small.

The body is read from the client (a ``BodySource``: the connection's buffer, then its
``recv_body``) only as the upstream takes it. Pieces are kept decoded (chunked framing
removed) and framed again by each attempt's exchange (``UpstreamExchange.send_body``),
so a retry may go to an HTTP/1.1 endpoint (Content-Length or chunked again, trailers
included) or an HTTP/2 one (DATA frames, trailers as HEADERS). Each attempt's sender
greenlet (``send``) sends what earlier attempts already read from ``kept``, then goes on reading
from the client. Bodies are kept up to ``REPLAY_LIMIT`` bytes, whatever the method (a
stream an HTTP/2 peer refused, or a request whose first write failed, is sent again
even when it is not idempotent); past that the body is no longer replayable and
nothing more is kept. A piece is kept
before it is sent, and a sender is only killed while it waits in recv or send, so
killing one for a retry loses no byte. A failure to read the body is kept in ``error``
for the proxy's answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from meshd.balance.retry import MAX_REPLAY_BODY
from meshd.errors import ProxyError, UpstreamError
from meshd.proto import http1

if TYPE_CHECKING:
    from meshd.worker.upstream.exchange import UpstreamExchange

REPLAY_LIMIT = MAX_REPLAY_BODY  # request bodies up to this size are kept for a retry
READ_SIZE = 262144


class ClientGone(Exception):
    """The client closed or reset its connection: nothing to answer."""


class BodySource(Protocol):
    """The client connection the body is read from."""

    buf: bytearray  # bytes read past the request head, taken first
    received: int   # the request's body bytes read so far (meshd.worker.observe)

    def recv_body(self, size: int) -> bytes:
        """Body bytes from the client (at most ``size``); ClientGone when it left,
        a ProxyError (RequestTimeout) when it sent nothing in time."""
        ...


class RequestBody:
    __slots__ = ("source", "kept", "kept_bytes", "replayable", "started", "done", "decoder",
                 "remaining", "trailers", "error")

    def __init__(self, source: BodySource, req: http1.RequestHead, replay: bool) -> None:
        self.source = source
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        self.replayable = replay and (req.chunked or (req.content_length or 0) <= REPLAY_LIMIT)
        self.started = False          # some of it has left the client's buffer
        self.done = False
        self.decoder = http1.ChunkedDecoder() if req.chunked else None
        self.remaining = req.content_length or 0
        self.trailers: list[tuple[bytes, bytes]] = []  # forwardable ones, when chunked
        # Why reading it from the client failed (gone, too slow, bad chunking), for the
        # proxy's answer; None while it has not.
        self.error: BaseException | None = None

    def send(self, ex: UpstreamExchange) -> bool:
        """The body upstream through the exchange (an attempt's sender): what earlier
        attempts kept, then on from the client. True when all of it was sent; on a
        client error the exchange is told to stop (the response wait ends) and the error
        is kept in ``error``."""
        try:
            pieces = list(self.kept)
            if self.source.buf and not self.done:  # goes with the head, in one write
                pieces.append(self._next())
            while True:
                ex.send_body(pieces, self.done, self.trailers)
                if self.done:
                    return True
                pieces = [self._next()]
        except UpstreamError:
            return False  # the upstream stopped reading: its response tells why
        except (ClientGone, ProxyError) as e:
            self.error = e
            ex.stop_body()
            return False

    # -- from the client -----------------------------------------------------------------

    def _next(self) -> bytes:
        """The next decoded piece of the body from the client (kept when the body is
        replayable). May be empty while a chunked body's framing arrives."""
        source = self.source
        self.started = True
        if self.decoder is None:
            if source.buf:
                take = min(len(source.buf), self.remaining)
                data = bytes(source.buf[:take])
                del source.buf[:take]
            else:
                data = source.recv_body(min(self.remaining, READ_SIZE))
            self.remaining -= len(data)
            self.done = self.remaining <= 0
        else:
            decoder = self.decoder
            if source.buf:
                raw = bytes(source.buf)
                source.buf.clear()
            else:
                raw = source.recv_body(READ_SIZE)
            data = b"".join(decoder.feed(raw))
            if decoder.done:
                self.trailers = http1.forwardable_trailers(decoder.trailers)
                source.buf += decoder.unconsumed
                self.done = True
        source.received += len(data)  # once, as the client sent it (decoded)
        if self.replayable and data:
            self.kept.append(data)
            self.kept_bytes += len(data)
            if self.kept_bytes > REPLAY_LIMIT:
                self.replayable = False
                self.kept = []
        return data
