"""Protocol detection (meshd.proto.detect) with plain bytes: every result, every split
point of real first flights, real ClientHellos from Python's ssl, and garbage that must
never raise."""

from __future__ import annotations

import ssl
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.proto.detect import (
    DEFAULT_OPAQUE_PORTS,
    H2_PREFACE,
    PEEK_LIMIT,
    ClientHelloInfo,
    Detection,
    client_hello_info,
    detect,
    parse_tunnel,
    tunnel_header,
)

D = Detection


def client_hello(server_hostname: str | None = "api.example.test",
                 alpn: list[str] | None = None, maximum: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of a real Python ssl client: one ClientHello, TLS records and all."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


HELLO = client_hello(alpn=["h2", "http/1.1"])
H1_REQUEST = b"GET /index.html?q=1 HTTP/1.1\r\nHost: web\r\n\r\n"
H2_FIRST_FLIGHT = H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
REDIS = b"*1\r\n$4\r\nPING\r\n"

# (first flight, what it is): every one of them is cut at every byte below.
FLIGHTS = [
    (H1_REQUEST, D.HTTP1),
    (b"\r\nPOST / HTTP/1.0\r\n\r\n", D.HTTP1),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", D.HTTP1),
    (b"CONNECT example.test:443 HTTP/1.1\r\n\r\n", D.HTTP1),
    (b"PRI * HTTP/1.1\r\n\r\n", D.HTTP1),  # shares 10 bytes with the h2 preface
    (H2_FIRST_FLIGHT, D.HTTP2),
    (HELLO, D.TLS),
    (REDIS, D.OPAQUE),
    (b"SET key value\r\n", D.OPAQUE),  # text, but no HTTP version on the line
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", D.OPAQUE),  # a near-preface
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", D.OPAQUE),  # a ServerHello record
]


@pytest.mark.parametrize(("prefix", "final", "expected"), [
    (b"", False, D.NEED_MORE),
    (b"", True, D.OPAQUE),
    # HTTP/2: the exact preface, or a prefix of it while more may come.
    (H2_PREFACE, False, D.HTTP2),
    (H2_PREFACE, True, D.HTTP2),
    (H2_PREFACE[:10], False, D.NEED_MORE),
    (H2_PREFACE[:23], True, D.OPAQUE),  # the whole line is there and it is not HTTP/1
    # HTTP/1: decided on the first line, as soon as " HTTP/1." follows method SP target.
    (b"GET / HTTP/1.", False, D.HTTP1),
    (b"GET / HTTP/1", False, D.NEED_MORE),
    (b"GET / HTTP/1.9\r\n", False, D.HTTP1),  # the strict parser answers 400, not a tunnel
    (b"GET /a b HTTP/1.1\r\n", False, D.HTTP1),  # ditto: a space in the target
    (b"GET /\xff HTTP/1.1\r\n", False, D.HTTP1),  # ditto: obs-text
    (b"\r\nGET / HTTP/1.1\r\n", False, D.HTTP1),
    (b"\r", False, D.NEED_MORE),
    (b"\r", True, D.OPAQUE),
    (b"\r\n\r\n", False, D.OPAQUE),
    (b"GET", False, D.NEED_MORE),
    (b"GET", True, D.OPAQUE),
    (b"GET ", True, D.OPAQUE),  # no target byte yet
    (b"GET /", True, D.HTTP1),  # final but begun: a slow client gets 408, not a tunnel
    (b"GET /" + b"a" * 2000, False, D.HTTP1),  # a target longer than the peek: 414
    (b"GET /" + b"a" * (PEEK_LIMIT - 5), False, D.HTTP1),  # exactly the limit is final
    (b"GET " + b"a" * (PEEK_LIMIT - 5), False, D.NEED_MORE),  # one byte short of it
    (b"G" * PEEK_LIMIT, False, D.OPAQUE),  # a method and nothing else
    (b"GET  HTTP/1.1\r\n", False, D.OPAQUE),  # empty target
    (b"GET / HTTP/2.0\r\n", False, D.OPAQUE),
    (b"GET /\r\n", False, D.OPAQUE),  # HTTP/0.9 is not served
    (b"GET /\r", False, D.OPAQUE),  # either a line end or a bare CR: no version either way
    (b"GET /\x00 HTTP/1.1\r\n", False, D.OPAQUE),
    (b"GET\t/ HTTP/1.1\r\n", False, D.OPAQUE),
    (b"GE(T / HTTP/1.1\r\n", False, D.OPAQUE),  # "(" is no tchar
    (b" GET / HTTP/1.1\r\n", False, D.OPAQUE),
    (b"get / HTTP/1.1\r\n", False, D.HTTP1),  # methods are case-sensitive tokens, any token
    # TLS: a handshake record header and a ClientHello type.
    (HELLO[:6], False, D.TLS),
    (HELLO[:5], False, D.NEED_MORE),
    (HELLO[:5], True, D.OPAQUE),
    (b"\x16\x03\x00\x00\x30\x01", False, D.TLS),  # SSL 3.0 record version
    (b"\x16\x03\x04\x00\x30\x01", False, D.TLS),
    (b"\x16\x03\x05\x00\x30\x01", False, D.OPAQUE),
    (b"\x16\x02", False, D.OPAQUE),
    (b"\x16\x03\x01\x00\x00\x01", False, D.OPAQUE),  # empty record
    (b"\x16\x03\x01\x40\x01\x01", False, D.OPAQUE),  # longer than 2^14
    (b"\x16\x03\x01\x00\x30\x02", False, D.OPAQUE),  # a ServerHello
    (b"\x17\x03\x03\x00\x30", False, D.OPAQUE),  # application data
    # Everything else at the first byte that starts nothing we know.
    (b"\x00", False, D.OPAQUE),
    (b"{", False, D.OPAQUE),
    (REDIS[:2], False, D.NEED_MORE),  # "*1" could still be a method
    (REDIS[:3], False, D.OPAQUE),
])
def test_detect(prefix: bytes, final: bool, expected: Detection) -> None:
    assert detect(prefix, final=final) is expected


@pytest.mark.parametrize(("flight", "expected"), FLIGHTS)
def test_every_split_point(flight: bytes, expected: Detection) -> None:
    """Cut anywhere: not decided yet or already right, and never changing once decided;
    final never answers NEED_MORE; the whole flight is decided."""
    decided_at = None
    for n in range(len(flight) + 1):
        got = detect(flight[:n], final=False)
        assert got in (D.NEED_MORE, expected), (n, flight[:n])
        if decided_at is not None:
            assert got is expected, (n, flight[:n])
        elif got is expected:
            decided_at = n
        assert detect(flight[:n], final=True) is not D.NEED_MORE
    assert decided_at is not None and decided_at <= max(len(flight), 1)


def test_decisions_come_early() -> None:
    """Detection waits no longer than the protocol needs: one byte for binary junk, the
    first non-token byte for text, six for TLS, the preface for h2, " HTTP/1." for HTTP/1."""
    def first_decision(flight: bytes) -> int:
        return next(n for n in range(len(flight) + 1)
                    if detect(flight[:n], final=False) is not D.NEED_MORE)
    assert first_decision(b"\x00\x00\x00\x08\x04\xd2\x16\x2f") == 1  # a Postgres SSLRequest
    assert first_decision(REDIS) == 3
    assert first_decision(HELLO) == 6
    assert first_decision(H2_FIRST_FLIGHT) == len(H2_PREFACE)
    assert first_decision(H1_REQUEST) == H1_REQUEST.index(b"HTTP/1.") + len(b"HTTP/1.")


def test_detect_is_sans_io() -> None:
    """Importing the module pulls in no socket, ssl or gevent (tests/test_sansio.py's rule)."""
    code = ("import sys, meshd.proto.detect; "
            "print(sorted({'socket', 'ssl', 'gevent', 'select', 'asyncio'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out.strip() == "[]"


def test_default_opaque_ports_are_linkerds() -> None:
    assert frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211}) == DEFAULT_OPAQUE_PORTS


