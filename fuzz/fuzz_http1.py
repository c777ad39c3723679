"""Fuzz target: the HTTP/1.1 core (meshd.proto.http1).

The first byte picks what the rest is: a request head, a response head, or a chunked
body (its value mod 3; the rest of it picks the limits: the defaults or small ones).

Invariants:
- a request fault is only ``BadRequest`` (400/414/431) or ``NotImplementedByProxy`` (501),
  a response fault only ``UpstreamError`` (502), a chunked fault only ``BadRequest``;
- a parsed head is well formed (token method, framing never two ways, values without CTLs
  or surrounding whitespace) and round-trips: serialized and parsed again, it is equal;
- what a proxy forwards keeps no hop-by-hop field, and an absolute-form target splits
  into an authority and an origin-form target that parse again;
- a chunked body decodes the same whatever the split into feeds (data, trailers, end,
  bytes after the end, or the error), never to more data than it was given, and the
  decoded body re-encoded decodes to the same data and trailers.
"""

from __future__ import annotations

from meshd.errors import BadRequest, NotImplementedByProxy, UpstreamError
from meshd.proto import http1

MAX_LEN = 4096
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_CTL = frozenset([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    kind = mode % 3
    if kind == 0:
        _request(_head(rest), *_limits(mode >> 2))
    elif kind == 1:
        _response(_head(rest), _limits(mode >> 2)[1])
    else:
        _chunked(mode >> 2, rest)


def _limits(control: int) -> tuple[int, int]:
    """(max_request_line, max_headers): the defaults, or small ones to reach 414 and 431."""
    if not control & 1:
        return 8192, 100
    return 4 + (control >> 1) * 4, (control >> 1) % 6


def _head(data: bytes) -> bytes:
    """The bytes a connection hands the parser: up to and including the first empty line."""
    data += http1.HEAD_END
    return data[: data.find(http1.HEAD_END) + 4]


def _check_fields(headers: list[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        assert name and set(name) <= _TOKEN, name
        assert not set(value) & _CTL, value
        assert value[:1] not in (b" ", b"\t") and value[-1:] not in (b" ", b"\t"), value


def _with_version(head: bytes, version: bytes) -> bytes:
    """A head serialized as HTTP/1.1 (as meshd always sends), with the first line's
    version put back to ``version``."""
    eol = head.index(b"\r\n")
    line = head[:eol]
    if line.startswith(b"HTTP/1.1 "):
        line = version + line[8:]
    else:
        assert line.endswith(b" HTTP/1.1")
        line = line[:-8] + version
    return line + head[eol:]


def _request(head: bytes, max_line: int, max_headers: int) -> None:
    try:
        req = http1.parse_request_head(head, max_request_line=max_line, max_headers=max_headers)
    except (BadRequest, NotImplementedByProxy) as e:
        assert e.status in (400, 414, 431, 501), e.status
        assert isinstance(e.reason, str) and e.reason
        return
    assert set(req.method) <= _TOKEN and req.method
    assert req.target and all(0x21 <= c <= 0x7E for c in req.target)
    assert req.version in (b"HTTP/1.0", b"HTTP/1.1")
    _check_fields(req.headers)
    assert not (req.chunked and req.content_length is not None)
    assert req.content_length is None or 0 <= req.content_length <= 2**63 - 1
    if req.version == b"HTTP/1.1":
        assert req.host is not None
    else:
        assert not req.chunked and req.upgrade is None and not req.expect_continue

    assert len(req.headers) <= max_headers
    again = http1.parse_request_head(
        _with_version(http1.serialize_request_head(req.method, req.target, req.headers),
                      req.version), max_request_line=max_line + 2, max_headers=max_headers)
    assert again == req, (req, again)

    forwarded = http1.strip_hop_by_hop(req.headers, req.connection_tokens)
    for name, _ in forwarded:
        lname = name.lower()
        assert lname not in http1.HOP_BY_HOP and lname != b"content-length"
        assert lname not in req.connection_tokens

    try:
        split = http1.split_absolute_form(req.target)
    except BadRequest:
        return
    if split is not None:
        authority, path = split
        assert b"@" not in authority and path.startswith(b"/")
        http1.parse_request_head(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, authority))


def _response(head: bytes, max_headers: int) -> None:
    try:
        resp = http1.parse_response_head(head, max_headers=max_headers)
    except UpstreamError as e:
        assert e.status == 502 and e.reason.startswith("invalid response from upstream: ")
        return
    assert resp.version in (b"HTTP/1.0", b"HTTP/1.1")
    assert 100 <= resp.status <= 599
    _check_fields(resp.headers)
    assert not (resp.chunked and resp.content_length is not None)
    assert resp.content_length is None or 0 <= resp.content_length <= 2**63 - 1
    if resp.chunked:
        assert resp.version == b"HTTP/1.1"
    if b"close" in resp.connection_tokens or (
            resp.version == b"HTTP/1.0" and b"keep-alive" not in resp.connection_tokens):
        assert not resp.keep_alive
    for method in (b"GET", b"HEAD", b"CONNECT"):
        http1.response_has_body(method, resp.status)

    serialized = http1.serialize_response_head(resp.status, resp.reason, resp.headers)
    assert len(resp.headers) <= max_headers
    again = http1.parse_response_head(_with_version(serialized, resp.version),
                                      max_headers=max_headers)
    if not resp.reason:  # an empty reason is sent as the standard phrase
        assert again.reason
        again.reason = b""
    assert again == resp, (resp, again)


def _decode(body: bytes, sizes: list[int], max_line: int, max_trailer: int
            ) -> tuple[bytes, list[tuple[bytes, bytes]], bool, bytes] | str:
    """(data, trailers, done, unconsumed) of ``body`` fed in pieces of ``sizes`` (cycled),
    or the error's reason."""
    dec = http1.ChunkedDecoder(max_line=max_line, max_trailer_bytes=max_trailer)
    out: list[bytes] = []
    pos, i = 0, 0
    try:
        while pos < len(body):
            n = sizes[i % len(sizes)]
            i += 1
            for piece in dec.feed(body[pos : pos + n]):
                assert type(piece) is bytes and piece
                out.append(piece)
            pos += n
    except BadRequest as e:
        assert e.status == 400
        return e.reason
    data = b"".join(out)
    assert len(data) <= len(body)
    if dec.done:
        assert body.endswith(dec.unconsumed)
    return data, dec.trailers, dec.done, dec.unconsumed if dec.done else b""


def _chunked(control: int, body: bytes) -> None:
    small = control & 1
    max_line = 4 + (control >> 1) % 24 if small else 4096
    max_trailer = 8 + (control >> 1) * 3 if small else 16384
    whole = _decode(body, [len(body) or 1], max_line, max_trailer)
    for sizes in ([1], [2, 1, 3], [7, 64, 5]):
        split = _decode(body, sizes, max_line, max_trailer)
        # The same error, though it may be found at another point (a line too long is
        # seen before its end arrives).
        if isinstance(whole, str) or isinstance(split, str):
            assert isinstance(whole, str) and isinstance(split, str), (sizes, whole, split)
        else:
            assert split == whole, (sizes, whole, split)
    if isinstance(whole, str) or not whole[2]:
        return
    data, trailers, _, _ = whole
    encoded = (http1.encode_chunk(data) if data else b"") + (
        http1.encode_trailers(trailers) if trailers else http1.LAST_CHUNK)
    again = _decode(encoded + b"tail", [len(encoded) + 4], 4096, 16384 + 2 * len(encoded))
    assert again == (data, trailers, True, b"tail"), (whole, again)
