"""meshd.proto.h2_headers against h2's own header validation: meshd turns h2's checks off
and runs these instead, so on any header list both must accept or both refuse."""

from __future__ import annotations

import h2.exceptions
import h2.utilities
import pytest
from hypothesis import HealthCheck, assume, example, given, reject, settings
from hypothesis import strategies as st
from test_http1 import INTERESTING, request_heads

from meshd.errors import ProxyError
from meshd.proto.h2_headers import (
    http1_fields_problem,
    http1_problem,
    request_length,
    request_problem,
    trailers_problem,
)
from meshd.proto.http1 import parse_request_head
from meshd.proto.translate import h2_request as request_head
from meshd.proto.translate import http1_request, join_cookies

REQUEST = h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=False,
                                             is_response_header=False, is_push_promise=False)
TRAILER = h2.utilities.HeaderValidationFlags(is_client=False, is_trailer=True,
                                             is_response_header=False, is_push_promise=False)


def h2_accepts(headers: list[tuple[bytes, bytes]], flags: h2.utilities.HeaderValidationFlags) -> bool:
    try:
        list(h2.utilities.validate_headers(headers, flags))
    except h2.exceptions.ProtocolError:
        return False
    return True


GOOD = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=c"),
        (b":authority", b"web:8080"), (b"user-agent", b"curl/8"), (b"te", b"trailers")]

# Names and values likely to matter: every pseudo-header, the connection-specific and
# special fields, and bytes at the edges of what is allowed.
names = st.sampled_from([
    b":method", b":scheme", b":path", b":authority", b":protocol", b":status", b":custom",
    b"host", b"te", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
    b"upgrade", b"x-a", b"cookie", b"content-length", b"X-Upper", b"x a", b"x:a", b"x\na",
    b"", b"x\x7f", b"\xc3\xa9", b"x-\x00"]) | st.binary(min_size=0, max_size=6)
values = st.sampled_from([
    b"GET", b"CONNECT", b"POST", b"http", b"/", b"", b"web", b"trailers", b"Trailers",
    b"trailers, deflate", b" 1", b"1\t", b"a\x00b", b"1\r\nx: y", b"websocket", b"a b",
    b"\xff"]) | st.binary(min_size=0, max_size=6)
header_lists = st.lists(st.tuples(names, values), max_size=8)


def mutated(base: list[tuple[bytes, bytes]]) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """A valid request head with fields dropped, replaced, duplicated or inserted."""
    def apply(ops: list[tuple[int, int, tuple[bytes, bytes]]]) -> list[tuple[bytes, bytes]]:
        out = list(base)
        for op, where, field in ops:
            i = where % (len(out) + 1)
            if op == 0 and out:
                del out[i % len(out)]
            elif op == 1 and out:
                out[i % len(out)] = field
            elif op == 2 and out:
                out.insert(i, out[i % len(out)])
            else:
                out.insert(i, field)
        return out
    return st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20), st.tuples(names, values)),
                    min_size=1, max_size=3).map(apply)


@settings(max_examples=1500, deadline=None)
@given(header_lists | mutated(GOOD))
def test_request_rules_agree_with_h2(headers):
    assert (request_problem(headers) is None) == h2_accepts(headers, REQUEST), \
        (headers, request_problem(headers))


@settings(max_examples=800, deadline=None)
@given(header_lists)
def test_trailer_rules_agree_with_h2(headers):
    assert (trailers_problem(headers) is None) == h2_accepts(headers, TRAILER), \
        (headers, trailers_problem(headers))


@pytest.mark.parametrize("headers,reason", [
    (GOOD, None),
    ([*GOOD, (b"X-Upper", b"1")], "invalid field name"),
    ([*GOOD, (b"x-a", b"1\r\nx-b: 2")], "invalid value"),
    ([*GOOD, (b"connection", b"close")], "connection-specific"),
    ([*GOOD, (b"te", b"gzip")], "TE other than"),
    ([*GOOD[:2], *GOOD[3:], GOOD[2]], "after a regular field"),
    ([GOOD[0], *GOOD], "duplicate pseudo-header"),
    ([(b":method", b"CONNECT"), (b":authority", b"db:5432")], None),
    ([(b":method", b"CONNECT"), (b":authority", b"db:5432"), (b":path", b"/")], "CONNECT with"),
    ([*GOOD[:3], (b"host", b"other")], None),
    ([*GOOD, (b"host", b"other")], ":authority and Host differ"),
    (GOOD[:3], "neither :authority nor Host"),
])
def test_reasons(headers, reason):
    problem = request_problem(headers)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and reason in problem, problem


