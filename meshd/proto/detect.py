"""Sans-IO protocol detection for ``protocol = "auto"`` listeners, and ClientHello peeking.

Owns: deciding from the first bytes a client sent (at most ``PEEK_LIMIT``) whether a
connection speaks HTTP/2 (the client connection preface, RFC 9113 §3.4), HTTP/1.x (a
request line, RFC 9112 §3), TLS (a handshake record carrying a ClientHello, RFC 8446
§5.1 / §4.1.2) or something else, which is tunneled as opaque TCP; the default list of
server-speaks-first ports that skip detection; and reading the SNI and ALPN of a
ClientHello that is wholly inside the peeked bytes. Bytes in, values out: no sockets,
no ssl, no gevent.

The caller peeks (``MSG_PEEK``) until ``detect`` stops answering ``NEED_MORE``, calling
it with ``final=True`` once the detection timeout passed, the client half-closed, or
``PEEK_LIMIT`` bytes are in; a final call never answers ``NEED_MORE``.

HTTP/1 is decided from the first line only, and leniently: a method, a space, and
``" HTTP/1."`` later in the line make it HTTP/1 even if the strict parser will refuse the
request (a bad version digit, a space or obs-text in the target). Classifying a
near-HTTP request as opaque would tunnel it past the strict parser and its limits to
the application, the one outcome detection must never produce. For the same reason a
request line still incomplete when detection ends (a slow client, or a target longer
than the peek) is HTTP/1 once it has a method, a space and a target byte: the HTTP path
then answers 408 or 414 instead of tunneling it. Anything else is decided as early as
its bytes allow: a first byte that starts no method, a control byte, or a complete first
line without the version is opaque at once.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

PEEK_LIMIT = 1024

# Linkerd2's default opaque ports: protocols where the server speaks first (SMTP, MySQL,
# the Galera and Elasticsearch transports) or whose clients never send HTTP (Postgres,
# Redis, memcached). Detection on these would only wait for the timeout.
DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_METHOD_SP = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]++( ?)")
# A byte no request line holds before its version (CR included: a CR there is either
# the end of a line without a version or a bare CR). HTAB and obs-text pass: the strict
# parser, not detection, refuses those.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = b" HTTP/1."

# TLSPlaintext (RFC 8446 §5.1): type handshake(22), legacy_record_version 0x03 0x00..0x04
# (SSL 3.0 to a hypothetical 1.3 record version), a length of at most 2^14, and inside it
# a Handshake whose msg_type is client_hello(1).
_TLS_HANDSHAKE = 0x16
_TLS_CLIENT_HELLO = 0x01
_TLS_MAX_RECORD = 1 << 14

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16


class Detection(enum.Enum):
    """What a connection's first bytes say it speaks; the value is the metrics label."""

    NEED_MORE = "need_more"  # not decided yet: peek more (never returned when final)
    HTTP1 = "http1"
    HTTP2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"
    TUNNEL = "tunnel"  # a peer meshd's opaque tunnel: TUNNEL_PREFIX, a port, CRLF


class ClientHelloInfo(NamedTuple):
    """The routing-relevant parts of a ClientHello."""

    sni: str | None  # the host_name entry of server_name, lowercased; None when absent
    alpn: tuple[str, ...]  # protocol names in the client's order (latin-1, lossless)


# meshd-to-meshd opaque TCP: the outbound side opens the peer's inbound port and names
# the target port on the peer's host in one line before the client's bytes.
TUNNEL_PREFIX = b"MESHD-TUNNEL "
_TUNNEL_LINE_MAX = len(TUNNEL_PREFIX) + 7  # "65535\r\n"


def tunnel_header(port: int) -> bytes:
    return TUNNEL_PREFIX + b"%d\r\n" % port


