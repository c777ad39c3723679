"""Fuzz target: HTTP/2 header rules (meshd.proto.h2_headers) and the request translations
between HTTP/2 and HTTP/1.1 (meshd.proto.translate: http1_request, an HTTP/2 client's
request to an HTTP/1.1 upstream; h2_request, an HTTP/1.1 client's request to an HTTP/2
upstream or a peer meshd).

The first byte picks the mode (low two bits) and flags (END_STREAM on HEADERS, https,
meshed). In the three header-list modes the rest is a header list: fields separated by
0xff, a field's name and value by its first 0xfe, 0xfd escaping the next byte.

Invariants:
- the rule functions return None or a str, never raise; trailer and response rules agree
  with h2's own validation (but for a :status that is not three digits, which h2 lets
  through); request rules may be stricter than h2's (issue 11 item 5);
- a request the rules accept, translated to HTTP/1.1, is accepted by meshd's strict
  HTTP/1.1 parser (the upstream's side) under the same field limit, with the same
  method, origin-form target, authority and fields, and framed as the HTTP/2 stream is:
  no body when HEADERS ended the stream, the declared Content-Length otherwise, else
  chunked;
- an HTTP/1.1 request the parser accepts, translated to HTTP/2, passes the request rules,
  and translated back to HTTP/1.1 it is the same request with the same framing.
"""

from __future__ import annotations

import h2.exceptions
import h2.utilities

from meshd.config import LimitsConfig
from meshd.errors import ProxyError
from meshd.proto import h2_headers, http1
from meshd.proto.h2_headers import request_problem, response_problem, trailers_problem
from meshd.proto.translate import H2_TO_H1_DROP, ORIG_PROTO, http1_request, join_cookies
from meshd.proto.translate import h2_request as request_head

MAX_LEN = 2048
HEADER_COUNT = LimitsConfig().header_count
Headers = list[tuple[bytes, bytes]]

_FLAGS = {
    "trailer": h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=True,
                                                  is_response_header=False, is_push_promise=False),
    "response": h2.utilities.HeaderValidationFlags(is_client=True, is_trailer=False,
                                                   is_response_header=True, is_push_promise=False),
}


def header_list(data: bytes) -> Headers:
    """Fields separated by 0xff, name and value by the first 0xfe, 0xfd escapes a byte."""
    fields: Headers = []
    parts: list[bytearray] = [bytearray()]
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        i += 1
        if c == 0xFD and i < n:
            parts[-1].append(data[i])
            i += 1
        elif c == 0xFE and len(parts) == 1:
            parts.append(bytearray())
        elif c == 0xFF:
            fields.append((bytes(parts[0]), bytes(parts[1]) if len(parts) > 1 else b""))
            parts = [bytearray()]
        else:
            parts[-1].append(c)
    if parts[0] or len(parts) > 1:
        fields.append((bytes(parts[0]), bytes(parts[1]) if len(parts) > 1 else b""))
    return fields


def encode_header_list(headers: Headers) -> bytes:
    """The inverse of ``header_list`` (for seeds and regression inputs)."""
    def esc(b: bytes) -> bytes:
        return b"".join(b"\xfd" + bytes((c,)) if c >= 0xFD else bytes((c,)) for c in b)
    return b"\xff".join(esc(n) + b"\xfe" + esc(v) for n, v in headers)


def one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    kind = mode & 3
    if kind == 3:
        _h1_to_h2(rest, https=bool(mode & 4), meshed=bool(mode & 8))
        return
    headers = header_list(rest)
    if kind == 0:
        _h2_to_h1(headers, bodiless=bool(mode & 4))
    elif kind == 1:
        _agrees(trailers_problem(headers), headers, "trailer")
    else:
        _agrees(response_problem(headers), headers, "response")


def _h2_accepts(headers: Headers, flags: h2.utilities.HeaderValidationFlags) -> bool:
    try:
        list(h2.utilities.validate_headers(headers, flags))
    except h2.exceptions.ProtocolError:
        return False
    return True


def _agrees(problem: str | None, headers: Headers, flags: str) -> None:
    assert problem is None or isinstance(problem, str)
    if problem is not None and problem.startswith("invalid :status"):
        return  # h2 does not check that :status is three digits; meshd does (§8.3.2)
    assert (problem is None) == _h2_accepts(headers, _FLAGS[flags]), (headers, problem)