def test_detection_values_are_metric_labels() -> None:
    assert {d.value for d in Detection} == {"need_more", "http1", "h2", "tls", "opaque", "tunnel"}


# -- ClientHello ----------------------------------------------------------------------


def test_client_hello_sni_and_alpn() -> None:
    assert client_hello_info(HELLO) == ClientHelloInfo("api.example.test", ("h2", "http/1.1"))
    sni, alpn = client_hello_info(HELLO)  # type: ignore[misc]
    assert (sni, alpn) == ("api.example.test", ("h2", "http/1.1"))


def test_client_hello_without_sni_or_alpn() -> None:
    assert client_hello_info(client_hello(None)) == ClientHelloInfo(None, ())


def test_client_hello_sni_is_lowercased() -> None:
    assert client_hello_info(client_hello("Mixed.Example.TEST")) == ("mixed.example.test", ())


def test_client_hello_tls12() -> None:
    hello = client_hello("old.example.test", ["http/1.1"], ssl.TLSVersion.TLSv1_2)
    assert detect(hello, final=False) is D.TLS
    assert client_hello_info(hello) == ("old.example.test", ("http/1.1",))


def test_client_hello_with_bytes_after_it() -> None:
    assert client_hello_info(HELLO + b"\x14\x03\x03\x00\x01\x01")[0] == "api.example.test"  # type: ignore[index]