def parse_tunnel(prefix: bytes) -> tuple[int, bytes] | None:
    """(target port, the bytes after the line) of a tunnel header; None when malformed."""
    end = prefix.find(b"\r\n", 0, _TUNNEL_LINE_MAX)
    digits = prefix[len(TUNNEL_PREFIX):end]
    if end < 0 or not digits.isdigit() or not 0 < int(digits) <= 65535 or len(digits) > 5:
        return None
    return int(digits), prefix[end + 2:]


def detect(prefix: bytes, *, final: bool) -> Detection:
    """Classify the first bytes of a connection.

    ``final`` means no more bytes will be peeked (timeout, EOF, or the limit reached);
    ``prefix`` of ``PEEK_LIMIT`` bytes or more is treated as final whatever it says.
    """
    final = final or len(prefix) >= PEEK_LIMIT
    if not prefix:
        return Detection.OPAQUE if final else Detection.NEED_MORE
    first = prefix[0]
    if first == 0x4D and TUNNEL_PREFIX.startswith(prefix[: len(TUNNEL_PREFIX)]):  # "M"
        if len(prefix) >= len(TUNNEL_PREFIX):
            if b"\r\n" in prefix[:_TUNNEL_LINE_MAX]:
                return Detection.TUNNEL
            return Detection.OPAQUE if final or len(prefix) >= _TUNNEL_LINE_MAX else Detection.NEED_MORE
        if not final:
            return Detection.NEED_MORE
    if first == _TLS_HANDSHAKE:
        return _detect_tls(prefix, final)
    if first == 0x50 and H2_PREFACE.startswith(prefix[: len(H2_PREFACE)]):  # "P"
        if len(prefix) >= len(H2_PREFACE):
            return Detection.HTTP2
        if not final:
            return Detection.NEED_MORE
        # A final, partial preface is not HTTP/2; it may still be an HTTP/1 line start.
    return _detect_http1(prefix, final)


def _detect_tls(prefix: bytes, final: bool) -> Detection:
    header = prefix[:6]
    if len(header) >= 2 and header[1] != 0x03:
        return Detection.OPAQUE
    if len(header) >= 3 and header[2] > 0x04:
        return Detection.OPAQUE
    if len(header) >= 5:
        length = int.from_bytes(header[3:5], "big")
        if not 4 <= length <= _TLS_MAX_RECORD:  # room for at least a handshake header
            return Detection.OPAQUE
    if len(header) >= 6:
        return Detection.TLS if header[5] == _TLS_CLIENT_HELLO else Detection.OPAQUE
    return Detection.OPAQUE if final else Detection.NEED_MORE


def _detect_http1(prefix: bytes, final: bool) -> Detection:
    """``method SP target SP "HTTP/1."`` within the first line (the target may even hold
    spaces: the strict parser refuses it, detection must not tunnel it)."""
    line = prefix[:PEEK_LIMIT]
    # RFC 9112 §2.2: an empty line may precede the request line (the parser skips one).
    if line.startswith(b"\r\n"):
        line = line[2:]
    elif line == b"\r":
        line = b""
    m = _METHOD_SP.match(line)
    if m is None:
        return Detection.OPAQUE if line or final else Detection.NEED_MORE
    eol = line.find(b"\n")
    first = line if eol < 0 else line[:eol]
    if not m.group(1):  # only a method so far
        return Detection.NEED_MORE if m.end() == len(line) and not final else Detection.OPAQUE
    version = first.find(_VERSION, m.end() + 1)  # at least one target byte before it
    # Only the bytes before the version are checked, so that a decision never changes
    # as more bytes arrive: whatever follows "HTTP/1." is the strict parser's business.
    if _CTL.search(first, 0, version if version >= 0 else len(first)) is not None:
        return Detection.OPAQUE
    if version >= 0:
        return Detection.HTTP1
    if eol >= 0:
        return Detection.OPAQUE  # a whole first line without the version
    if not final:
        return Detection.NEED_MORE
    return Detection.HTTP1 if len(first) > m.end() else Detection.OPAQUE


