"""The sans-IO HTTP/1.1 core (RFC 9112, RFC 9110): heads, framing, chunked coding.

Owns: parsing request and response heads into ``RequestHead`` / ``ResponseHead``,
the strict framing rules that keep an ambiguous request from ever being forwarded,
the hop-by-hop field list, serializing heads, and encoding / incrementally decoding
the chunked transfer coding. Bytes in, values out: no sockets, no gevent, no ssl.

It is on the per-request hot path, so a head is parsed with a few ``find`` / ``count``
calls and precompiled regexes over the whole head, never byte by byte in Python.
Request errors are ``BadRequest`` (400) and its subclasses ``UriTooLong`` (414) and
``HeadersTooLarge`` (431), or ``NotImplementedByProxy`` (501) for a transfer coding we
cannot decode; response errors are ``UpstreamError`` (502).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

from meshd.errors import (
    BadRequest,
    HeadersTooLarge,
    NotImplementedByProxy,
    UpstreamError,
    UriTooLong,
)

HEAD_END = b"\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# Content-Length and chunk sizes must fit a signed 64-bit integer, like every other
# proxy on the path; a bigger value is a smuggling attempt or garbage.
_MAX_LENGTH = 2**63 - 1

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[" + _TCHAR + rb"]+")
# Only HTTP/1.0 and HTTP/1.1 are accepted: "HTTP/1.2" does not exist and a proxy cannot
# know its framing, HTTP/2 has its own connection preface. The target is VCHAR only
# (no obs-text), which is what h11 and most servers accept.
_VCHAR = rb"\x21-\x7e"
_REQUEST_LINE = re.compile(rb"([" + _TCHAR + rb"]+) ([" + _VCHAR + rb"]+) (HTTP/1\.[01])")
_ANY_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
# A missing reason phrase (and even its SP) is common enough in the wild to accept.
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
# field-line = field-name ":" OWS field-value OWS; a value byte is anything but a CTL
# (HTAB aside), so CR, LF and NUL never match. Every quantifier is possessive: Python's
# backtracking engine would otherwise go quadratic on a value with a long run of spaces.
_NAME = rb"([" + _TCHAR + rb"]++):[ \t]*+"
_VALUE = rb"((?:[ \t]*+[^\x00-\x20\x7f]++)*+)[ \t]*+"
# One field line per match. ``^`` in MULTILINE mode matches only at line starts once bare
# LFs are ruled out, so a malformed line yields no match and the match count tells
# whether every line was well formed.
_FIELD_LINES = re.compile(rb"^" + _NAME + _VALUE + rb"\r\n", re.MULTILINE)
_FIELD_LINE = re.compile(_NAME + _VALUE)
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 3986 authority characters (reg-name, IP literal, port); no userinfo in Host.
_HOST = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]*")
# The same rules for what reaches HTTP/1.1 from elsewhere (HTTP/2's pseudo-header fields,
# meshd.proto.h2_headers): a method is a token, a request-target VCHAR only, Host the
# authority above, and no value holds a CTL but HTAB.
TOKEN = _TOKEN
TARGET = re.compile(rb"[" + _VCHAR + rb"]+")
HOST = _HOST
CTL = _CTL
# chunk = chunk-size [ chunk-ext ] CRLF; BWS is allowed only before an extension.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]++)(?:[ \t]*+;[^\x00-\x08\x0a-\x1f\x7f]*+)?+")

# Registered transfer codings (IANA HTTP Transfer Coding registry), plus "identity",
# which RFC 7230 removed: known but not chunked-last is a framing error (400), an
# unknown coding is something we cannot decode (501, RFC 9112 §6.1).
_KNOWN_CODINGS = frozenset(
    [b"chunked", b"compress", b"deflate", b"gzip", b"identity", b"x-compress", b"x-gzip"]
)

# RFC 9110 §7.6.1: Connection itself and the fields it lists are hop-by-hop, and
# intermediaries remove Proxy-Connection, Keep-Alive, TE, Transfer-Encoding and Upgrade
# whether or not they are listed. Trailer, Proxy-Authenticate and Proxy-Authorization
# are not in that list and are forwarded.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    [b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade"]
)
_STRIPPED = HOP_BY_HOP | {b"content-length"}
STRIPPED = _STRIPPED  # what ``strip_hop_by_hop`` drops besides Connection's tokens
_EMPTY: frozenset[bytes] = frozenset()

_SPECIAL = frozenset(
    [b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade"]
)
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


@dataclass(slots=True)
class RequestHead:
    """A parsed, framing-checked request head."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # names as received, values without surrounding OWS
    host: bytes | None
    content_length: int | None  # None when absent (and when chunked)
    chunked: bool
    keep_alive: bool
    expect_continue: bool  # always False for HTTP/1.0 (RFC 9110 §10.1.1)
    upgrade: bytes | None  # only when Connection lists "upgrade", never for HTTP/1.0 (§7.8)
    connection_tokens: frozenset[bytes]

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head (chunked, or a Content-Length above zero)."""
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head from an upstream."""

    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    content_length: int | None  # None with chunked False means: read until the upstream closes
    chunked: bool
    keep_alive: bool  # may the upstream connection be reused after this response
    connection_tokens: frozenset[bytes]