def test_client_hello_fragmented_across_records() -> None:
    """A handshake message may span records (RFC 8446 §5.1); the hello is reassembled."""
    body = HELLO[5:]
    cuts = [0, 3, 40, len(body)]  # a record boundary even inside the handshake header

    def record(fragment: bytes) -> bytes:
        return b"\x16\x03\x01" + len(fragment).to_bytes(2, "big") + fragment
    flight = b"".join(record(body[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    assert client_hello_info(flight) == client_hello_info(HELLO)
    assert client_hello_info(flight[:-1]) is None


def test_incomplete_client_hello_is_none() -> None:
    for n in range(len(HELLO)):
        assert client_hello_info(HELLO[:n]) is None, n


def _with_extension(ext_type: int, data: bytes, hello: bytes = HELLO) -> bytes:
    """``hello`` (one record) with one more extension appended, lengths fixed up."""
    body = bytearray(hello[9:])  # after record header and handshake header
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos:pos + 2], "big")
    pos += 1 + body[pos]
    ext_len = int.from_bytes(body[pos:pos + 2], "big")
    extra = ext_type.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data
    body[pos:pos + 2] = (ext_len + len(extra)).to_bytes(2, "big")
    body += extra
    handshake = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def test_extension_helper_keeps_hello_valid() -> None:
    assert client_hello_info(_with_extension(0xFAFA, b"")) == client_hello_info(HELLO)


@pytest.mark.parametrize(("ext_type", "data"), [
    (0, b"\x00\x05\x00\x00\x02ab"),  # a second server_name
    (16, b"\x00\x03\x02h2"),  # a second ALPN
])
def test_duplicate_extension_is_malformed(ext_type: int, data: bytes) -> None:
    assert client_hello_info(_with_extension(ext_type, data)) is None


@pytest.mark.parametrize("data", [
    b"",  # empty server_name (only a server may send it)
    b"\x00\x00",  # empty list
    b"\x00\x06\x00\x00\x03ab",  # a name running past its list
    b"\x00\x04\x00\x00\x01\xe9",  # non-ASCII host name
    b"\x00\x03\x00\x00\x00",  # empty host name
    b"\x00\x0a\x00\x00\x02ab\x00\x00\x02cd",  # two host names
])
def test_malformed_server_name(data: bytes) -> None:
    assert client_hello_info(_with_extension(0, data, client_hello(None))) is None


def test_unknown_name_type_is_skipped() -> None:
    data = b"\x00\x0a\x07\x00\x02zz\x00\x00\x02ab"
    assert client_hello_info(_with_extension(0, data, client_hello(None))) == ("ab", ())


@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"\x00\x01\x00", b"\x00\x03\x03h2"])
def test_malformed_alpn(data: bytes) -> None:
    assert client_hello_info(_with_extension(16, data, client_hello(None))) is None


