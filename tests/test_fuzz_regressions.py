"""Inputs the fuzzer (`make fuzz`, fuzz/) crashed on, replayed through the same targets.

Each is the crashing input's bytes as libFuzzer wrote them (or a shortened one that
crashes the same way); the comment says what was wrong and where it is fixed. Inputs
that crashed on a wrong expectation of the target itself are here too, so that the
expectation stays fixed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from test_h2_rules import conn, env, marker  # noqa: F401 (fixtures: a real meshd, a recorder)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Issue 11 items 2 and 5 (HTTP/1.1 rules for HTTP/2 requests, the declared content-length
# held to the DATA total), found by the fuzzer: these inputs crashed the target before
# h2_server applied h2_headers.http1_problem and request_length.


def _run(target: str, data: bytes) -> None:
    importlib.import_module(f"fuzz.fuzz_{target}").one_input(data)


@pytest.mark.parametrize("data", [
    # Found by the fuzzer within seconds: user-agent "curl/8\x04te" passes the HTTP/2
    # rules (only NUL, CR, LF are refused there) and meshd's own HTTP/1.1 parser refuses
    # the translated head ("control character in header field").
    b"\x00:method\xfeGET\xff:scheme\xfehttps\xff:path\xfe/a?b=c\xff:authority\xfeweb:8080"
    b"\xffuser-agent\xfecurl/8\x04te\xfetrailers\xffcookie\xfea=1\xffcookie\xfeb=2",
    # The issue's own examples, as target inputs: a :method with a space and query.
    b"\x00:method\xfeGET /admin?x=\xff:scheme\xfehttp\xff:path\xfe/\xff:authority\xfeweb",
    b"\x00:method\xfeGET\xff:scheme\xfehttp\xff:path\xfe/a b\xff:authority\xfeweb",
    b"\x00:method\xfeGET\xff:scheme\xfehttp\xff:path\xfehttp://other-host/admin\xff"
    b":authority\xfeweb",
    b"\x00:method\xfeGET\xff:scheme\xfehttp\xff:path\xfe/\xff:authority\xfeweb@evil.example",
], ids=["ctl-in-value", "method-with-space", "path-with-space", "absolute-path", "userinfo"])
def test_h2_request_untranslatable_to_http1(data):
    _run("h2_headers", data)


@pytest.mark.parametrize("data", [
    # Mode 0x04: HEADERS with END_STREAM. The HTTP/1.1 head said Content-Length: 3 with
    # no body behind it: the upstream would read the next pooled request as the body.
    b"\x04:method\xfePOST\xff:scheme\xfeh\xff:path\xfe/p\xffhost\xffcontent-length\xfe3",
    # An empty (or any non-digit) content-length went into the HTTP/1.1 head as it was.
    b"\x00:method\xfeP\xff:scheme\xfehtp\xff:path\xfe/p\xffhost\xfe\xffcontent-length\xff6",
], ids=["length-with-end-stream", "empty-length"])
def test_h2_content_length(data):
    # Both found by the fuzzer once item 5's rules were in place (a local stand-in).
    _run("h2_headers", data)


@pytest.mark.parametrize("data", [
    # h2 lets a :status that is not three digits through; meshd refuses it (RFC 9113
    # §8.3.2): the target's agreement check allows meshd to be stricter there.
    b"\x02:status\xfe2Connection\xfe",
    # An empty :authority becomes "Host: " (RFC 9112 §3.2 allows an empty Host).
    b"\x00:method\xfeGET\xff:scheme\xfehttps\xff:path\xfe/a?b=c\xff:authority\xfe\xffc00"
    b"\xffcoatus\xfe2use8\xffte\xfetrailers\xffcookie\xfea=1\xffcookie\xfeb=2=1\xffcoodie\xfeb=2",
], ids=["status-not-three-digits", "empty-authority"])
def test_target_expectations(data):
    _run("h2_headers", data)


def test_empty_cookie_crumb_is_left_out_of_the_joined_cookie(conn, env):  # noqa: F811
    # Found by the fuzzer (translated fields differ from the HTTP/2 ones): crumbs "a=1"
    # and "" were joined to "a=1; ", a value ending with a space, which an HTTP/1.1
    # parser reads as "a=1;". Fixed in meshd.proto.translate.join_cookies.
    _run("h2_headers", b"\x00:method\xfeGET\xff:scheme\xfehttps\xff:path\xfe/a?b=c\xff"
                       b":authority\xfeweb\xffcookie\xfea=1\xffcookie\xfe")
    # And through a real meshd: what the HTTP/1.1 upstream receives.
    mark = marker()
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(mark, "rec", extra=[
        (b"cookie", b"a=1"), (b"cookie", b""), (b"cookie", b"b=2"), (b"cookie", b"")])))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200"
    head = env.rec.request_with(mark)
    assert b"\r\ncookie: a=1; b=2\r\n" in head, head


# Found by the fuzzer: an HTTP/2 request of 711 bytes with 200 empty fields, translated
# into an HTTP/1.1 head that meshd's own parser refuses ("more than 100 header fields").
_MANY_FIELDS = (b"\x00:method\xfeP\xff:scheme\xfehttp\xff:path\xfe/~\xffhost\xfeweb\xff"
                + b"\xff".join(b"x%d" % i for i in range(200)))


def test_header_count_holds_for_http2_requests(conn, env):  # noqa: F811
    # [limits] header_count (100) was not applied to HTTP/2 requests: within the 64 KiB
    # header list, a client could send thousands of empty fields, all forwarded. Now
    # 431, as for HTTP/1.1, and nothing reaches the upstream.
    _run("h2_headers", _MANY_FIELDS)  # the target now expects the refusal
    mark = marker()
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(mark, "rec", extra=[
        (b"x-f%d" % i, b"") for i in range(150)])))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"431", (conn.status(sid), conn.body(sid))
    assert not env.rec.seen(mark), env.rec.request_with(mark)
    # 100 fields are still fine.
    mark = marker()
    sid = conn.sid()
    conn.send(conn.headers_frame(sid, conn.req(mark, "rec", extra=[
        (b"x-f%d" % i, b"") for i in range(100)])))
    conn.read(lambda: conn.ended(sid))
    assert conn.status(sid) == b"200" and env.rec.seen(mark)
