"""HTTP/2 header rules (RFC 9113 §8.2, §8.3) checked in one pass over a header list.

h2 can check the same rules itself, through a chain of seven generators per header block
(about a quarter of its cost of receiving a request) and by raising a connection error.
meshd turns h2's checks off and calls these instead: one loop, and a malformed request
becomes what RFC 9113 §8.1.1 asks for, a stream error (RST_STREAM PROTOCOL_ERROR) that
leaves the other streams of the connection alone.

Each ``*_problem`` function returns None for a valid list, else the reason, for the log.

Beyond HTTP/2's own rules, a client's request is held to what meshd's HTTP/1.1 parser
accepts (``request_problem(headers, http1_rules=True)``: both rule sets in one pass;
``http1_problem``: those rules alone; the parser's own patterns from
``meshd.proto.http1``) before it is routed or translated: HTTP/2 lets through a :method
with a space, a :path in absolute-form or with a space, an :authority with userinfo and control bytes other than
NUL, CR and LF, each of which would make a different HTTP/1.1 request upstream. And the
declared content-length is read here (``request_length``) for the server to hold the
DATA total to it (RFC 9113 §8.1.1).
"""

from __future__ import annotations

from collections.abc import Sequence

from meshd.proto import http1

Headers = Sequence[tuple[bytes, bytes]]

# §8.2.1: a name never holds 0x00-0x20, uppercase, 0x7f-0xff, nor a colon after the first
# byte; a value never holds NUL, CR or LF, nor starts or ends with SP or HTAB. Checked for
# the whole list at once with bytes.translate (C speed), per field only when that fails.
_NAME_OK = bytes(c for c in range(0x21, 0x7f) if not 0x41 <= c <= 0x5a)
_WS = (b" ", b"\t")
# §8.2.2: connection-specific fields
CONNECTION_SPECIFIC = frozenset([b"connection", b"keep-alive", b"proxy-connection",
                                 b"transfer-encoding", b"upgrade"])
_REQUEST_PSEUDO = frozenset([b":method", b":scheme", b":authority", b":path", b":protocol"])
# Token bytes (RFC 9110 §5.6.2) as h2 names have them (lower case), and ":" for the
# pseudo-header names: what ``request_problem`` allows in names under HTTP/1.1's rules.
_H1_NAME_OK = bytes(c for c in range(0x21, 0x7f)
                    if http1.TOKEN.fullmatch(bytes([c])) and not 0x41 <= c <= 0x5a) + b":"


def _fields_problem(headers: Headers) -> str | None:
    names = b"".join([n for n, _ in headers])
    values = b"".join([v for _, v in headers])
    if not names.translate(None, _NAME_OK) and b"\0" not in values and b"\r" not in values \
            and b"\n" not in values:
        for name, value in headers:
            if not name or name.find(b":", 1) != -1 or value[:1] in _WS or value[-1:] in _WS:
                break
        else:
            return None
    for name, value in headers:  # something is wrong: find what, for the log
        if not name:
            return "an empty field name"
        if name.translate(None, _NAME_OK) or name.find(b":", 1) != -1:
            return f"invalid field name {name[:64]!r}"
        if b"\0" in value or b"\r" in value or b"\n" in value or value[:1] in _WS \
                or value[-1:] in _WS:
            return f"invalid value of {name[:64]!r}"
    return None


def _regular_problem(name: bytes, value: bytes) -> str | None:
    if name in CONNECTION_SPECIFIC:
        return f"connection-specific field {name!r}"
    if name == b"te" and value.lower() != b"trailers":
        return "TE other than \"trailers\""
    return None


def request_problem(headers: Headers, http1_rules: bool = False) -> str | None:
    """What makes a request head malformed (§8.2, §8.3.1), or None. With ``http1_rules``
    (a client's request, which may go upstream as HTTP/1.1) also what meshd's HTTP/1.1
    parser would refuse (``http1_problem``'s rules), in the same pass: byte checks over
    the joined names and values, then one loop over the fields."""
    names = b"".join([n for n, _ in headers])
    values = b"".join([v for _, v in headers])
    if names.translate(None, _NAME_OK) or b"\0" in values or b"\r" in values \
            or b"\n" in values:
        return _fields_problem(headers)
    if http1_rules:
        # Every name byte a token byte, or a colon: regular names hold no colon (below)
        # and pseudo-header names are only the allowed ones, all token bytes after ":".
        if names.translate(None, _H1_NAME_OK):
            return "a field name HTTP/1.1 does not allow"
        if http1.CTL.search(values) is not None:
            return "a control character in a field value"
    seen: set[bytes] = set()
    regular = False
    method = path = authority = host = None
    for name, value in headers:
        if not name or name.find(b":", 1) != -1 or value[:1] in _WS or value[-1:] in _WS:
            return _fields_problem(headers)
        if name[0] == 0x3a:  # ":"
            if regular:
                return f"pseudo-header {name!r} after a regular field"
            if name in seen:
                return f"duplicate pseudo-header {name!r}"
            if name not in _REQUEST_PSEUDO:
                return f"pseudo-header {name!r} not allowed in a request"
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        else:
            regular = True
            problem = _regular_problem(name, value)
            if problem:
                return problem
            if name == b"host":
                if host is not None:
                    return "more than one Host field"
                host = value
    if method is None:
        return "no :method"
    connect = method == b"CONNECT"
    if connect and b":protocol" not in seen:
        if b":scheme" in seen or path is not None:
            return "CONNECT with :scheme or :path"
    else:
        if b":scheme" not in seen:
            return "no :scheme"
        if path is None:
            return "no :path"
        if not path:
            return "an empty :path"
        if not connect and b":protocol" in seen:
            return ":protocol outside CONNECT"
    if authority is None and host is None:
        return "neither :authority nor Host"
    if authority is not None and host is not None and authority != host:
        return ":authority and Host differ"
    if http1_rules:
        return _http1_pseudo_problem(method, path, authority, host)
    return None


