"""HTTP/1.1 <-> HTTP/2 translation of heads (RFC 9113 §8.2, §8.3), and the framing of a
response to an HTTP/1.1 client. Sans-IO: fields in, fields or bytes out.

One set says which fields no translation forwards: ``CONNECTION_SPECIFIC`` (RFC 9110
§7.6.1 hop-by-hop fields, which RFC 9113 §8.2.2 forbids on HTTP/2, HTTP2-Settings, and
meshd's own ``meshd-orig-proto`` marker), to which a translation adds ``FRAMED`` (Host
and Content-Length: each side writes its own) and HTTP/2 to HTTP/2 takes back ``te``
(allowed there as "trailers", which h2 validation holds it to).

``response_framing`` decides how a response reaches an HTTP/1.1 client, whatever the
upstream spoke: Content-Length when known, else chunked for an HTTP/1.1 client, else the
end of the connection (HTTP/1.0); a response without a body keeps its Content-Length
(not a 204's).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from meshd.proto import http1

Fields = list[tuple[bytes, bytes]]

ORIG_PROTO = b"meshd-orig-proto"  # on meshd-to-meshd HTTP/2: the client's own protocol
MESHD_ERROR = b"meshd-error"      # on meshd's own error answers: the reason

CONNECTION_SPECIFIC = http1.HOP_BY_HOP | {b"http2-settings", ORIG_PROTO}
FRAMED = frozenset([b"host", b"content-length"])
H1_TO_H2_DROP = CONNECTION_SPECIFIC | FRAMED | {b"expect"}  # 100-continue is answered here
H2_TO_H1_DROP = CONNECTION_SPECIFIC | FRAMED
H2_TO_H2_DROP = CONNECTION_SPECIFIC - {b"te"}
_RESPONSE_DROP = H2_TO_H1_DROP | {MESHD_ERROR}  # h2_response's, less the Connection tokens


def strip_meshd_error(headers: Iterable[tuple[bytes, bytes]]) -> Fields:
    """A response's (or its trailers') fields without ``meshd-error``: only meshd says
    that an answer is its own error. (An upstream that is a peer meshd keeps it: the peer
    removed its application's.)"""
    return [(k, v) for k, v in headers if k.lower() != MESHD_ERROR]


# -- requests ---------------------------------------------------------------------------

def h2_request(req: http1.RequestHead, https: bool, meshed: bool) -> Fields:
    """The HTTP/2 head of a request meshd's strict HTTP/1.1 parser accepted. Valid by
    construction (names are tokens, lower-cased; values hold no CR, LF or NUL and no
    surrounding whitespace; connection-specific fields dropped), so it skips the pool's
    check: tests/test_h2_headers.py holds that to meshd.proto.h2_headers on generated
    and mutated requests."""
    tokens = req.connection_tokens
    headers = [(b":method", req.method), (b":scheme", b"https" if https else b"http"),
               (b":authority", req.host or b""), (b":path", req.target)]
    headers += [(k.lower(), v) for k, v in req.headers
                if k.lower() not in H1_TO_H2_DROP and k.lower() not in tokens]
    if req.content_length is not None:
        headers.append((b"content-length", b"%d" % req.content_length))
    if any(k.lower() == b"te" and b"trailers" in v.lower() for k, v in req.headers):
        headers.append((b"te", b"trailers"))
    if meshed:
        headers.append((ORIG_PROTO, req.version))
    return headers


def join_cookies(fields: Fields) -> Fields:
    """RFC 9113 §8.2.3: cookie crumbs become one field for HTTP/1.1. Empty crumbs hold
    no cookie and are left out: joined, they would end the value with a space (found
    by fuzz/fuzz_h2_headers.py)."""
    cookies = [v for k, v in fields if k == b"cookie"]
    if len(cookies) < 2:
        return fields
    out = [(k, v) for k, v in fields if k != b"cookie"]
    out.append((b"cookie", b"; ".join([c for c in cookies if c])))
    return out


def http1_request(method: bytes, target: bytes, authority: bytes | None, fields: Fields,
                  length: int | None, bodiless: bool) -> tuple[bytes, bool]:
    """(the HTTP/1.1 head of an HTTP/2 request, whether its body goes chunked).
    ``fields``: the regular ones, cookies joined; ``length``: the content-length the
    server verified (it holds the DATA total to it), announced only when the request
    has a body or announces none, so a bodiless request never makes the upstream wait."""
    headers = [(k, v) for k, v in fields if k not in H2_TO_H1_DROP]
    framing = [(b"Host", authority or b"")]
    chunked = False
    if length is not None and not (bodiless and length):
        framing.append((b"Content-Length", b"%d" % length))
    elif not bodiless:
        chunked = True
        framing.append((b"Transfer-Encoding", b"chunked"))
    return http1.serialize_request_head(method, target, headers, framing), chunked


def h2_forward(headers: Sequence[tuple[bytes, bytes]], keep_meshd_error: bool = True) -> Fields:
    """An HTTP/2 head (or trailers) passed on to HTTP/2 as it is, connection-specific
    fields left out, and ``meshd-error`` unless it came from a peer meshd."""
    if keep_meshd_error:
        return [(k, v) for k, v in headers if k not in H2_TO_H2_DROP]
    return [(k, v) for k, v in headers if k not in H2_TO_H2_DROP and k != MESHD_ERROR]


# -- responses --------------------------------------------------------------------------

def h2_response(resp: http1.ResponseHead) -> Fields:
    """The HTTP/2 head of an HTTP/1.1 response: names lower-cased, connection-specific
    fields (and those its Connection lists) and ``meshd-error`` left out, its
    Content-Length kept when it frames a body (not a chunked one's, not a 1xx's or
    204's)."""
    tokens = resp.connection_tokens
    drop = _RESPONSE_DROP | tokens if tokens else _RESPONSE_DROP  # no set built per response
    headers = [(b":status", b"%d" % resp.status)]
    headers += [(name, v) for k, v in resp.headers if (name := k.lower()) not in drop]
    if resp.content_length is not None and resp.status != 204 and not (
            resp.chunked or (100 <= resp.status < 200)):
        headers.append((b"content-length", b"%d" % resp.content_length))
    return headers


def http1_response_fields(head: Sequence[tuple[bytes, bytes]]) -> tuple[Fields, bytes | None]:
    """(the fields of an HTTP/2 response head for HTTP/1.1, its content-length)."""
    fields = [(k, v) for k, v in head if not k.startswith(b":") and k not in H1_TO_H2_DROP]
    length = next((v for k, v in head if k == b"content-length"), None)
    return fields, length


def response_framing(method: bytes, status: int, version: bytes, keep: bool,
                     content_length: bytes | None, chunked: bool,
                     has_body: bool | None = None) -> tuple[Fields, bool, bool]:
    """How a response goes to an HTTP/1.1 client: (the framing fields to add, whether its
    body goes chunked, whether the connection stays). ``keep``: the request allows it;
    ``content_length``: the upstream's; ``chunked``: the upstream sent it chunked (it
    stays chunked, as meshd always has, even to an HTTP/1.0 client). ``has_body``:
    ``http1.response_has_body``, when the caller knows it already."""
    if has_body is None:
        has_body = http1.response_has_body(method, status)
    extra: Fields = []
    chunk_out = False
    if not has_body:
        if content_length is not None and status != 204:
            extra.append((b"Content-Length", content_length))
    elif content_length is not None and not chunked:
        extra.append((b"Content-Length", content_length))
    elif chunked or version == b"HTTP/1.1":
        chunk_out = True
        extra.append((b"Transfer-Encoding", b"chunked"))
    else:
        keep = False  # HTTP/1.0: the end of the body is the end of the connection
    if not keep:
        extra.append((b"Connection", b"close"))
    elif version == b"HTTP/1.0":
        extra.append((b"Connection", b"keep-alive"))
    return extra, chunk_out, keep
