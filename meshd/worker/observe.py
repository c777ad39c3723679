"""The end of a proxied HTTP request for those who watch it: the access log's line, tap's
record and the tracer's span, in one call both client sides (HTTP/1.1 connection,
HTTP/2 stream) make from their ``finally``.

The request path tests once whether anyone watches (``worker.observing``: an access log,
or someone tapping; ``traced``: this request's span is recorded) and calls ``request``
only then: with none of them on, a request pays two attribute tests. What is passed is
what the request path already holds; each observer keeps a tuple of it and does its
formatting off the request path.

Byte counts (``received``, ``sent``) are a request's body bytes as the client saw them:
the body it sent (after HTTP/1.1 chunked decoding; HTTP/2 DATA payload, padding left
out) as far as meshd read it, once however many attempts it took, and the response body
meshd sent back (the upstream's, or meshd's own error answer), heads not counted; an
HTTP/1.1 tunnel (CONNECT, an upgrade such as WebSocket) counts the bytes it carried each
way. The client sides count them per read and per write, not per byte: the HTTP/1.1 one
on its connection (``HttpConnection.received`` / ``sent``), the HTTP/2 one on its stream
(``Stream.received`` / ``sent``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.call import Call
    from meshd.worker.context import Context
    from meshd.worker.peer import Peer
    from meshd.worker.tracing import Started
    from meshd.worker.upstream.exchange import UpstreamExchange


def request(worker: Context, listener: ListenerConfig, client: Callable[[], bytes],
            peer: Peer, service: str, route: str | None, method: bytes,
            authority: bytes | None, path: bytes, status: int, call: Call | None,
            started: float, headers: Sequence[tuple[bytes, bytes]],
            answered: UpstreamExchange | None, traced: Started | None, received: int,
            sent: int) -> None:
    """One finished request to each observer that is on. ``client``: the client's
    address, asked only by the access log; ``started``: the monotonic time the head
    arrived; ``headers``: as sent upstream (the access log reads the trace id there);
    ``answered``: the exchange whose response a gRPC request got (its grpc-status)."""
    alog = worker.access_log
    if alog is not None:
        alog.request(listener, client(), peer.client_id, method, authority, path, status,
                     call, started, headers, answered, received, sent)
    tap = worker.tap
    if tap is not None:
        tap.request(listener, service, peer, method, authority, path, status, call, started,
                    answered)
    if traced is not None:
        tracer = worker.tracer
        assert tracer is not None
        tracer.finish(traced, listener, service, route, method, authority, path, status,
                      call, peer, answered, received, sent)