def _http1_pseudo_problem(method: bytes, path: bytes | None, authority: bytes | None,
                          host: bytes | None) -> str | None:
    """The HTTP/1.1 rules for the request line and Host (see ``http1_problem``)."""
    if http1.TOKEN.fullmatch(method) is None:
        return f"invalid :method {method[:64]!r}"
    if path is not None:
        if path == b"*":
            if method != b"OPTIONS":
                return ":path \"*\" outside OPTIONS"
        elif path[:1] != b"/" or http1.TARGET.fullmatch(path) is None:
            return f"invalid :path {path[:64]!r}"
    for name, value in ((":authority", authority), ("host", host)):
        if value is not None and http1.HOST.fullmatch(value) is None:
            return f"invalid {name} {value[:64]!r}"
    return None


def trailers_problem(headers: Headers) -> str | None:
    """What makes a trailer section malformed (§8.1: no pseudo-headers), or None."""
    problem = _fields_problem(headers)
    if problem:
        return problem
    for name, value in headers:
        if name[0] == 0x3a:
            return f"pseudo-header {name!r} in trailers"
        problem = _regular_problem(name, value)
        if problem:
            return problem
    return None


def http1_problem(headers: Headers) -> str | None:
    """What meshd's HTTP/1.1 parser would refuse in a request head HTTP/2 accepted
    (``request_problem(headers, http1_rules=True)`` checks the same in its one pass): a method that is not a token, a :path neither
    origin-form (VCHAR only, starting with "/") nor "*" for OPTIONS, an :authority or
    Host outside the Host grammar (userinfo included), a field name that is not a
    token, a CTL other than HTAB in any value. None when it translates faithfully."""
    problem = http1_fields_problem(headers)
    if problem:
        return problem
    method = next((v for n, v in headers if n == b":method"), b"")
    if http1.TOKEN.fullmatch(method) is None:
        return f"invalid :method {method[:64]!r}"
    for name, value in headers:
        if name == b":path":
            if value == b"*":
                if method != b"OPTIONS":
                    return ":path \"*\" outside OPTIONS"
            elif value[:1] != b"/" or http1.TARGET.fullmatch(value) is None:
                return f"invalid :path {value[:64]!r}"
        elif name == b":authority" or name == b"host":
            if http1.HOST.fullmatch(value) is None:
                return f"invalid {name.decode()} {value[:64]!r}"
    return None


def http1_fields_problem(headers: Headers) -> str | None:
    """The part of ``http1_problem`` for any field section (trailers too): field names
    that are not tokens, a CTL other than HTAB in a value."""
    regular = b"".join([n for n, _ in headers if n[:1] != b":"])
    if regular and http1.TOKEN.fullmatch(regular) is None:
        return "a field name HTTP/1.1 does not allow"
    if http1.CTL.search(b"".join([v for _, v in headers])) is not None:
        return "a control character in a field value"
    return None


def request_length(headers: Headers) -> int | None:
    """The request's declared content-length, None when it declares none. ValueError
    (with the reason) for a value that is not digits or fields that disagree."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or len(value) > 19:
                raise ValueError(f"invalid content-length {value[:32]!r}")
            n = int(value)
            if length is not None and n != length:
                raise ValueError("content-length fields that disagree")
            length = n
    return length


def response_problem(headers: Headers) -> str | None:
    """What makes a response head (final or 1xx) malformed (§8.3.2), or None."""
    problem = _fields_problem(headers)
    if problem:
        return problem
    status = None
    regular = False
    for name, value in headers:
        if name[0] == 0x3a:
            if regular:
                return f"pseudo-header {name!r} after a regular field"
            if name != b":status" or status is not None:
                return f"pseudo-header {name!r} not allowed in a response"
            status = value
        else:
            regular = True
            problem = _regular_problem(name, value)
            if problem:
                return problem
    if status is None:
        return "no :status"
    if len(status) != 3 or not status.isdigit():
        return f"invalid :status {status[:16]!r}"
    return None
