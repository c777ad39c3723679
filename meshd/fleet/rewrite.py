"""A fleet route's filters applied to one request and its response (sans-IO: heads in,
heads out): the Gateway API's URLRewrite (hostname, ReplaceFullPath,
ReplacePrefixMatch), RequestHeaderModifier and ResponseHeaderModifier, Consul's
``PrefixRewrite``, ``RequestHeaders`` and ``ResponseHeaders``.

``Rewrite`` is compiled once per (route, match) when a worker loads the policies
(``meshd.fleet.select``) and handed to the request with its ``Policy``; the client side
applies it to the head it sends upstream (``http1`` for an HTTP/1.1 client's request,
``h2`` / ``h2_request`` for an HTTP/2 client's) and to the response head it relays
(``response``). What the client sent stays as it was for the access log, the tap and
tracing.

Path rewrites replace the path only (the query string is kept):

- a Gateway API ``PathPrefix`` match (meshd's ``segments``) replaces whole path elements
  as the spec's table says: "/foo/bar" with the prefix "/foo" and "/xyz" becomes
  "/xyz/bar", with "" or "/" becomes "/bar"; a trailing "/" of either is ignored; an
  empty result is "/";
- a Consul ``PathPrefix`` or ``PathExact`` match (meshd's ``prefix`` / ``exact``) is
  replaced as characters, as Envoy's ``prefix_rewrite`` that Consul configures does
  ("/api/x" with the prefix "/api" and "/" becomes "//x": Consul's own documentation
  says to end both with "/");
- ``full_path_rewrite`` replaces the whole path.

Header edits (``meshd.fleet.api.HeaderEdit``) remove, then set, then add. Names and values
were checked by ``meshd.fleet.wire.problem`` (tokens, printable ASCII without surrounding
blanks, no framing, hop-by-hop, pseudo or meshd's own fields), so the heads built from
them stay valid for both protocols; HTTP/2 names are lower-cased here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from meshd.fleet.api import HeaderEdit, Match, Route
from meshd.proto import http1

Fields = list[tuple[bytes, bytes]]

# Fields a filter may not name: framing and connection-specific ones (meshd writes
# those for each hop), the Host (``host_rewrite`` changes it) and meshd's own.
RESERVED = frozenset(("host", "content-length", "transfer-encoding", "connection",
                      "keep-alive", "proxy-connection", "te", "upgrade", "trailer",
                      "http2-settings"))
RESERVED_PREFIX = "meshd-"


def reserved(name: str) -> bool:
    n = name.lower()
    return n in RESERVED or n.startswith(RESERVED_PREFIX) or n.startswith(":")


class _Edit:
    __slots__ = ("drop", "append", "append_lower")

    def __init__(self, edit: HeaderEdit) -> None:
        self.drop = frozenset(n.lower().encode("latin-1")
                              for n in (*edit.remove, *(k for k, _ in edit.set)))
        self.append = [(k.encode("latin-1"), v.encode("latin-1"))
                       for k, v in (*edit.set, *edit.add)]
        self.append_lower = [(k.lower(), v) for k, v in self.append]

    def apply(self, headers: Sequence[tuple[bytes, bytes]], h2: bool) -> Fields:
        drop = self.drop
        out = [(k, v) for k, v in headers if k.lower() not in drop] if drop else list(headers)
        out += self.append_lower if h2 else self.append
        return out


class Rewrite:
    """The filters of one route, for requests that matched ``match``."""

    __slots__ = ("path_kind", "prefix", "path", "host", "request", "response_edit")

    def __init__(self, route: Route, match: Match | None) -> None:
        self.path_kind = ""          # "" | "full" | "segments" | "chars"
        self.prefix = b""
        self.path = b""
        if route.full_path_rewrite is not None:
            self.path_kind, self.path = "full", route.full_path_rewrite.encode("latin-1")
        elif route.prefix_rewrite is not None:
            pm = match.path if match is not None else None
            if pm is None:           # no path condition: the prefix "/" (the spec's default)
                self.path_kind, self.prefix = "segments", b"/"
            elif pm.kind == "segments":
                self.path_kind, self.prefix = "segments", pm.value.encode("latin-1")
            else:                    # prefix / exact (wire.problem refuses regex)
                self.path_kind, self.prefix = "chars", pm.value.encode("latin-1")
            self.path = route.prefix_rewrite.encode("latin-1")
        self.host = route.host_rewrite.encode("latin-1") if route.host_rewrite else None
        self.request = _Edit(route.request_headers) if route.request_headers else None
        self.response_edit = _Edit(route.response_headers) if route.response_headers else None

    @staticmethod
    def of(route: Route, match: Match | None) -> Rewrite | None:
        """The route's filters, or None when it has none (most routes)."""
        if (route.prefix_rewrite is None and route.full_path_rewrite is None
                and route.host_rewrite is None and route.request_headers is None
                and route.response_headers is None):
            return None
        return Rewrite(route, match)

    # -- the request ------------------------------------------------------------------

    def target(self, target: bytes) -> bytes:
        """The request target sent upstream (origin-form; "*" and others unchanged)."""
        kind = self.path_kind
        if not kind or not target.startswith(b"/"):
            return target
        q = target.find(b"?")
        path, query = (target, b"") if q < 0 else (target[:q], target[q:])
        if kind == "full":
            new = self.path
        elif kind == "chars":
            if not path.startswith(self.prefix):   # cannot be: the match held
                return target
            new = self.path + path[len(self.prefix):]
        else:
            base = self.prefix.rstrip(b"/")
            if path != base and not path.startswith(base + b"/"):
                return target
            new = self.path.rstrip(b"/") + path[len(base):]
        return (new or b"/") + query

    def http1(self, req: http1.RequestHead) -> http1.RequestHead:
        """A copy of an HTTP/1.1 client's request head as it goes upstream (over
        HTTP/1.1 or translated to HTTP/2): target, Host and header fields."""
        headers: Fields = req.headers
        host = req.host
        if self.host is not None:
            host = self.host
            headers = [(k, v) for k, v in headers if k.lower() != b"host"]
            headers.append((b"Host", host))
        if self.request is not None:
            headers = self.request.apply(headers, False)
        return replace(req, target=self.target(req.target), headers=headers, host=host)

    def h2(self, headers: Sequence[tuple[bytes, bytes]]) -> Fields:
        """An HTTP/2 client's request head (pseudo-header fields first) as it goes to an
        HTTP/2 upstream."""
        out: Fields = []
        for k, v in headers:
            if k == b":path":
                v = self.target(v)
            elif k == b":authority" and self.host is not None:
                v = self.host
            elif k == b"host" and self.host is not None:
                continue
            out.append((k, v))
        if self.host is not None and not any(k == b":authority" for k, _ in out):
            out.insert(1, (b":authority", self.host))
        return self.request.apply(out, True) if self.request is not None else out

    def h2_request(self, target: bytes, authority: bytes | None, fields: Fields,
                   ) -> tuple[bytes, bytes | None, Fields]:
        """(target, authority, regular fields) of an HTTP/2 client's request as it goes
        to an HTTP/1.1 upstream (``meshd.proto.translate.http1_request``)."""
        if self.host is not None:
            authority = self.host
            fields = [(k, v) for k, v in fields if k != b"host"]
        if self.request is not None:
            fields = self.request.apply(fields, True)
        return self.target(target), authority, fields

    # -- the response -----------------------------------------------------------------

    def response(self, headers: Sequence[tuple[bytes, bytes]], h2: bool) -> Fields:
        """The response head relayed to the client (HTTP/2: pseudo-header fields kept)."""
        if self.response_edit is None:
            return list(headers)
        return self.response_edit.apply(headers, h2)