def translate_h2(headers: Headers, bodiless: bool) -> tuple[bytes, bytes, bytes | None, bytes]:
    """(method, target, authority, HTTP/1.1 head) as H2ToHttp1.http1_exchange builds them."""
    pseudo = {k: v for k, v in headers if k.startswith(b":")}
    method = pseudo.get(b":method", b"GET")
    target = pseudo.get(b":path", b"/")
    fields = join_cookies([(k, v) for k, v in headers if not k.startswith(b":")])
    authority = pseudo.get(b":authority") or next((v for k, v in fields if k == b"host"), None)
    # the length as h2_server verified it (passed_on refused what it would refuse)
    head, _ = http1_request(method, target, authority, fields,
                            h2_headers.request_length(headers), bodiless)
    return method, target, authority, head


def passed_on(headers: Headers, bodiless: bool) -> bool:
    """Whether meshd's HTTP/2 server hands this request on (meshd.worker.h2_server)."""
    problem = request_problem(headers)
    assert problem is None or isinstance(problem, str)
    if problem is not None:
        return False
    # The HTTP/1.1 rules and the declared length (issue 11 items 5 and 2: the holes this
    # target found before h2_server applied them).
    if h2_headers.http1_problem(headers) is not None:
        return False
    try:
        length = h2_headers.request_length(headers)
    except ValueError:
        return False
    return not (bodiless and length)  # END_STREAM on HEADERS: a DATA total of 0 (§8.1.1)


def _h2_to_h1(headers: Headers, bodiless: bool) -> None:
    if not passed_on(headers, bodiless):
        return
    method, target, authority, head = translate_h2(headers, bodiless)
    fields = join_cookies([(k, v) for k, v in headers if not k.startswith(b":")])
    if method == b"CONNECT" or len(fields) > HEADER_COUNT:
        return  # answered 501 or 431 (H2ToHttp1.run), never translated
    try:
        # The same field limit as an HTTP/1.1 client's, and the two lines meshd adds
        # (Host for :authority, the body's framing).
        req = http1.parse_request_head(head, max_headers=HEADER_COUNT + 2)
    except ProxyError as e:
        raise AssertionError(f"translated request refused: {e.reason}: {head!r}") from None
    assert (req.method, req.target, req.host) == (method, target, authority or b""), (headers, head)
    # An HTTP/1.1 server takes the authority of an absolute-form target over Host (RFC
    # 9112 §3.2.2): only origin-form, or "*" for OPTIONS, means the same on both sides.
    assert target.startswith(b"/") or (target == b"*" and method == b"OPTIONS"), \
        f"not origin-form: {head!r}"
    length = next((v for k, v in headers if k == b"content-length"), None)
    if bodiless:
        assert not req.has_body, f"HEADERS ended the stream, the HTTP/1.1 head has a body: {head!r}"
    elif length is not None:
        assert req.content_length == int(length) and not req.chunked, head
    else:
        assert req.chunked, head
    sent = [(k, v) for k, v in req.headers
            if k.lower() not in (b"host", b"content-length", b"transfer-encoding")]
    assert sent == [(k, v) for k, v in fields if k not in H2_TO_H1_DROP], (headers, head)


def _h1_to_h2(data: bytes, https: bool, meshed: bool) -> None:
    data += http1.HEAD_END
    try:
        req = http1.parse_request_head(data[: data.find(http1.HEAD_END) + 4])
    except ProxyError:
        return
    if req.method == b"CONNECT":
        return  # tunneled, never translated
    headers = request_head(req, https, meshed)
    problem = request_problem(headers)
    assert problem is None, (req, headers, problem)
    assert all(k == k.lower() for k, _ in headers)
    # On the peer meshd, back to HTTP/1.1: the same request, framed the same way.
    if meshed:
        headers = [(k, v) for k, v in headers if k != ORIG_PROTO]
    method, target, authority, head = translate_h2(headers, bodiless=not req.has_body)
    back = http1.parse_request_head(head)
    assert (back.method, back.target, back.host) == (req.method, req.target, req.host or b"")
    assert (back.content_length or 0, back.chunked) == (req.content_length or 0, req.chunked), \
        (req, back)
