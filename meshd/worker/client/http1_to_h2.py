"""An HTTP/1.1 client's request sent to an HTTP/2 upstream (the attempt itself is
``meshd.worker.call.Call.attempt`` over an ``H2Exchange``): an endpoint of a service
with ``protocol = "h2"``, or a peer meshd's inbound listener (meshd-to-meshd: requests
from many client connections share one multiplexed connection per peer, and carry
``meshd-orig-proto: HTTP/1.1`` so the peer knows what the client spoke).

Translation (RFC 9113 §8.2, §8.3): the request line and Host become pseudo-headers,
hop-by-hop fields are dropped and names lower-cased, the body goes as DATA (its
chunked framing removed, its trailers as trailing HEADERS). The response head becomes
an HTTP/1.1 status line with Content-Length when the upstream gave one and chunked
otherwise (trailers, when the client speaks HTTP/1.1), or a close-delimited body for
an HTTP/1.0 client.
"""

from __future__ import annotations

import http
from typing import TYPE_CHECKING

from meshd.proto import http1
from meshd.worker.call import ORIG_PROTO, strip_meshd_error

if TYPE_CHECKING:
    from meshd.worker.client.http1 import HttpConnection
    from meshd.worker.upstream.exchange import H2Exchange

# Never sent on HTTP/2 (RFC 9113 §8.2.2), or framed by meshd itself.
_DROP = frozenset([b"host", b"content-length", b"transfer-encoding", b"te", b"expect",
                   b"keep-alive", b"proxy-connection", b"connection", b"upgrade",
                   b"http2-settings", ORIG_PROTO])


def request_head(req: http1.RequestHead, https: bool, meshed: bool) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 head of a request meshd's strict HTTP/1.1 parser accepted. Valid by
    construction (names are tokens, lower-cased; values hold no CR, LF or NUL and no
    surrounding whitespace; connection-specific fields dropped), so it skips the pool's
    check: tests/test_h2_headers.py holds that to meshd.proto.h2_headers on generated
    and mutated requests."""
    tokens = req.connection_tokens
    headers = [(b":method", req.method), (b":scheme", b"https" if https else b"http"),
               (b":authority", req.host or b""), (b":path", req.target)]
    headers += [(k.lower(), v) for k, v in req.headers
                if k.lower() not in _DROP and k.lower() not in tokens]
    if req.content_length is not None:
        headers.append((b"content-length", b"%d" % req.content_length))
    if any(k.lower() == b"te" and b"trailers" in v.lower() for k, v in req.headers):
        headers.append((b"te", b"trailers"))
    if meshed:
        headers.append((ORIG_PROTO, req.version))
    return headers


def relay_h2_response(conn: HttpConnection, req: http1.RequestHead, ex: H2Exchange,
                      status: int, idle_timeout: float, meshed: bool) -> bool:
    """The response of an HTTP/2 upstream to the HTTP/1.1 client. Returns whether its
    connection stays."""
    up = ex.stream
    head = ex.head if meshed else strip_meshd_error(ex.head)  # a peer meshd's is its own
    keep = req.keep_alive and not conn.worker.draining
    fields = [(k, v) for k, v in head if not k.startswith(b":") and k not in _DROP]
    length = next((v for k, v in head if k == b"content-length"), None)
    has_body = http1.response_has_body(req.method, status)
    extra: list[tuple[bytes, bytes]] = []
    chunked = False
    if length is not None and (has_body or status != 204):
        extra.append((b"Content-Length", length))
    elif has_body:
        if req.version == b"HTTP/1.1":
            chunked = True
            extra.append((b"Transfer-Encoding", b"chunked"))
        else:
            keep = False  # HTTP/1.0: the end of the body is the end of the connection
    if not keep:
        extra.append((b"Connection", b"close"))
    elif req.version == b"HTTP/1.0":
        extra.append((b"Connection", b"keep-alive"))
    try:
        reason = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    out = [http1.serialize_response_head(status, reason, fields, extra)]
    conn.response_started = True
    if has_body:
        while (data := up.read(idle_timeout)) is not None:
            out.append(http1.encode_chunk(data) if chunked else data)
            conn._send(b"".join(out))
            out = []
        if chunked:
            trailers = [(k, v) for k, v in (up.trailers or []) if k not in _DROP]
            if not meshed:
                trailers = strip_meshd_error(trailers)
            out.append(http1.encode_trailers(trailers) if trailers else http1.LAST_CHUNK)
    else:
        up.reset()  # HEAD, 204, 304: a body the upstream might still send is not wanted
    if out:
        conn._send(b"".join(out))
    return keep