# The HTTP/2 head meshd builds from an HTTP/1.1 request its strict parser accepted skips
# the pool's check (meshd.proto.translate.h2_request): it must be valid by construction.

def _check_translated(head: bytes, https: bool, meshed: bool) -> bool:
    """The translation of ``head`` is valid HTTP/2; False when the parser refused the
    head (there is nothing to translate)."""
    try:
        req = parse_request_head(head[: head.find(b"\r\n\r\n") + 4])
    except ProxyError:
        return False
    assume(req.method != b"CONNECT")  # tunneled, never translated
    translated = request_head(req, https, meshed)
    assert request_problem(translated) is None, (head, translated, request_problem(translated))
    return True


# Most generated heads are ones the strict parser refuses (rejected: nothing to
# translate), so hypothesis's filter health check is off for this one.
@settings(max_examples=800, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(request_heads(), st.booleans(), st.booleans())
def test_heads_translated_from_http1_are_valid_http2(head: bytes, https: bool, meshed: bool):
    if not _check_translated(head, https, meshed):
        reject()


# Mutations mostly make heads the parser refuses: those are rejected, so that the
# examples counted are translations.
@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(request_heads(), st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(INTERESTING)),
                                 min_size=1, max_size=3), st.booleans(), st.booleans())
def test_mutated_heads_translated_from_http1_are_valid_http2(head: bytes, edits, https: bool,
                                                            meshed: bool):
    data = bytearray(head)
    for where, what in edits:
        at = where % (len(data) + 1)
        data[at:at] = what
    assume(b"\r\n\r\n" in data)
    if not _check_translated(bytes(data), https, meshed):
        reject()


# An HTTP/2 request translated to HTTP/1.1 (meshd.proto.translate.http1_request) is held first to what
# the HTTP/1.1 parser accepts (http1_problem): then the translation parses back, with the
# parser meshd applies to its own clients, as the same request, never as another one.

@pytest.mark.parametrize("headers,reason", [
    (GOOD, None),
    ([(b":method", b"GET /admin?x="), *GOOD[1:]], "invalid :method"),
    ([(b":method", b"G\x01T"), *GOOD[1:]], "control character"),
    ([*GOOD[:2], (b":path", b"/a b"), *GOOD[3:]], "invalid :path"),
    ([*GOOD[:2], (b":path", b"http://other-host/admin"), *GOOD[3:]], "invalid :path"),
    ([*GOOD[:2], (b":path", b"admin"), *GOOD[3:]], "invalid :path"),
    ([*GOOD[:2], (b":path", b"*"), *GOOD[3:]], "outside OPTIONS"),
    ([(b":method", b"OPTIONS"), *GOOD[1:2], (b":path", b"*"), *GOOD[3:]], None),
    ([*GOOD[:3], (b":authority", b"web@evil.example"), *GOOD[4:]], "invalid :authority"),
    ([*GOOD[:3], (b":authority", b"web/x"), *GOOD[4:]], "invalid :authority"),
    ([*GOOD[:3], (b"host", b"a b")], "invalid host"),
    ([*GOOD, (b"x-a", b"1\x0b2")], "control character"),
    ([*GOOD, (b"x-a", b"1\x7f")], "control character"),
    ([*GOOD, (b"x-a", b"tab\tinside \xff")], None),
    ([*GOOD, (b"x(a", b"1")], "field name"),
])
def test_http1_reasons(headers, reason):
    assert request_problem(headers) is None  # all valid HTTP/2
    problem = http1_problem(headers)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and reason in problem, problem


def test_http1_rules_for_trailers():
    assert http1_fields_problem([(b"grpc-status", b"0"), (b"x-t", b"a\tb")]) is None
    assert "control character" in http1_fields_problem([(b"x-t", b"a\x0bb")])  # type: ignore[operator]
    assert "field name" in http1_fields_problem([(b"x{t}", b"1")])  # type: ignore[operator]


