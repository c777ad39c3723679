"""A client's HTTP/1.1 request body on its way upstream, kept for replay while small.

The body is read from the client only as the upstream takes it. Pieces are kept
decoded (chunked framing removed) and framed again for each attempt's upstream, so a
retry may go to an HTTP/1.1 endpoint (Content-Length or chunked again, trailers
included) or an HTTP/2 one (DATA frames, trailers as HEADERS). Each attempt's sender
greenlet sends what earlier attempts already read from ``kept``, then goes on reading
from the client. Bodies of a replayable request are kept up to ``REPLAY_LIMIT`` bytes;
past that the body is no longer replayable and nothing more is kept. A piece is kept
before it is sent, and a sender is only killed while it waits in recv or send, so
killing one for a retry loses no byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from meshd.balance.retry import MAX_REPLAY_BODY
from meshd.errors import ProxyError
from meshd.proto import http1

if TYPE_CHECKING:
    from meshd.worker.upstream.h2 import H2Stream
    from meshd.worker.upstream.http1 import UpstreamConn

REPLAY_LIMIT = MAX_REPLAY_BODY  # request bodies up to this size are kept for a retry
READ_SIZE = 262144


class ClientGone(Exception):
    """The client closed or reset its connection: nothing to answer."""


class BodySource(Protocol):
    """The client connection the body is read from."""

    buf: bytearray                       # bytes read past the request head
    _body_error: BaseException | None    # set when reading the body failed

    def _recv_body(self, size: int = READ_SIZE) -> bytes: ...


class RequestBody:
    __slots__ = ("source", "kept", "kept_bytes", "replayable", "started", "done", "decoder",
                 "remaining", "trailers")

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

    # -- to an HTTP/1.1 upstream ---------------------------------------------------------

    def send(self, up: UpstreamConn, head: bytes) -> bool:
        """Send head and body upstream in HTTP/1.1 framing (the request's own: chunked
        stays chunked). True when all of it was sent; on a client error (gone, too slow,
        bad chunking) the upstream socket is shut down so the response wait ends, and
        the error is left for the proxy in ``_body_error``."""
        out = [head, *map(self._frame, self.kept)]
        try:
            if self.source.buf and not self.done:
                out.append(self._frame(self._next()))
            while True:
                if self.done and self.decoder is not None:
                    kept = self.trailers
                    out.append(http1.encode_trailers(kept) if kept else http1.LAST_CHUNK)
                try:
                    up.sendall(b"".join(out))
                except OSError:
                    return False  # the upstream stopped reading: its response tells why
                if self.done:
                    up.request_sent = True
                    return True
                out = [self._frame(self._next())]
        except (ClientGone, ProxyError) as e:
            self.source._body_error = e
            up.shutdown()
            return False

    def _frame(self, piece: bytes) -> bytes:
        return http1.encode_chunk(piece) if self.decoder is not None and piece else piece

    # -- to an HTTP/2 upstream -----------------------------------------------------------

    def send_h2(self, stream: H2Stream, idle_timeout: float) -> bool:
        """The body as DATA frames, then trailers (or an empty END_STREAM)."""
        from meshd.errors import UpstreamError
        try:
            for piece in self.kept:
                stream.send_data(piece, timeout=idle_timeout)
            while not self.done:
                piece = self._next()
                if piece:
                    stream.send_data(piece, timeout=idle_timeout)
            if self.trailers:
                stream.send_trailers([(k.lower(), v) for k, v in self.trailers])
            else:
                stream.end()
            return True
        except (ClientGone, ProxyError) as e:
            if isinstance(e, UpstreamError):
                return False  # the upstream side failed: its response (or reset) tells why
            self.source._body_error = e
            stream.reset()
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
                data = source._recv_body(min(self.remaining, READ_SIZE))
            self.remaining -= len(data)
            self.done = self.remaining <= 0
        else:
            decoder = self.decoder
            if source.buf:
                raw = bytes(source.buf)
                source.buf.clear()
            else:
                raw = source._recv_body()
            data = b"".join(decoder.feed(raw))
            if decoder.done:
                self.trailers = http1.forwardable_trailers(decoder.trailers)
                source.buf += decoder.unconsumed
                self.done = True
        if self.replayable and data:
            self.kept.append(data)
            self.kept_bytes += len(data)
            if self.kept_bytes > REPLAY_LIMIT:
                self.replayable = False
                self.kept = []
        return data