def _field_block(head: bytes, start: int, max_headers: int,
                 ) -> tuple[list[tuple[bytes, bytes]], dict[bytes, list[bytes]]]:
    """Parse the field lines in ``head[start:-2]`` (each ending with CRLF) into pairs,
    and ``_collect`` them (in the same call: one less per head)."""
    block = head[start:-2]
    if not block:
        return [], {}
    n = block.count(b"\r\n")
    if n > max_headers:
        raise HeadersTooLarge(f"more than {max_headers} header fields")
    fields: list[tuple[bytes, bytes]] = _FIELD_LINES.findall(block)
    if len(fields) != n or block.count(b"\n") != n:
        raise _field_block_error(block)
    return fields, _collect(fields)


def _field_block_error(block: bytes) -> BadRequest:
    """Name the first thing wrong with a header section that failed the fast path."""
    n = block.count(b"\r\n")
    if block.count(b"\n") != n:
        return BadRequest("bare LF in header section")
    if block.count(b"\r") != n:
        return BadRequest("bare CR in header section")
    if b"\x00" in block:
        return BadRequest("NUL in header section")
    for line in block[:-2].split(b"\r\n"):
        _field_line(line)
    return BadRequest("malformed header section")  # unreachable unless the regexes disagree


def _field_line(line: bytes) -> tuple[bytes, bytes]:
    """Parse one field line (without its CRLF), naming what is wrong with it."""
    m = _FIELD_LINE.fullmatch(line)
    if m is not None:
        return m.group(1), m.group(2)
    # RFC 9112 §5.2: obs-fold is rejected; §2.2: so is whitespace before the first field.
    if line[:1] in (b" ", b"\t"):
        raise BadRequest("obs-fold (header line starting with whitespace)")
    if _CTL.search(line) is not None:
        raise BadRequest("control character in header field")
    name, colon, _ = line.partition(b":")
    if not colon:
        raise BadRequest("header line without colon")
    if not name:
        raise BadRequest("empty header field name")
    if name[-1:] in (b" ", b"\t"):
        raise BadRequest("whitespace between header field name and colon")
    raise BadRequest("invalid character in header field name")