@pytest.mark.parametrize("headers,length", [
    (GOOD, None), ([*GOOD, (b"content-length", b"43")], 43),
    ([*GOOD, (b"content-length", b"0"), (b"content-length", b"0")], 0),
    ([*GOOD, (b"content-length", b"1"), (b"content-length", b"2")], ValueError),
    ([*GOOD, (b"content-length", b"+1")], ValueError),
    ([*GOOD, (b"content-length", b"")], ValueError),
    ([*GOOD, (b"content-length", b"1" * 20)], ValueError),
])
def test_request_length(headers, length):
    if length is ValueError:
        with pytest.raises(ValueError):
            request_length(headers)
    else:
        assert request_length(headers) == length


def _translated(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The HTTP/1.1 head meshd sends upstream for an HTTP/2 request (as
    H2ToHttp1.http1_exchange builds it, bodiless)."""
    pseudo = {k: v for k, v in headers if k.startswith(b":")}
    fields = join_cookies([(k, v) for k, v in headers if not k.startswith(b":")])
    authority = pseudo.get(b":authority") or next((v for k, v in fields if k == b"host"), None)
    head, _ = http1_request(pseudo[b":method"], pseudo[b":path"], authority, fields,
                            request_length(headers), True)
    return head


requests = st.builds(
    lambda m, p, a, extra: [(b":method", m), (b":scheme", b"http"), (b":path", p),
                            (b":authority", a), *extra],
    st.sampled_from([b"GET", b"OPTIONS", b"GET /admin?x=", b"G\x01T", b"M-SEARCH"]) | st.binary(
        min_size=1, max_size=6),
    st.sampled_from([b"/", b"*", b"/a b", b"http://other/admin", b"/a\x01", b"/\xff",
                     b"/x?y=z#f", b"//h/p"]) | st.binary(min_size=1, max_size=8),
    st.sampled_from([b"web", b"web:80", b"web@evil.example", b"[::1]:8", b"a b", b"h\x0b",
                     b""]) | st.binary(max_size=6),
    st.lists(st.tuples(st.sampled_from([b"x-a", b"cookie", b"x(a", b"user-agent"]), values),
             max_size=3))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(requests | mutated(GOOD))
@example([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"web"),
          (b"content-length", b"0")])  # found by hypothesis: a 0 goes on as Content-Length: 0
def test_translated_heads_parse_back_as_the_same_request(headers):
    assume(request_problem(headers) is None and http1_problem(headers) is None)
    assume(b"CONNECT" not in [v for k, v in headers if k == b":method"])
    try:
        length = request_length(headers)
    except ValueError:
        reject()
    assume(not length)  # bodiless: none, or a content-length of 0 (sent on as it came)
    head = _translated(headers)
    req = parse_request_head(head)  # never a ProxyError: whatever passed translates
    pseudo = dict(h for h in headers if h[0].startswith(b":"))
    assert (req.method, req.target) == (pseudo[b":method"], pseudo[b":path"])
    # every field arrives as it was sent: none split, merged (cookie aside) or altered
    regular = [h for h in headers if not h[0].startswith(b":")
               and h[0] not in (b"host", b"content-length", b"te", b"cookie")]
    assert all(field in req.headers for field in regular), (headers, head)
    sent_length = [v for k, v in req.headers if k.lower() == b"content-length"]
    assert sent_length == ([] if length is None else [b"0"]), (headers, head)
    assert len(req.headers) == (len(regular) + 1 + any(k == b"cookie" for k, _ in headers)
                                + len(sent_length))
    assert req.host == (pseudo.get(b":authority") or dict(headers).get(b"host") or b"")


# The server checks a client's request with both rule sets in one pass
# (request_problem(headers, http1_rules=True)): the same verdict as the two checks one
# after the other, on any list (pseudo-headers, upper case, connection-specific fields,
# bad bytes) and on mutated valid heads.

@settings(max_examples=3000, deadline=None)
@given(header_lists | mutated(GOOD) | requests)
def test_one_pass_request_check_agrees_with_both_checks(headers):
    combined = request_problem(headers) or http1_problem(headers)
    one_pass = request_problem(headers, http1_rules=True)
    assert (one_pass is None) == (combined is None), (headers, one_pass, combined)
    if request_problem(headers) is None and combined is not None:
        assert one_pass == combined  # an HTTP/1.1 rule: its reason as http1_problem says
