"""meshd.proto.http1: head parsing, strict framing rules, serializing, chunked coding, h11 parity."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import h11
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshd.errors import (
    BadRequest,
    HeadersTooLarge,
    NotImplementedByProxy,
    ProxyError,
    UpstreamError,
    UriTooLong,
)
from meshd.proto.http1 import (
    HEAD_END,
    HOP_BY_HOP,
    LAST_CHUNK,
    ChunkedDecoder,
    encode_chunk,
    encode_trailers,
    parse_request_head,
    parse_response_head,
    response_has_body,
    serialize_request_head,
    serialize_response_head,
    strip_hop_by_hop,
)

ROOT = Path(__file__).resolve().parent.parent
TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TCHARS, min_size=1, max_size=6).map(str.encode)


def req(*lines: bytes, start: bytes = b"GET / HTTP/1.1", host: bool = True) -> bytes:
    fields = ([b"Host: example.com"] if host else []) + list(lines)
    return b"\r\n".join([start, *fields]) + HEAD_END


def bad(head: bytes, reason: str, error: type[Exception] = BadRequest, **kw: int) -> None:
    with pytest.raises(error) as info:
        parse_request_head(head, **kw)
    assert type(info.value) is error
    assert reason in str(info.value)


# --- requests: the good path -------------------------------------------------------------


def test_simple_get() -> None:
    h = parse_request_head(b"GET /path?q=1 HTTP/1.1\r\nHost: svc:8080\r\nAccept:  */* \t\r\n\r\n")
    assert (h.method, h.target, h.version) == (b"GET", b"/path?q=1", b"HTTP/1.1")
    assert h.headers == [(b"Host", b"svc:8080"), (b"Accept", b"*/*")]
    assert h.host == b"svc:8080"
    assert h.content_length is None and not h.chunked and not h.has_body
    assert h.keep_alive and not h.expect_continue and h.upgrade is None
    assert h.connection_tokens == frozenset()


def test_names_keep_case_and_empty_values_are_kept() -> None:
    h = parse_request_head(req(b"X-MiXed:", b"x-two:\t a  b \t"))
    assert h.headers[1:] == [(b"X-MiXed", b""), (b"x-two", b"a  b")]


def test_obs_text_in_value_is_accepted() -> None:
    assert parse_request_head(req(b"X: caf\xc3\xa9")).headers[1] == (b"X", b"caf\xc3\xa9")


def test_one_leading_empty_line_is_tolerated() -> None:
    assert parse_request_head(b"\r\n" + req()).method == b"GET"
    bad(b"\r\n\r\n" + req(), "empty request line")


def test_content_length() -> None:
    h = parse_request_head(req(b"Content-Length: 0042", start=b"POST /u HTTP/1.1"))
    assert h.content_length == 42 and h.has_body
    assert not parse_request_head(req(b"Content-Length: 0")).has_body


def test_chunked_is_case_insensitive() -> None:
    h = parse_request_head(req(b"Transfer-Encoding: Chunked"))
    assert h.chunked and h.content_length is None and h.has_body


def test_keep_alive_rules() -> None:
    assert parse_request_head(req()).keep_alive
    assert not parse_request_head(req(b"Connection: close")).keep_alive
    assert not parse_request_head(req(b"Connection: foo", b"connection: Close")).keep_alive
    assert not parse_request_head(req(start=b"GET / HTTP/1.0", host=False)).keep_alive
    h = parse_request_head(req(b"Connection: Keep-Alive", start=b"GET / HTTP/1.0", host=False))
    assert h.keep_alive and h.host is None and h.version == b"HTTP/1.0"


def test_connection_tokens_from_all_fields() -> None:
    h = parse_request_head(req(b"Connection: A, ,b", b"Connection: X-Foo"))
    assert h.connection_tokens == frozenset([b"a", b"b", b"x-foo"])


def test_expect_continue() -> None:
    assert parse_request_head(req(b"Expect: 100-Continue")).expect_continue
    assert not parse_request_head(req(b"Expect: something")).expect_continue
    # RFC 9110 §10.1.1: ignored in an HTTP/1.0 request
    assert not parse_request_head(req(b"Expect: 100-continue", start=b"GET / HTTP/1.0")).expect_continue


def test_upgrade_only_when_connection_lists_it() -> None:
    assert parse_request_head(req(b"Connection: upgrade", b"Upgrade: websocket")).upgrade == b"websocket"
    assert parse_request_head(req(b"Upgrade: websocket")).upgrade is None
    head = req(b"Connection: upgrade", b"Upgrade: websocket", start=b"GET / HTTP/1.0")
    assert parse_request_head(head).upgrade is None


def test_absolute_and_authority_form_targets() -> None:
    assert parse_request_head(req(start=b"GET http://a/b HTTP/1.1")).target == b"http://a/b"
    assert parse_request_head(req(start=b"CONNECT a:443 HTTP/1.1")).method == b"CONNECT"


# --- requests: framing rules, one test each ----------------------------------------------


def test_content_length_and_transfer_encoding() -> None:
    bad(req(b"Content-Length: 5", b"Transfer-Encoding: chunked"), "both Content-Length and Transfer-Encoding")


def test_two_content_length_fields() -> None:
    bad(req(b"Content-Length: 5", b"Content-Length: 5"), "multiple Content-Length")


def test_content_length_list() -> None:
    bad(req(b"Content-Length: 5, 5"), "Content-Length list value")


@pytest.mark.parametrize("value", [b"abc", b"-1", b"+5", b"5 5", b"0x10", b"\xd9\xa3"])
def test_content_length_not_digits(value: bytes) -> None:
    bad(req(b"Content-Length: " + value), "invalid Content-Length")


def test_content_length_empty() -> None:
    bad(req(b"Content-Length:"), "empty Content-Length")


def test_content_length_too_large() -> None:
    assert parse_request_head(req(b"Content-Length: %d" % (2**63 - 1))).content_length == 2**63 - 1
    bad(req(b"Content-Length: %d" % 2**63), "Content-Length too large")
    bad(req(b"Content-Length: 1" + b"0" * 40), "Content-Length too large")


@pytest.mark.parametrize(
    "value", [b"gzip, chunked", b"chunked, chunked", b"chunked, gzip", b"identity", b"deflate"]
)
def test_known_coding_other_than_chunked(value: bytes) -> None:
    bad(req(b"Transfer-Encoding: " + value), "Transfer-Encoding other than chunked")


def test_two_transfer_encoding_fields_are_one_list() -> None:
    bad(req(b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"), "other than chunked")


@pytest.mark.parametrize("value", [b"xchunked", b"foo", b"foo, chunked", b"chunkedx"])
def test_unknown_coding_is_501(value: bytes) -> None:
    bad(req(b"Transfer-Encoding: " + value), "unsupported transfer coding", NotImplementedByProxy)


@pytest.mark.parametrize("value", [b"chunked x", b"chunked;q=1", b'"chunked"'])
def test_transfer_encoding_with_junk(value: bytes) -> None:
    bad(req(b"Transfer-Encoding: " + value), "invalid Transfer-Encoding")


@pytest.mark.parametrize("value", [b"", b"chunked,", b", chunked"])
def test_transfer_encoding_empty_element(value: bytes) -> None:
    bad(req(b"Transfer-Encoding: " + value), "empty Transfer-Encoding element")


def test_transfer_encoding_in_http10() -> None:
    bad(req(b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.0"), "HTTP/1.0 request")


def test_obs_fold() -> None:
    bad(req(b"X-A: a", b" folded"), "obs-fold")
    bad(req(b"X-A: a", b"\tfolded"), "obs-fold")


def test_whitespace_before_first_field() -> None:
    bad(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "obs-fold")


def test_bare_cr_in_value() -> None:
    bad(req(b"X-A: a\rb"), "bare CR")


def test_bare_cr_at_line_end() -> None:
    bad(req(b"X-A: a\r"), "bare CR")


def test_bare_lf_between_fields() -> None:
    bad(req(b"X-A: a\nX-B: b"), "bare LF in header section")


def test_bare_lf_is_named_before_bare_cr() -> None:
    # An LF-only client ends its head at "\n\r\n" while meshd reads on to CRLFCRLF.
    bad(req(b"X-A:\n\r\n\rX-B: b"), "bare LF in header section")


def test_bare_lf_ending_request_line() -> None:
    bad(b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF in request line")


def test_nul_in_value() -> None:
    bad(req(b"X-A: a\x00b"), "NUL")


@pytest.mark.parametrize("ctl", [b"\x01", b"\x0b", b"\x0c", b"\x1f", b"\x7f"])
def test_control_character_in_value(ctl: bytes) -> None:
    bad(req(b"X-A: a" + ctl + b"b"), "control character")


def test_htab_in_value_is_fine() -> None:
    assert parse_request_head(req(b"X-A: a\tb")).headers[1] == (b"X-A", b"a\tb")


@pytest.mark.parametrize("name", [b"X(A)", b"X/A", b'X"A', b"X@A", b"\xc3\xa9", b"X{A}"])
def test_name_outside_tchar(name: bytes) -> None:
    bad(req(name + b": v"), "invalid character in header field name")


def test_empty_field_name() -> None:
    bad(req(b": v"), "empty header field name")


def test_whitespace_before_colon() -> None:
    bad(req(b"Host : a", host=False), "whitespace between header field name and colon")
    bad(req(b"X-A\t: a"), "whitespace between header field name and colon")


def test_line_without_colon() -> None:
    bad(req(b"X-A a"), "header line without colon")


def test_missing_host() -> None:
    bad(req(host=False), "missing Host")


def test_two_hosts() -> None:
    bad(req(b"host: other"), "multiple Host")
    bad(req(b"Host: a", b"Host: a", start=b"GET / HTTP/1.0", host=False), "multiple Host")


@pytest.mark.parametrize("value", [b"a b", b"a/b", b"user@a", b"a\"b"])
def test_invalid_host(value: bytes) -> None:
    bad(req(b"Host: " + value, host=False), "invalid Host")


@pytest.mark.parametrize(
    "start",
    [
        b"GET  / HTTP/1.1",
        b"GET /  HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b" GET / HTTP/1.1",
        b"GET /",
        b"GET / http/1.1",
        b"GET / HTTP/1",
        b"G(T / HTTP/1.1",
        b"GET /\x7f HTTP/1.1",
        b"GET /\xc3\xa9 HTTP/1.1",
        b"GET\t/ HTTP/1.1",
        b"GET /\r HTTP/1.1",
        b"GET / HTTP/1.1\r",
    ],
)
def test_malformed_request_line(start: bytes) -> None:
    bad(req(start=start), "malformed request line")


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.0"])
def test_unsupported_version(version: bytes) -> None:
    bad(req(start=b"GET / " + version), "unsupported HTTP version")


def test_request_line_too_long_is_414() -> None:
    start = b"GET /" + b"a" * 100 + b" HTTP/1.1"
    assert parse_request_head(req(start=start), max_request_line=len(start)).target.startswith(b"/a")
    bad(req(start=start), "request line longer", UriTooLong, max_request_line=len(start) - 1)


def test_too_many_fields_is_431() -> None:
    fields = [b"X-%d: v" % i for i in range(9)]
    assert len(parse_request_head(req(*fields), max_headers=10).headers) == 10
    bad(req(*fields, b"X-Last: v"), "more than 10 header fields", HeadersTooLarge, max_headers=10)


def test_head_must_end_with_empty_line() -> None:
    bad(b"GET / HTTP/1.1\r\nHost: a\r\n", "does not end with an empty line")


def test_long_whitespace_runs_stay_linear() -> None:
    # A backtracking regex over OWS would take minutes here; the parser takes milliseconds.
    spaces = b" \t" * 40000
    began = time.process_time()  # CPU is what is measured, not the machine's other work
    assert parse_request_head(req(b"X-A: a" + spaces + b"b" + spaces)).headers[1] == (b"X-A", b"a" + spaces + b"b")
    bad(req(b"X-A: a" + spaces + b"\x01"), "control character")
    bad(req(b"X-A" + spaces + b": a"), "whitespace between")
    with pytest.raises(BadRequest, match="control character"):
        ChunkedDecoder(max_trailer_bytes=1 << 20).feed(b"0\r\nX: a" + spaces + b"\x01\r\n\r\n")
    assert time.process_time() - began < 1.0


def test_error_statuses() -> None:
    assert (BadRequest.status, UriTooLong.status, HeadersTooLarge.status) == (400, 414, 431)
    assert NotImplementedByProxy.status == 501 and UpstreamError.status == 502


# --- responses ---------------------------------------------------------------------------


def resp(*lines: bytes, start: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return b"\r\n".join([start, *lines]) + HEAD_END


def bad_resp(head: bytes, reason: str) -> None:
    with pytest.raises(UpstreamError) as info:
        parse_response_head(head)
    assert str(info.value).startswith("invalid response from upstream: ")
    assert reason in str(info.value)


def test_simple_response() -> None:
    r = parse_response_head(resp(b"Content-Length: 12", b"Server: x", start=b"HTTP/1.1 404 Not  Found"))
    assert (r.version, r.status, r.reason) == (b"HTTP/1.1", 404, b"Not  Found")
    assert r.headers == [(b"Content-Length", b"12"), (b"Server", b"x")]
    assert r.content_length == 12 and not r.chunked and r.keep_alive


def test_response_reason_is_lenient() -> None:
    assert parse_response_head(resp(start=b"HTTP/1.1 200 \xc3\x89t\xe9\t ok")).reason == b"\xc3\x89t\xe9\t ok"
    assert parse_response_head(resp(start=b"HTTP/1.1 204 ")).reason == b""
    assert parse_response_head(resp(start=b"HTTP/1.1 204")).reason == b""


@pytest.mark.parametrize(
    "start", [b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 600 X", b"HTTP/2.0 200 OK",
              b"HTTP/1.1  200 OK", b"HTTP/1.1 200 O\x00K", b"HTTP/1.1 200 OK\r", b"ICY 200 OK"]
)
def test_malformed_status_line(start: bytes) -> None:
    bad_resp(resp(start=start), "malformed status line")


def test_response_keep_alive() -> None:
    assert not parse_response_head(resp(b"Connection: close")).keep_alive
    assert not parse_response_head(resp(start=b"HTTP/1.0 200 OK")).keep_alive
    assert parse_response_head(resp(b"Connection: keep-alive", start=b"HTTP/1.0 200 OK")).keep_alive


def test_response_chunked() -> None:
    r = parse_response_head(resp(b"Transfer-Encoding: gzip, Chunked"))
    assert r.chunked and r.content_length is None and r.keep_alive


def test_response_te_overrides_cl_and_closes() -> None:
    r = parse_response_head(resp(b"Content-Length: 10", b"Transfer-Encoding: chunked"))
    assert r.chunked and r.content_length is None and not r.keep_alive


def test_response_te_not_chunked_reads_until_close() -> None:
    r = parse_response_head(resp(b"Transfer-Encoding: gzip", b"Content-Length: 3"))
    assert not r.chunked and r.content_length is None and not r.keep_alive


def test_response_chunked_twice_or_not_last() -> None:
    bad_resp(resp(b"Transfer-Encoding: chunked, chunked"), "more than once")
    bad_resp(resp(b"Transfer-Encoding: chunked, gzip"), "not the final")


def test_response_te_in_http10() -> None:
    bad_resp(resp(b"Transfer-Encoding: chunked", start=b"HTTP/1.0 200 OK"), "HTTP/1.0 response")


def test_response_equal_content_lengths_are_accepted() -> None:
    assert parse_response_head(resp(b"Content-Length: 7", b"Content-Length: 7, 7")).content_length == 7


def test_response_conflicting_content_lengths() -> None:
    bad_resp(resp(b"Content-Length: 7", b"Content-Length: 8"), "conflicting Content-Length")
    bad_resp(resp(b"Content-Length: 7, 8"), "conflicting Content-Length")


def test_response_bad_content_length() -> None:
    bad_resp(resp(b"Content-Length: -7"), "invalid Content-Length")


def test_response_field_rules_are_shared() -> None:
    bad_resp(resp(b"X: a", b" fold"), "obs-fold")
    bad_resp(resp(b"X : a"), "whitespace between header field name and colon")
    bad_resp(resp(b"X: a\rb"), "bare CR")
    bad_resp(resp(*[b"X: v"] * 101), "more than 100 header fields")


@pytest.mark.parametrize(
    ("method", "status", "expected"),
    [
        (b"GET", 200, True), (b"HEAD", 200, False), (b"GET", 100, False), (b"GET", 101, False),
        (b"GET", 204, False), (b"GET", 304, False), (b"POST", 404, True), (b"CONNECT", 200, False),
        (b"CONNECT", 407, True), (b"GET", 205, True),
    ],
)
def test_response_has_body(method: bytes, status: int, expected: bool) -> None:
    assert response_has_body(method, status) is expected


# --- hop-by-hop and serializing ----------------------------------------------------------


def test_hop_by_hop_is_rfc9110_7_6_1() -> None:
    assert HOP_BY_HOP == {
        b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade"
    }


def test_strip_hop_by_hop() -> None:
    h = parse_request_head(req(
        b"Connection: X-Secret, close", b"X-Secret: 1", b"x-secret: 2", b"Keep-Alive: 5",
        b"TE: trailers", b"Trailer: X-Sum", b"Content-Length: 3", b"Accept: */*",
        b"Proxy-Authorization: basic x", b"UPGRADE: h2c", b"Proxy-Connection: keep-alive",
    ))
    assert strip_hop_by_hop(h.headers, h.connection_tokens) == [
        (b"Host", b"example.com"), (b"Trailer", b"X-Sum"), (b"Accept", b"*/*"),
        (b"Proxy-Authorization", b"basic x"),
    ]
    assert strip_hop_by_hop([(b"A", b"1"), (b"CONTENT-LENGTH", b"2")], frozenset()) == [(b"A", b"1")]


def test_serialize_request_round_trip() -> None:
    fields = [(b"Host", b"svc"), (b"X-A", b"1")]
    data = serialize_request_head(b"POST", b"/p?q", fields, [(b"Content-Length", b"3")])
    assert data == b"POST /p?q HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nContent-Length: 3\r\n\r\n"
    h = parse_request_head(data)
    assert (h.method, h.target, h.content_length) == (b"POST", b"/p?q", 3)
    assert h.headers == [*fields, (b"Content-Length", b"3")]
    assert serialize_request_head(h.method, h.target, h.headers) == data


def test_serialize_request_without_fields() -> None:
    assert serialize_request_head(b"GET", b"/", []) == b"GET / HTTP/1.1\r\n\r\n"


def test_serialize_response_round_trip() -> None:
    data = serialize_response_head(201, b"Made", [(b"X-A", b"1")], [(b"Transfer-Encoding", b"chunked")])
    assert data == b"HTTP/1.1 201 Made\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    r = parse_response_head(data)
    assert (r.status, r.reason, r.chunked) == (201, b"Made", True)


def test_serialize_response_default_reason() -> None:
    assert serialize_response_head(404, b"", []) == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert serialize_response_head(599, b"", []) == b"HTTP/1.1 599 Unknown\r\n\r\n"


# --- chunked coding ----------------------------------------------------------------------

SAMPLE = (
    b"5\r\nhello\r\n"
    b"1;name=value;flag\r\n,\r\n"
    b"0000A \t;ext\r\n world!!!\n\r\n"
    b"0\r\nX-Sum: 42\r\nX-Empty:\r\n\r\n"
)
SAMPLE_BODY = b"hello, world!!!\n"
SAMPLE_TRAILERS = [(b"X-Sum", b"42"), (b"X-Empty", b"")]


def decode(pieces: list[bytes], **kw: int) -> tuple[bytes, ChunkedDecoder]:
    d = ChunkedDecoder(**kw)
    out = []
    for piece in pieces:
        assert not d.done
        got = d.feed(piece)
        assert all(type(p) is bytes and p for p in got)
        out += got
    return b"".join(out), d


def test_chunk_encoding() -> None:
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255).startswith(b"ff\r\n")
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert encode_trailers([]) == LAST_CHUNK
    assert encode_trailers([(b"A", b"1"), (b"B", b"2")]) == b"0\r\nA: 1\r\nB: 2\r\n\r\n"


def test_decode_whole() -> None:
    body, d = decode([SAMPLE])
    assert body == SAMPLE_BODY and d.done and d.trailers == SAMPLE_TRAILERS and d.unconsumed == b""


@pytest.mark.parametrize("cut", range(1, len(SAMPLE)))
def test_decode_split_at_every_byte(cut: int) -> None:
    body, d = decode([SAMPLE[:cut], SAMPLE[cut:]])
    assert body == SAMPLE_BODY and d.done and d.trailers == SAMPLE_TRAILERS


def test_decode_byte_by_byte() -> None:
    d = ChunkedDecoder()
    out = b"".join(b"".join(d.feed(SAMPLE[i : i + 1])) for i in range(len(SAMPLE)))
    assert out == SAMPLE_BODY and d.done and d.trailers == SAMPLE_TRAILERS


def test_decode_round_trip_with_encoder() -> None:
    pieces = [b"a", b"bc" * 1000, b"\r\n0\r\n\r\n"]
    wire = b"".join(encode_chunk(p) for p in pieces) + encode_trailers([(b"T", b"v")])
    body, d = decode([wire[i : i + 7] for i in range(0, len(wire), 7)])
    assert body == b"".join(pieces) and d.trailers == [(b"T", b"v")]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    body, d = decode([bytearray(SAMPLE[:9]), memoryview(SAMPLE)[9:]])  # type: ignore[list-item]
    assert body == SAMPLE_BODY and d.done


def test_pipelined_bytes_are_unconsumed() -> None:
    nxt = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    body, d = decode([SAMPLE + nxt[:5]])
    assert body == SAMPLE_BODY and d.unconsumed == nxt[:5]
    assert d.feed(nxt[5:]) == [] and d.unconsumed == nxt


def test_huge_chunk_in_pieces() -> None:
    size = 8 * 1024 * 1024
    piece = b"z" * 65536
    d = ChunkedDecoder()
    assert d.feed(b"%x\r\n" % size) == []
    total = 0
    for _ in range(size // len(piece)):
        got = d.feed(piece)
        assert got == [piece] and got[0] is piece  # no copy when a feed is all data
        total += len(piece)
    assert d.feed(b"\r\n0\r\n\r\n") == [] and d.done and total == size


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    st.lists(st.integers(0, 2000), max_size=6),
    st.lists(st.tuples(tokens, st.text("abc \t", max_size=5).map(str.encode)), max_size=3),
)
def test_chunked_round_trip_with_any_splits(
    chunks: list[bytes], cuts: list[int], trailers: list[tuple[bytes, bytes]]
) -> None:
    wire = b"".join(map(encode_chunk, chunks)) + encode_trailers(trailers) + b"NEXT"
    bounds = [0, *sorted(c % (len(wire) + 1) for c in cuts), len(wire)]
    d = ChunkedDecoder()
    body = b"".join(b"".join(d.feed(wire[a:b])) for a, b in zip(bounds, bounds[1:], strict=False))
    assert body == b"".join(chunks) and d.done and d.unconsumed == b"NEXT"
    assert d.trailers == [(n, v.strip(b" \t")) for n, v in trailers]


def test_many_small_chunks_in_one_feed() -> None:
    body, d = decode([b"1\r\nx\r\n" * 10000 + LAST_CHUNK])
    assert body == b"x" * 10000 and d.done


@pytest.mark.parametrize(
    "line", [b"", b"g", b"-5", b"+5", b"0x5", b" 5", b"5 ", b"5 x", b"5\x00", b"5;\x00", b"5\r"]
)
def test_invalid_chunk_size(line: bytes) -> None:
    with pytest.raises(BadRequest, match="chunk size"):
        ChunkedDecoder().feed(line + b"\r\nhello\r\n0\r\n\r\n")


def test_chunk_size_overflow() -> None:
    d = ChunkedDecoder()
    d.feed(b"7fffffffffffffff\r\n")  # 2**63 - 1 is fine
    with pytest.raises(BadRequest, match="chunk size too large"):
        ChunkedDecoder().feed(b"8000000000000000\r\n")
    with pytest.raises(BadRequest, match="chunk size too large"):
        ChunkedDecoder().feed(b"1" + b"0" * 20 + b"\r\n")
    assert decode([b"0" * 30 + b"1\r\nx\r\n0\r\n\r\n"])[0] == b"x"


@pytest.mark.parametrize("after", [b"XX", b"\rX", b"\n\r", b"\n"])
def test_missing_crlf_after_data(after: bytes) -> None:
    with pytest.raises(BadRequest, match="missing CRLF after chunk data"):
        ChunkedDecoder().feed(b"3\r\nabc" + after + b"0\r\n\r\n")


def test_bare_lf_ending_size_line() -> None:
    with pytest.raises(BadRequest, match="not terminated by CRLF"):
        ChunkedDecoder().feed(b"3\nabc\r\n")


def test_size_line_too_long() -> None:
    ok = b"3;" + b"e" * 8 + b"\r\nabc\r\n0\r\n\r\n"
    assert decode([ok], max_line=10)[0] == b"abc"
    assert decode([ok[i : i + 1] for i in range(len(ok))], max_line=10)[0] == b"abc"
    with pytest.raises(BadRequest, match="chunk size line longer than 10"):
        ChunkedDecoder(max_line=10).feed(b"3;" + b"e" * 9 + b"\r\n")
    d = ChunkedDecoder(max_line=10)
    with pytest.raises(BadRequest, match="chunk size line longer than 10"):
        for _ in range(100):
            d.feed(b"0")  # split across feeds, no LF ever


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_trailers_too_large(size: int) -> None:
    section = b"X: " + b"v" * 20 + b"\r\n" + b"Y: " + b"w" * 21 + b"\r\n" + b"\r\n"  # 53 bytes
    wire = b"0\r\n" + section
    pieces = [wire[i : i + size] for i in range(0, len(wire), size)]
    _, d = decode(pieces, max_trailer_bytes=53)
    assert d.done and d.trailers == [(b"X", b"v" * 20), (b"Y", b"w" * 21)]
    with pytest.raises(BadRequest, match="trailers larger than 52"):
        decode(pieces, max_trailer_bytes=52)
    with pytest.raises(BadRequest, match="trailers larger than 50"):
        decode([b"0\r\n"] + [b"v"] * 60, max_trailer_bytes=50)


@pytest.mark.parametrize(
    ("trailer", "reason"),
    [(b" fold", "obs-fold"), (b"X : v", "whitespace"), (b"X v", "without colon"), (b"X: a\x00", "control")],
)
def test_invalid_trailer(trailer: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        ChunkedDecoder().feed(b"0\r\n" + trailer + b"\r\n\r\n")


# --- the module stays sans-IO ------------------------------------------------------------


def test_imports_no_io() -> None:
    code = "import sys, meshd.proto.http1; print(sorted({'socket', 'ssl', 'gevent'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True)
    assert out.stdout.strip() == b"[]"


# --- parity with h11 ---------------------------------------------------------------------

# Where h11 accepts and meshd rejects, the reason must be one of these: places where
# meshd is deliberately stricter than h11 (RFC 9112 allows or requires the rejection).
STRICTER_THAN_H11 = (
    "unsupported HTTP version",  # h11 takes any HTTP/d.d
    "obs-fold",  # h11 unfolds continuation lines
    "bare LF",  # h11 accepts LF as a line terminator
    "control character",  # h11 accepts CTLs other than NUL and whitespace in values
    "multiple Content-Length",  # h11 merges equal values
    "Content-Length list value",  # ditto
    "Content-Length too large",  # h11 accepts up to 20 digits
    "both Content-Length and Transfer-Encoding",  # h11 lets chunked win
    "Transfer-Encoding in an HTTP/1.0 request",  # h11 does not check
    "invalid Host",  # h11 does not validate the Host value
)


def h11_request(head: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER)
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request
    # line; h11 rejects it, so it gets the head without that line.
    conn.receive_data(head[2:] if head.startswith(b"\r\n") else head)
    try:
        event = conn.next_event()
    except h11.ProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


def check_against_h11(data: bytes) -> None:
    # The caller hands over a head up to the first empty line, and nothing more.
    head = data[: data.find(HEAD_END) + 4]
    theirs = h11_request(head)
    try:
        ours = parse_request_head(head)
    except ProxyError as e:
        if theirs is not None:
            assert any(reason in e.reason for reason in STRICTER_THAN_H11), (head, e.reason)
        return
    assert theirs is not None, (head, ours)
    assert (ours.method, ours.target) == (theirs.method, theirs.target)
    assert ours.version == b"HTTP/" + theirs.http_version
    mine = [(n.lower(), v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in ours.headers]
    assert mine == list(theirs.headers)
    lengths = [v for n, v in theirs.headers if n == b"content-length"]
    assert ours.content_length == (int(lengths[0]) if lengths else None)
    assert ours.chunked == any(n == b"transfer-encoding" for n, _ in theirs.headers)


INTERESTING = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"\x01", b"\x7f",
               b"\x80", b"\xff", b"\x0b", b"a", b"0", b"(", b"/", b"\r\n ", b"\r\n\r\n"]
methods = st.sampled_from([b"GET", b"POST", b"HEAD", b"CONNECT", b"get", b"M-SEARCH"]) | tokens
targets = st.sampled_from([b"/", b"/a/b?c=d&e", b"*", b"http://h/p", b"h:443", b"/%20"]) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=8
).map(str.encode)
# Mostly valid parts, so that both parsers accept often enough for the comparison to bite.
versions = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 3 + [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1"])
names = st.sampled_from([b"Host", b"host", b"Content-Length", b"content-length", b"Transfer-Encoding",
                         b"Connection", b"Expect", b"Upgrade", b"X-A", b"Accept"]) | tokens
values = st.sampled_from([b"", b"a", b"example.com", b"5", b"05", b"5, 5", b"5,6", b"-1", b"+5",
                          b"99999999999999999999", b"chunked", b"Chunked", b"gzip, chunked", b"xchunked",
                          b"chunked, chunked", b"identity", b"close", b"keep-alive", b"upgrade",
                          b"100-continue", b"a b", b" padded\t", b"caf\xc3\xa9"]) | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8
).map(str.encode) | st.lists(st.sampled_from(INTERESTING[4:]), max_size=4).map(b"".join)
separators = st.sampled_from([b": "] * 4 + [b":", b":\t", b" : "])
fields = st.lists(st.tuples(names, separators, values), max_size=6)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    line = b"%s %s %s\r\n" % (draw(methods), draw(targets), draw(versions))
    listed = draw(fields)
    if draw(st.integers(0, 4)):
        listed.insert(draw(st.integers(0, len(listed))), (b"Host", b": ", b"svc"))
    prefix = b"\r\n" if draw(st.integers(0, 9)) == 0 else b""
    return prefix + line + b"".join(n + s + v + b"\r\n" for n, s, v in listed) + b"\r\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads())
def test_parity_with_h11_generated(head: bytes) -> None:
    check_against_h11(head)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request_heads(),
    st.lists(st.tuples(st.sampled_from("idr"), st.integers(0, 10**6), st.sampled_from(INTERESTING)),
             min_size=1, max_size=3),
)
def test_parity_with_h11_mutated(head: bytes, edits: list[tuple[str, int, bytes]]) -> None:
    data = bytearray(head)
    for op, where, what in edits:
        at = where % (len(data) + 1)
        if op == "i":
            data[at:at] = what
        elif op == "d":
            del data[at : at + 1]
        else:
            data[at : at + len(what)] = what
    assume(HEAD_END in data)
    check_against_h11(bytes(data))