@pytest.mark.parametrize("prefix", [
    b"", b"\x16", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello type
    b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",  # an empty ClientHello body
    b"\x17\x03\x03\x00\x04\x01\x00\x00\x00", H1_REQUEST, H2_PREFACE,
])
def test_not_a_client_hello(prefix: bytes) -> None:
    assert client_hello_info(prefix) is None


# -- garbage --------------------------------------------------------------------------

TEXTY = st.binary(max_size=64) | st.lists(
    st.sampled_from([b"GET", b"PRI", b" ", b"/", b"*", b"HTTP/1.", b"HTTP/2.0", b"1", b"\r",
                     b"\n", b"\r\n", b"\x00", b"\x16\x03\x01", b"\x01", b"SM", b"\xff"]),
    max_size=20).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(TEXTY, st.booleans())
def test_detect_never_raises_and_final_always_decides(data: bytes, final: bool) -> None:
    got = detect(data, final=final)
    assert isinstance(got, Detection)
    if final:
        assert got is not D.NEED_MORE


@settings(max_examples=300, deadline=None)
@given(TEXTY)
def test_a_decision_never_changes_with_more_bytes(data: bytes) -> None:
    decided = None
    for n in range(len(data) + 1):
        got = detect(data[:n], final=False)
        if decided is not None:
            assert got is decided, (data, n)
        elif got is not D.NEED_MORE:
            decided = got


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_client_hello_info_never_raises_on_garbage(data: bytes) -> None:
    framed = b"\x16\x03\x01" + len(data).to_bytes(2, "big") + data  # past the record check
    for candidate in (data, framed, framed[:5] + b"\x01" + framed[6:]):
        info = client_hello_info(candidate)
        assert info is None or isinstance(info, ClientHelloInfo)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_client_hello_info_never_raises_on_mutated_hellos(flips: list[tuple[int, int]]) -> None:
    mutated = bytearray(HELLO)
    for pos, value in flips:
        mutated[pos] = value
    info = client_hello_info(bytes(mutated))
    assert info is None or (isinstance(info.alpn, tuple) and (info.sni is None or info.sni.isascii()))


@pytest.mark.parametrize("prefix, final, expected", [
    (b"MESHD-TUNNEL 8080\r\nbytes", False, Detection.TUNNEL),
    (b"MESHD-TUN", False, Detection.NEED_MORE),
    (b"MESHD-TUNNEL 80", False, Detection.NEED_MORE),
    (b"MESHD-TUNNEL 8080808080808", False, Detection.OPAQUE),  # no line end in time
    (b"MESHD-TUN", True, Detection.OPAQUE),
])
def test_detect_tunnel_header(prefix: bytes, final: bool, expected: Detection) -> None:
    assert detect(prefix, final=final) is expected


def test_parse_tunnel_header() -> None:
    assert parse_tunnel(tunnel_header(5432) + b"rest") == (5432, b"rest")
    for bad in (b"MESHD-TUNNEL 0\r\n", b"MESHD-TUNNEL 70000\r\n", b"MESHD-TUNNEL x\r\n",
                b"MESHD-TUNNEL \r\n", b"MESHD-TUNNEL 80"):
        assert parse_tunnel(bad) is None, bad