def _collect(headers: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """The values of the fields that decide framing and routing, by lowercased name."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lname = name.lower()
        if lname in _SPECIAL:
            if lname in found:  # no setdefault/append: one call less per field (hot path)
                found[lname].append(value)
            else:
                found[lname] = [value]
    return found


def _tokens(values: list[bytes] | None) -> frozenset[bytes]:
    if not values:
        return _EMPTY
    if len(values) == 1 and b"," not in values[0]:  # the usual single token: no generator
        token = values[0].strip(b" \t").lower()
        return frozenset((token,)) if token else _EMPTY
    return frozenset(t.strip(b" \t").lower() for v in values for t in v.split(b",")) - {b""}


# The Connection values nearly every message has, and their tokens: looked up rather
# than split, stripped and lowercased each time (``_tokens`` gives the same sets).
_COMMON_TOKENS = {v: frozenset((v.lower(),)) for v in (
    b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")}


def _keep_alive(http11: bool, tokens: frozenset[bytes]) -> bool:
    """RFC 9112 §9.3: persistent by default in HTTP/1.1, only on request in HTTP/1.0."""
    if b"close" in tokens:
        return False
    return http11 or b"keep-alive" in tokens


def _codings(values: list[bytes]) -> list[bytes]:
    """Lowercased transfer-coding names of all Transfer-Encoding fields, in order."""
    codings = []
    for value in values:
        for element in value.split(b","):
            name, semi, _params = element.partition(b";")
            name = name.strip(b" \t").lower()
            if not name:
                raise BadRequest("empty Transfer-Encoding element")
            if _TOKEN.fullmatch(name) is None or (semi and name == b"chunked"):
                raise BadRequest("invalid Transfer-Encoding")
            codings.append(name)
    return codings


def _content_length(value: bytes) -> int:
    if value.isdigit() and len(value) < 19:  # ASCII digits, below 2**63 - 1 whatever they are
        return int(value)
    if not value:
        raise BadRequest("empty Content-Length")
    if b"," in value:
        raise BadRequest("Content-Length list value")
    if not value.isdigit():  # ASCII digits only: no sign, no whitespace, no "0x"
        raise BadRequest("invalid Content-Length")
    if len(value) > 19 or int(value) > _MAX_LENGTH:
        raise BadRequest("Content-Length too large")
    return int(value)


def _request_line_error(line: bytes) -> BadRequest:
    if not line:
        return BadRequest("empty request line")
    if b"\n" in line:
        return BadRequest("bare LF in request line")
    parts = line.split(b" ")
    if len(parts) == 3 and _ANY_VERSION.fullmatch(parts[2]) and _REQUEST_LINE.fullmatch(
        b"%s %s HTTP/1.1" % (parts[0], parts[1])
    ):
        return BadRequest("unsupported HTTP version")
    return BadRequest("malformed request line")


def parse_request_head(
    head: bytes, *, max_request_line: int = 8192, max_headers: int = 100
) -> RequestHead:
    """Parse a request head: the bytes up to and including the first ``HEAD_END``."""
    if not head.endswith(HEAD_END):
        raise BadRequest("request head does not end with an empty line")
    # RFC 9112 §2.2: ignore at least one empty line before the request line; one is enough.
    start = 2 if head.startswith(b"\r\n") else 0
    eol = head.find(b"\r\n", start)
    if eol - start > max_request_line:
        raise UriTooLong(f"request line longer than {max_request_line} bytes")
    m = _REQUEST_LINE.fullmatch(head, start, eol)
    if m is None:
        raise _request_line_error(head[start:eol])
    method, target, version = m.groups()
    headers, special = _field_block(head, eol + 2, max_headers)
    http11 = version == b"HTTP/1.1"

    hosts = special[b"host"] if b"host" in special else None
    host = None
    if hosts is None:
        if http11:
            raise BadRequest("missing Host header")
    elif len(hosts) > 1:
        raise BadRequest("multiple Host headers")
    else:
        host = hosts[0]
        if _HOST.fullmatch(host) is None:
            raise BadRequest("invalid Host header")

    if len(special) == (hosts is not None):
        # Nothing but Host (most requests): no body, no Connection tokens, nothing to
        # expect or upgrade to; what the general path below gives them, without its calls.
        return RequestHead(method, target, version, headers, host, None, False, http11,
                           False, None, _EMPTY)

    # RFC 9112 §6.1, §6.3: a request framed two ways, or one way ambiguously, is refused
    # rather than guessed at; the proxy and the upstream must never disagree on its end.
    lengths = special.get(b"content-length")
    codings = special.get(b"transfer-encoding")
    content_length = None
    chunked = False
    if codings is not None:
        if lengths is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if not http11:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        names = _codings(codings)
        if names != [b"chunked"]:
            for name in names:
                if name not in _KNOWN_CODINGS:
                    raise NotImplementedByProxy(f"unsupported transfer coding {name[:40].decode()!r}")
            raise BadRequest("Transfer-Encoding other than chunked")
        chunked = True
    elif lengths is not None:
        if len(lengths) > 1:
            raise BadRequest("multiple Content-Length headers")
        content_length = _content_length(lengths[0])

    tokens = _tokens(special.get(b"connection"))
    expect = special.get(b"expect")
    upgrades = special.get(b"upgrade")
    if not http11:
        expect = upgrades = None  # RFC 9110 §10.1.1, §7.8: ignored in HTTP/1.0 requests
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        host=host,
        content_length=content_length,
        chunked=chunked,
        keep_alive=_keep_alive(http11, tokens),
        expect_continue=expect is not None and any(v.lower() == b"100-continue" for v in expect),
        upgrade=b", ".join(upgrades) if upgrades and b"upgrade" in tokens else None,
        connection_tokens=tokens,
    )


def parse_response_head(head: bytes, *, max_headers: int = 100) -> ResponseHead:
    """Parse a response head from an upstream; any fault is an ``UpstreamError`` (502)."""
    try:  # one function, not a wrapper around one: a call less per response
        if not head.endswith(HEAD_END):
            raise BadRequest("head does not end with an empty line")
        eol = head.find(b"\r\n")
        m = _STATUS_LINE.fullmatch(head, 0, eol)
        if m is None:
            raise BadRequest("malformed status line")
        version, status, reason = m.groups()
        headers, special = _field_block(head, eol + 2, max_headers)
        http11 = version == b"HTTP/1.1"
        # Subscripts and ``in`` rather than ``get``: fewer calls on every response.
        if b"connection" in special:
            listed = special[b"connection"]
            tokens = (_COMMON_TOKENS[listed[0]] if len(listed) == 1 and listed[0] in _COMMON_TOKENS
                      else _tokens(listed))
            keep_alive = b"close" not in tokens and (http11 or b"keep-alive" in tokens)
        else:
            tokens, keep_alive = _EMPTY, http11   # what _keep_alive says of no tokens
        lengths = special[b"content-length"] if b"content-length" in special else None
        codings = special[b"transfer-encoding"] if b"transfer-encoding" in special else None
        content_length = None
        chunked = False
        if codings is not None:
            # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            if not http11:
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 response")
            names = _codings(codings)
            if names[-1] == b"chunked":
                if names.count(b"chunked") > 1:
                    raise BadRequest("chunked applied more than once")
                chunked = True
            elif b"chunked" in names:
                raise BadRequest("chunked is not the final transfer coding")
            else:
                keep_alive = False  # RFC 9112 §6.3: the body ends when the upstream closes
            if lengths is not None:
                # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length (the caller drops
                # it), but such a message may be smuggling: do not reuse the connection.
                keep_alive = False
        elif lengths is not None:
            # RFC 9112 §6.3: repeated or listed values are accepted only when all are equal.
            if len(lengths) == 1 and b"," not in lengths[0]:  # the usual one (OWS stripped already)
                value = lengths[0]
                # _content_length's own fast case, inline (a call less per response)
                content_length = (int(value) if value.isdigit() and len(value) < 19
                                  else _content_length(value))
            else:
                values = {v.strip(b" \t") for field in lengths for v in field.split(b",")}
                if len(values) != 1:
                    raise BadRequest("conflicting Content-Length values")
                content_length = _content_length(values.pop())
        return ResponseHead(
            version=version,
            status=int(status),
            reason=reason or b"",
            headers=headers,
            content_length=content_length,
            chunked=chunked,
            keep_alive=keep_alive,
            connection_tokens=tokens,
        )
    except BadRequest as e:  # the shared field rules speak in request terms
        raise UpstreamError(f"invalid response from upstream: {e.reason}") from None


def response_has_body(request_method: bytes, status: int) -> bool:
    """RFC 9110 §6.4.1 / RFC 9112 §6.3: whether a response to this request has content."""
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return False
    return not (request_method == b"CONNECT" and status < 300)


def strip_hop_by_hop(
    headers: Iterable[tuple[bytes, bytes]], connection_tokens: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """The fields to forward: no hop-by-hop, no Connection-listed, no Content-Length."""
    drop = _STRIPPED | connection_tokens if connection_tokens else _STRIPPED
    return [field for field in headers if field[0].lower() not in drop]


# Heads are serialized with fields written as given: they come from a parsed (validated)
# head or from meshd; ``map`` of a C method, no Python frame per head (a list
# comprehension is one).
_FIELD_JOIN = b": ".join


def serialize_request_head(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """Always HTTP/1.1 towards an upstream."""
    return b"\r\n".join([b"%s %s HTTP/1.1" % (method, target), *map(_FIELD_JOIN, headers),
                          *map(_FIELD_JOIN, extra), b"", b""])


def serialize_response_head(
    status: int,
    reason: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """Always HTTP/1.1; an empty reason becomes the standard phrase (or "Unknown")."""
    phrase = reason or _REASONS.get(status, b"Unknown")
    return b"\r\n".join([b"HTTP/1.1 %d %s" % (status, phrase), *map(_FIELD_JOIN, headers),
                          *map(_FIELD_JOIN, extra), b"", b""])


def encode_chunk(data: bytes) -> bytes:
    """One chunk; never called with empty data, which would be the last chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """(authority, origin-form target) of an absolute-form request target, else None.

    RFC 9112 §3.2.2: a proxy given ``GET http://host/path`` uses that authority and
    ignores Host, and forwards ``/path`` with Host replaced."""
    lowered = target[:8].lower()
    if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
        return None
    rest = target[target.index(b"//") + 2:]
    cut = min(i for i in (rest.find(b"/"), rest.find(b"?"), len(rest)) if i >= 0)
    authority = rest[:cut]
    if not authority or b"@" in authority or _HOST.fullmatch(authority) is None:
        raise BadRequest("invalid authority in an absolute-form target")
    path = rest[cut:]
    return authority, path if path.startswith(b"/") else b"/" + path


# Fields that never belong in a trailer section (RFC 9110 §6.5.1): framing, routing and
# control fields. A proxy drops them rather than forward what the recipient may misread.
_NOT_IN_TRAILERS = _STRIPPED | {b"host", b"trailer", b"expect", b"content-type", b"authorization"}


def forwardable_trailers(trailers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in trailers if k.lower() not in _NOT_IN_TRAILERS]


def encode_trailers(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The last chunk followed by a trailer section."""
    return b"".join([b"0\r\n", *[b"%s: %s\r\n" % field for field in trailers], b"\r\n"])


# ChunkedDecoder states.
_SIZE, _DATA, _DATA_CR, _DATA_LF, _TRAILER, _DONE = range(6)


class ChunkedDecoder:
    """Incremental decoder for a chunked body. feed() returns the data pieces decoded so far.

    ``done`` turns true once the last chunk and the trailer section are read; then
    ``trailers`` holds the trailer fields and ``unconsumed`` the bytes fed after the body
    (the next pipelined message; later feeds append to it). Chunk extensions are ignored.
    ``max_line`` bounds a chunk-size line, ``max_trailer_bytes`` the trailer section.

    Work is O(bytes fed): only a partial size or trailer line is ever buffered (bounded
    by ``max_line`` / ``max_trailer_bytes``); data is sliced out of each fed buffer once,
    and a fed ``bytes`` object that is all chunk data is returned as is, without a copy.
    Pieces are always ``bytes``. Errors are ``BadRequest``; a caller decoding a response
    turns them into ``UpstreamError``.
    """

    __slots__ = ("_line", "_max_line", "_max_trailer_bytes", "_remaining", "_state",
                 "_trailer_bytes", "done", "trailers", "unconsumed")

    def __init__(self, *, max_line: int = 4096, max_trailer_bytes: int = 16384) -> None:
        self._max_line = max_line
        self._max_trailer_bytes = max_trailer_bytes
        self._state = _SIZE
        self._remaining = 0
        self._line = bytearray()
        self._trailer_bytes = 0
        self.done = False
        self.trailers: list[tuple[bytes, bytes]] = []
        self.unconsumed = b""  # bytes fed after the end of the body, valid once done

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self.done:
            self.unconsumed += data
            return []
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)
        out: list[bytes] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                if take == end and type(data) is bytes:
                    out.append(data)
                else:
                    out.append(view[pos : pos + take].tobytes())
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_CR
            elif state == _DATA_CR or state == _DATA_LF:
                if data[pos] != (13 if state == _DATA_CR else 10):
                    raise BadRequest("missing CRLF after chunk data")
                pos += 1
                self._state = _DATA_LF if state == _DATA_CR else _SIZE
            else:  # _SIZE or _TRAILER: a CRLF-terminated line
                # room: how many more bytes the line may hold before its CRLF; the trailer
                # section counts whole, CRLFs and final empty line included.
                if state == _SIZE:
                    room = self._max_line - len(self._line)
                else:
                    room = self._max_trailer_bytes - self._trailer_bytes - 2 - len(self._line)
                # Search no further than the line may reach: `room` bytes, CR, then LF.
                nl = data.find(b"\n", pos, pos + room + 2)
                if nl < 0:
                    if end - pos > room + 1:
                        raise self._too_long(state)
                    self._line += view[pos:]
                    break
                if self._line:
                    self._line += view[pos:nl]
                    line = bytes(self._line)
                    self._line.clear()
                else:
                    line = bytes(data[pos:nl])
                pos = nl + 1
                if line[-1:] != b"\r":
                    raise BadRequest("chunked line not terminated by CRLF")
                if state == _SIZE:
                    self._chunk_size(line[:-1])
                elif len(line) > 1:
                    self._trailer_bytes += len(line) + 1
                    self.trailers.append(_field_line(line[:-1]))
                else:
                    self._state = _DONE
                    self.done = True
                    self.unconsumed = view[pos:].tobytes()
                    break
        return out

    def _chunk_size(self, line: bytes) -> None:
        m = _CHUNK_SIZE.fullmatch(line)
        if m is None:
            raise BadRequest("empty chunk size" if not line else "invalid chunk size")
        digits = m.group(1).lstrip(b"0")
        if len(digits) > 16 or int(digits or b"0", 16) > _MAX_LENGTH:
            raise BadRequest("chunk size too large")
        self._remaining = int(digits or b"0", 16)
        self._state = _DATA if self._remaining else _TRAILER

    def _too_long(self, state: int) -> BadRequest:
        if state == _SIZE:
            return BadRequest(f"chunk size line longer than {self._max_line} bytes")
        return BadRequest(f"chunked trailers larger than {self._max_trailer_bytes} bytes")