class _Malformed(Exception):
    """Internal: the bytes are not a complete, well-formed ClientHello."""


class _Reader:
    """A bounds-checked cursor over a buffer; every overrun is ``_Malformed``."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _Malformed()
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def take_all(self) -> bytes:
        return self.take(self.left)

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> _Reader:
        """A sub-reader over a length-prefixed vector; the cursor moves past it."""
        n = self.uint(length_bytes)
        start = self.pos
        self.take(n)
        return _Reader(self.buf, start, start + n)

    @property
    def left(self) -> int:
        return self.end - self.pos


def client_hello_info(prefix: bytes) -> ClientHelloInfo | None:
    """The SNI and ALPN of the ClientHello at the start of ``prefix``.

    None when ``prefix`` does not hold a complete, well-formed ClientHello (incomplete,
    not TLS, malformed, duplicate extensions, a non-ASCII host name). The handshake
    message may span several records. Work is linear in ``len(prefix)``; never raises.
    """
    try:
        return _parse_client_hello(_handshake_message(prefix))
    except _Malformed:
        return None


def _handshake_message(prefix: bytes) -> bytes:
    """Reassemble the first handshake message from consecutive handshake records."""
    records = _Reader(prefix)
    body = bytearray()
    need = -1
    while need < 0 or len(body) < need:
        if records.uint(1) != _TLS_HANDSHAKE or records.uint(1) != 0x03 or records.uint(1) > 0x04:
            raise _Malformed()
        fragment = records.vector(2)
        if not 0 < fragment.left <= _TLS_MAX_RECORD:
            raise _Malformed()
        body += fragment.take_all()
        if need < 0 and len(body) >= 4:
            if body[0] != _TLS_CLIENT_HELLO:
                raise _Malformed()
            need = 4 + int.from_bytes(body[1:4], "big")
    return bytes(body[4:need])


def _parse_client_hello(hello: bytes) -> ClientHelloInfo:
    r = _Reader(hello)
    r.take(2 + 32)  # legacy_version, random
    if r.vector(1).left > 32:  # legacy_session_id
        raise _Malformed()
    suites = r.vector(2)
    if suites.left < 2 or suites.left % 2:
        raise _Malformed()
    if r.vector(1).left < 1:  # legacy_compression_methods
        raise _Malformed()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if r.left == 0:  # TLS 1.2 and older may omit the extensions block entirely
        return ClientHelloInfo(sni, alpn)
    extensions = r.vector(2)
    if r.left:
        raise _Malformed()
    seen: set[int] = set()
    while extensions.left:
        ext_type = extensions.uint(2)
        data = extensions.vector(2)
        if ext_type in seen:  # RFC 8446 §4.2: at most one extension of each type
            raise _Malformed()
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            sni = _server_name(data)
        elif ext_type == _EXT_ALPN:
            alpn = _alpn(data)
    return ClientHelloInfo(sni, alpn)


def _server_name(data: _Reader) -> str | None:
    """RFC 6066 §3: the host_name entry of a ServerNameList (at most one)."""
    if data.left == 0:  # a server's empty acknowledgement; malformed in a ClientHello
        raise _Malformed()
    names = data.vector(2)
    if data.left or names.left == 0:
        raise _Malformed()
    host: str | None = None
    while names.left:
        name_type = names.uint(1)
        name = names.vector(2).take_all()
        if name_type != 0:
            continue  # unknown name types are skipped
        if host is not None or not name or not name.isascii():
            raise _Malformed()
        host = name.decode("ascii").lower()
    return host


def _alpn(data: _Reader) -> tuple[str, ...]:
    """RFC 7301 §3.1: a non-empty ProtocolNameList of non-empty names."""
    names = data.vector(2)
    if data.left or names.left == 0:
        raise _Malformed()
    out = []
    while names.left:
        name = names.vector(1).take_all()
        if not name:
            raise _Malformed()
        out.append(name.decode("latin-1"))
    return tuple(out)
