"""From Gateway API HTTPRoutes and GRPCRoutes to meshd's fleet ``Routes`` of one Service:
the sans-IO core of the ``kubernetes`` config source (no sockets here).

Which routes count (GAMMA, the Gateway API's mesh pattern, GEP-1294): those with a
``parentRefs`` entry naming the Service (``group`` "" or "core", ``kind`` Service,
``namespace`` unset meaning the route's own). Other parentRefs (Gateways) are ignored.
*Producer* routes live in the Service's namespace and apply to every client; *consumer*
routes live in the client's namespace (meshd's own, the ``home`` namespace) and, when
there are any, replace the producer routes for that client (the two are not merged).

Translation, per route (``parse``; anything meshd cannot do faithfully is refused with
the field path, never approximated silently):

- every ``rules[i].matches[j]`` becomes one meshd ``Route`` named
  ``HTTPRoute ns/name rules[i].matches[j]`` (a rule without matches matches every
  request, as the spec's default ``PathPrefix /``), with the rule's destination;
- path ``PathPrefix`` is by path elements (meshd's ``segments``; a trailing "/" is
  ignored as in the Ingress API), ``Exact``, ``RegularExpression`` (Python ``re``,
  whole path); headers and query params ``Exact``/``RegularExpression`` (the first of
  equal names only, as the spec says); ``method``;
- ``backendRefs`` (Services, in any namespace: the mesh needs no ReferenceGrant, says
  GEP-1294; ``weight`` default 1) are the weighted destination; none: the parent Service
  itself (the mesh's default);
- ``timeouts.request`` is the request timeout, ``timeouts.backendRequest`` one
  attempt's ("0s" disables: a day for the request, meshd's "no limit" for an attempt);
- ``retry.attempts`` (and ``retry.codes`` when all are 5xx: meshd retries any 5xx);
- filters: ``RequestHeaderModifier`` and ``ResponseHeaderModifier`` (set, add, remove;
  not of framing, connection-specific, Host or meshd's own fields), ``URLRewrite``
  (``hostname``, ``path`` ReplaceFullPath and ReplacePrefixMatch, the latter on
  PathPrefix matches only), applied by ``meshd.fleet.rewrite``; the others
  (RequestRedirect, RequestMirror, CORS, ExtensionRef, ...) and backendRefs' filters are
  refused;
- a Service with routes attached answers 404 to a request none of their rules match
  (``Routes.unmatched`` "reject": GAMMA, "requests that do not match at least one of the
  Routes will be rejected"; the HTTPRoute spec: "a HTTP 404 status code MUST be
  returned"); with none attached, the Service itself as before;
- a GRPCRoute's ``method`` match becomes a path match on ``/service/method`` and every
  GRPCRoute rule also needs ``content-type: application/grpc...``, so gRPC routes and
  HTTP routes attached to one Service do not mix (the spec forbids merging them).

Merging every route of a Service (``merge``), in the spec's precedence order: gRPC routes
first (by service then method characters, then header count); then HTTP routes by an
``Exact`` path, then ``RegularExpression`` (implementation-specific in the spec; longer
first, as Envoy Gateway does), then ``PathPrefix`` with the most characters, a method
match, the most header matches, the most query matches; ties go to the oldest route
(``creationTimestamp``), then ``namespace/name``, then rule and match order.

``ServiceRoutes`` keeps the last good version of each route of one Service: a route
edited into something invalid is refused (``Refused`` names it and why) while its
previous version keeps serving in the merge.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshd.fleet.api import (
    MAX_CONDITIONS,
    MAX_HEADER_EDITS,
    MAX_HEADER_VALUE,
    MAX_REGEX,
    MAX_ROUTES,
    MAX_TARGETS,
    HeaderEdit,
    HeaderMatch,
    Match,
    PathMatch,
    QueryMatch,
    Route,
    Routes,
    Target,
    Update,
    WeightedTarget,
)
from meshd.fleet.rewrite import reserved
from meshd_kubernetes.objects import (
    Invalid,
    as_list,
    as_map,
    object_name,
    timestamp,
)
from meshd_kubernetes.reports import PartReporter

KINDS = ("HTTPRoute", "GRPCRoute")
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                     "PATCH"))
MAX_WEIGHT = 1_000_000
DISABLED = 86400.0   # "0s" request timeout: the longest meshd sets (the spec's fallback)
_DURATION = re.compile(r"(?:[0-9]{1,5}(?:h|m|s|ms)){1,4}")   # GEP-2257
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PATH_CHARS = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HOSTNAME = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)*")
GRPC_CONTENT_TYPE = HeaderMatch("content-type", "prefix", "application/grpc")


@dataclass(frozen=True, slots=True)
class Parsed:
    """One valid route: its meshd routes with their precedence keys."""
    kind: str
    namespace: str
    name: str
    created: datetime.datetime
    routes: tuple[tuple[tuple[Any, ...], Route], ...]   # (precedence key, route)

    @property
    def entry(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def entry_of(kind: str, obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata")
    md = md if isinstance(md, Mapping) else {}
    return f"{kind} {md.get('namespace', '')}/{md.get('name', '')}"


def parents(obj: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """The Services (namespace, name) a parentRef of ``obj`` names. (Lenient: a route
    too broken to say is no Service's concern.)"""
    md, spec = obj.get("metadata"), obj.get("spec")
    if not isinstance(md, Mapping) or not isinstance(spec, Mapping):
        return frozenset()
    refs = spec.get("parentRefs")
    if not isinstance(refs, list):
        return frozenset()
    own = md.get("namespace")
    out: set[tuple[str, str]] = set()
    for r in refs[:64]:   # the CRD's own maxItems is 32
        if (isinstance(r, Mapping) and r.get("group", "") in ("", "core")
                and r.get("kind") == "Service"):
            ns, name = r.get("namespace", own), r.get("name")
            if isinstance(ns, str) and isinstance(name, str):
                out.add((ns, name))
    return frozenset(out)


def attaches(obj: Mapping[str, Any], namespace: str, service: str) -> bool:
    """Does a parentRef of ``obj`` name Service ``namespace/service``?"""
    return (namespace, service) in parents(obj)


def parse(kind: str, obj: Mapping[str, Any],
          target_name: Callable[[str, str], str]) -> Parsed:
    """A valid route's meshd routes; ``Invalid`` naming the field otherwise.
    ``target_name(namespace, name)`` is meshd's name of a backend Service."""
    if kind not in KINDS:
        raise Invalid(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    md = as_map(obj.get("metadata"), "metadata")
    namespace, name = md.get("namespace"), md.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str) or not name:
        raise Invalid("metadata: no namespace and name")
    created = timestamp(md.get("creationTimestamp"))
    spec = as_map(obj.get("spec"), "spec")
    rules = as_list(spec.get("rules", []), "spec.rules")
    out: list[tuple[tuple[Any, ...], Route]] = []
    for i, raw in enumerate(rules):
        at = f"spec.rules[{i}]"
        rule = as_map(raw, at)
        destination = _backends(rule.get("backendRefs", []), f"{at}.backendRefs", namespace,
                                target_name)
        extras = _rule_extras(rule, at, kind)
        matches = as_list(rule.get("matches", []), f"{at}.matches") or [{}]
        # The rule's name (metrics' route label, traces, /config), shared by its matches:
        # the route's and the rule's own name (Gateway API v1.2 rules[].name), else its index.
        rule_name = f"{namespace}/{name}#{rule.get('name') or i}"
        for j, m in enumerate(matches):
            where = f"{at}.matches[{j}]"
            if kind == "HTTPRoute":
                match, key = _http_match(as_map(m, where), where)
            else:
                match, key = _grpc_match(as_map(m, where), where)
            if "prefix_rewrite" in extras and (match.path is None
                                               or match.path.kind != "segments"):
                raise Invalid(f"{where}.path: URLRewrite's ReplacePrefixMatch needs a "
                              f"PathPrefix match")
            route = Route(name=rule_name, matches=(match,),
                          destination=destination, **extras)
            out.append(((*key, created, f"{namespace}/{name}", i, j), route))
    if len(out) > MAX_ROUTES:
        raise Invalid(f"spec.rules: {len(out)} matches in all, meshd takes at most "
                      f"{MAX_ROUTES} per Service")
    return Parsed(kind, namespace, name, created, tuple(out))


def merge(parsed: Iterable[Parsed]) -> Routes | None:
    """Every route of one Service, in the Gateway API's precedence order; None if none."""
    items = sorted(parsed, key=lambda p: (p.kind != "GRPCRoute", p.created,
                                          f"{p.namespace}/{p.name}"))
    if not items:
        return None
    routes = sorted((kr for p in items for kr in p.routes),
                    key=lambda kr: (kr[0][0] != "grpc", kr[0]))
    # GAMMA: a Service with routes attached rejects (404) a request none of them match
    return Routes(", ".join(p.entry for p in items), tuple(r for _, r in routes),
                  unmatched="reject")


class ServiceRoutes:
    """The routes attached to one Service, each kept at its last good version, and the
    updates that tell meshd about them."""

    def __init__(self, namespace: str, service: str,
                 target_name: Callable[[str, str], str]) -> None:
        self.namespace = namespace
        self.service = service
        self.target_name = target_name
        # keys: (kind, namespace, name)
        self.good: dict[tuple[str, str, str], Parsed] = {}     # the last good version
        self.refused: dict[tuple[str, str, str], str] = {}     # why the current one is not
        self._report = PartReporter("routes", "routes")

    def reset(self, kind: str, namespace: str, objects: Iterable[Mapping[str, Any]]) -> None:
        """A full list of ``kind`` in ``namespace``: what is not in it is gone."""
        seen = set()
        for obj in objects:
            seen.add((kind, namespace, object_name(obj)))
            self.put(kind, obj)
        for key in [k for k in (*self.good, *self.refused)
                    if k[:2] == (kind, namespace) and k not in seen]:
            self.delete(*key)

    def put(self, kind: str, obj: Mapping[str, Any]) -> None:
        md = obj.get("metadata")
        namespace = str(md.get("namespace") or "") if isinstance(md, Mapping) else ""
        key = (kind, namespace, object_name(obj))
        if not attaches(obj, self.namespace, self.service):
            self.delete(*key)   # edited to attach elsewhere: no longer this Service's
            return
        try:
            self.good[key] = parse(kind, obj, self.target_name)
            self.refused.pop(key, None)
        except Invalid as e:
            self.refused[key] = str(e)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.good.pop((kind, namespace, name), None)
        self.refused.pop((kind, namespace, name), None)

    def routes(self) -> tuple[Routes | None, list[tuple[str, str]]]:
        """The merged routes and the refused (entry, reason), over ``MAX_ROUTES`` included:
        the newest routes are left out until the rest fit. Consumer routes (another
        namespace's), when there are good ones, replace the producer routes."""
        consumer = [p for p in self.good.values() if p.namespace != self.namespace]
        chosen = consumer or list(self.good.values())
        good = sorted(chosen, key=lambda p: (p.created, p.namespace, p.name))
        refused = [(f"{k} {ns}/{n}", why) for (k, ns, n), why in self.refused.items()]
        total = 0
        for i, p in enumerate(good):
            total += len(p.routes)
            if total > MAX_ROUTES:
                refused += [(q.entry, f"spec.rules: Service {self.namespace}/{self.service} "
                                      f"has more than {MAX_ROUTES} route matches in all; "
                                      f"the newest routes are left out") for q in good[i:]]
                good = good[:i]
                break
        return merge(good), sorted(refused)

    def updates(self) -> list[Update]:
        """What changed since the last call (``reports.PartReporter``)."""
        return self._report.updates(*self.routes())


# -- one route --------------------------------------------------------------------------------

def _rule_extras(rule: Mapping[str, Any], at: str, kind: str) -> dict[str, Any]:
    """Timeouts and retries of a rule (Route keyword args)."""
    out: dict[str, Any] = {}
    for key in ("sessionPersistence",):
        if rule.get(key) is not None:
            raise Invalid(f"{at}.{key}: not supported by meshd")
    if "name" in rule and (not isinstance(rule["name"], str) or len(rule["name"]) > 253):
        raise Invalid(f"{at}.name: not a section name: {rule['name']!r}")
    timeouts = rule.get("timeouts")
    if timeouts is not None:
        if kind != "HTTPRoute":
            raise Invalid(f"{at}.timeouts: not a GRPCRoute field")
        t = as_map(timeouts, f"{at}.timeouts")
        for key in t:
            if key not in ("request", "backendRequest"):
                raise Invalid(f"{at}.timeouts.{key}: unknown field")
        request = _duration(t.get("request"), f"{at}.timeouts.request")
        backend = _duration(t.get("backendRequest"), f"{at}.timeouts.backendRequest")
        if request and backend and backend > request:
            raise Invalid(f"{at}.timeouts.backendRequest: longer than timeouts.request")
        if request is not None:
            out["timeout"] = request or DISABLED
        if backend is not None:
            out["try_timeout"] = backend   # 0: meshd's "no per-attempt limit"
    retry = rule.get("retry")
    if retry is not None:
        if kind != "HTTPRoute":
            raise Invalid(f"{at}.retry: not a GRPCRoute field")
        r = as_map(retry, f"{at}.retry")
        if r.get("attempts") is not None:
            out["retries"] = _int(r["attempts"], f"{at}.retry.attempts", 0, 10)
        codes = as_list(r.get("codes", []), f"{at}.retry.codes")
        for n, code in enumerate(codes):
            if _int(code, f"{at}.retry.codes[{n}]", 400, 599) < 500:
                raise Invalid(f"{at}.retry.codes[{n}]: meshd retries 5xx answers only, "
                              f"not {code}")
        if codes:
            out["retry_on"] = frozenset(("connect", "reset", "5xx"))
    out.update(_filters(rule.get("filters", []), f"{at}.filters", kind))
    return out


# -- filters ----------------------------------------------------------------------------------

_FILTERS = {"RequestHeaderModifier": "requestHeaderModifier",
            "ResponseHeaderModifier": "responseHeaderModifier", "URLRewrite": "urlRewrite"}
_GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")


def _filters(raw: Any, at: str, kind: str) -> dict[str, Any]:
    """A rule's filters as Route keyword args: header modifiers and URLRewrite (hostname,
    ReplaceFullPath, ReplacePrefixMatch); the others (RequestRedirect, RequestMirror,
    CORS, ExtensionRef, ...) are refused, as is a filter given twice (the spec's CEL
    rules forbid it too)."""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for n, item in enumerate(as_list(raw, at)):
        where = f"{at}[{n}]"
        f = as_map(item, where)
        ftype = f.get("type")
        known = _GRPC_FILTERS if kind == "GRPCRoute" else tuple(_FILTERS)
        if ftype not in known:
            raise Invalid(f"{where}: filter {str(ftype)[:64]!r} is not supported by meshd "
                          f"(it applies {', '.join(known)})")
        if ftype in seen:
            raise Invalid(f"{where}.type: {ftype} is given twice")
        seen.add(ftype)
        key = _FILTERS[ftype]
        body = as_map(f.get(key), f"{where}.{key}")
        if ftype == "RequestHeaderModifier":
            out["request_headers"] = _header_modifier(body, f"{where}.{key}")
        elif ftype == "ResponseHeaderModifier":
            out["response_headers"] = _header_modifier(body, f"{where}.{key}")
        else:
            out.update(_url_rewrite(body, f"{where}.{key}"))
    return out


def _header_modifier(m: Mapping[str, Any], at: str) -> HeaderEdit:
    for field in m:
        if field not in ("set", "add", "remove"):
            raise Invalid(f"{at}.{field}: unknown field")
    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    names: set[tuple[str, str]] = set()
    for op in ("set", "add"):
        items = as_list(m.get(op, []), f"{at}.{op}")
        if len(items) > MAX_HEADER_EDITS:
            raise Invalid(f"{at}.{op}: more than {MAX_HEADER_EDITS} headers")
        got = []
        for n, item in enumerate(items):
            where = f"{at}.{op}[{n}]"
            h = as_map(item, where)
            name = _modifiable(h.get("name"), f"{where}.name")
            value = h.get("value")
            if (not isinstance(value, str) or len(value) > MAX_HEADER_VALUE
                    or not all(" " <= c <= "~" for c in value) or value != value.strip()):
                raise Invalid(f"{where}.value: expected printable ASCII of at most "
                              f"{MAX_HEADER_VALUE} characters, no blank at either end")
            if (op, name.lower()) in names:
                raise Invalid(f"{where}.name: {name!r} is given twice")
            names.add((op, name.lower()))
            got.append((name, value))
        pairs[op] = tuple(got)
    remove = as_list(m.get("remove", []), f"{at}.remove")
    if len(remove) > MAX_HEADER_EDITS:
        raise Invalid(f"{at}.remove: more than {MAX_HEADER_EDITS} headers")
    gone = tuple(_modifiable(name, f"{at}.remove[{n}]") for n, name in enumerate(remove))
    return HeaderEdit(set=pairs["set"], add=pairs["add"], remove=gone)


def _modifiable(name: Any, at: str) -> str:
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name) or len(name) > 256:
        raise Invalid(f"{at}: not a header name: {str(name)[:64]!r}")
    if reserved(name):
        raise Invalid(f"{at}: meshd does not let a route change {name!r} (framing, "
                      f"connection-specific, Host or meshd's own fields)")
    return name


def _url_rewrite(m: Mapping[str, Any], at: str) -> dict[str, Any]:
    for field in m:
        if field not in ("hostname", "path"):
            raise Invalid(f"{at}.{field}: unknown field")
    out: dict[str, Any] = {}
    host = m.get("hostname")
    if host is not None:
        if (not isinstance(host, str) or len(host) > 253 or not _HOSTNAME.fullmatch(host)):
            raise Invalid(f"{at}.hostname: not a host name: {str(host)[:64]!r}")
        out["host_rewrite"] = host
    if m.get("path") is not None:
        p = as_map(m["path"], f"{at}.path")
        ptype = p.get("type")
        if ptype == "ReplaceFullPath":
            key, field = "full_path_rewrite", "replaceFullPath"
        elif ptype == "ReplacePrefixMatch":
            key, field = "prefix_rewrite", "replacePrefixMatch"
        else:
            raise Invalid(f"{at}.path.type: {str(ptype)[:64]!r} is not ReplaceFullPath or "
                          f"ReplacePrefixMatch")
        value = p.get(field, "" if key == "prefix_rewrite" else None)
        if (not isinstance(value, str) or len(value) > 1024
                or (value and not _PATH_CHARS.fullmatch(value))
                or (key == "full_path_rewrite" and not value.startswith("/"))):
            raise Invalid(f"{at}.path.{field}: expected a path of at most 1024 characters")
        out[key] = value
    return out


def _backends(raw: Any, at: str, namespace: str,
              target_name: Callable[[str, str], str]) -> tuple[WeightedTarget, ...]:
    refs = as_list(raw, at)
    if len(refs) > MAX_TARGETS:
        raise Invalid(f"{at}: {len(refs)} backends, meshd takes at most {MAX_TARGETS}")
    out = []
    for n, item in enumerate(refs):
        where = f"{at}[{n}]"
        ref = as_map(item, where)
        if ref.get("group", "") not in ("", "core") or ref.get("kind", "Service") != "Service":
            raise Invalid(f"{where}: only Services are supported backends, not "
                          f"{ref.get('group', '')}/{ref.get('kind')}")
        name = ref.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 63:
            raise Invalid(f"{where}.name: not a Service name: {name!r}")
        ns = ref.get("namespace", namespace)
        if not isinstance(ns, str) or not _NAME.fullmatch(ns) or len(ns) > 63:
            raise Invalid(f"{where}.namespace: not a namespace name: {ns!r}")
        if ref.get("filters"):
            raise Invalid(f"{where}.filters: backend filters are not supported by meshd")
        weight = _int(ref.get("weight", 1), f"{where}.weight", 0, MAX_WEIGHT)
        out.append(WeightedTarget(Target(target_name(ns, name)), weight))
    if out and not any(t.weight for t in out):
        raise Invalid(f"{at}: every weight is 0 (the spec answers 500 to all; meshd refuses "
                      f"the route instead)")
    return tuple(out)


def _http_match(m: Mapping[str, Any], at: str) -> tuple[Match, tuple[Any, ...]]:
    for field in m:
        if field not in ("path", "headers", "queryParams", "method"):
            raise Invalid(f"{at}.{field}: unknown field")
    path = _path(m.get("path"), f"{at}.path")
    headers = _headers(m.get("headers", []), f"{at}.headers")
    query: list[QueryMatch] = []
    names: set[str] = set()
    raw_query = as_list(m.get("queryParams", []), f"{at}.queryParams")
    if len(raw_query) + len(headers) > MAX_CONDITIONS:
        raise Invalid(f"{at}: more than {MAX_CONDITIONS} header and query conditions")
    for n, item in enumerate(raw_query):
        where = f"{at}.queryParams[{n}]"
        q = as_map(item, where)
        name, value = q.get("name"), q.get("value")
        if not isinstance(name, str) or not name or len(name) > 256:
            raise Invalid(f"{where}.name: expected a non-empty string")
        kind = _match_type(q.get("type", "Exact"), f"{where}.type")
        value = _value(value, kind, f"{where}.value")
        if name not in names:   # the spec: only the first of equal names counts
            names.add(name)
            query.append(QueryMatch(name, kind, value))
    method = m.get("method")
    methods: frozenset[str] = frozenset()
    if method is not None:
        if method not in METHODS:
            raise Invalid(f"{at}.method: not an HTTP method of the spec: {method!r}")
        methods = frozenset((method,))
    rank = {"exact": 0, "regex": 1, "segments": 2}[path.kind]
    key = ("http", rank, -len(path.value), not methods, -len(headers), -len(query))
    return Match(path=path, methods=methods, headers=headers, query=tuple(query)), key


def _grpc_match(m: Mapping[str, Any], at: str) -> tuple[Match, tuple[Any, ...]]:
    for field in m:
        if field not in ("method", "headers"):
            raise Invalid(f"{at}.{field}: unknown field")
    headers = _headers(m.get("headers", []), f"{at}.headers")
    if len(headers) >= MAX_CONDITIONS:
        raise Invalid(f"{at}.headers: more than {MAX_CONDITIONS - 1} header conditions")
    path = None
    service = method = ""
    if m.get("method") is not None:
        where = f"{at}.method"
        mm = as_map(m["method"], where)
        kind = mm.get("type", "Exact")
        service, method = mm.get("service") or "", mm.get("method") or ""
        if not isinstance(service, str) or not isinstance(method, str):
            raise Invalid(f"{where}: service and method must be strings")
        if not service and not method:
            raise Invalid(f"{where}: one of service and method must be set")
        if kind == "Exact":
            for part, value in (("service", service), ("method", method)):
                if "/" in value or not _printable(value) or len(value) > 1024:
                    raise Invalid(f"{where}.{part}: not a gRPC name: {value!r}")
            if service and method:
                path = PathMatch("exact", f"/{service}/{method}")
            elif service:
                path = PathMatch("prefix", f"/{service}/")
            else:
                path = PathMatch("regex", f"/[^/]+/{re.escape(method)}")
        elif kind == "RegularExpression":
            for part, value in (("service", service), ("method", method)):
                _value(value or "x", "regex", f"{where}.{part}")
            path = PathMatch("regex", f"/(?:{service or '[^/]+'})/(?:{method or '[^/]+'})")
            _value(path.value, "regex", where)
        else:
            raise Invalid(f"{where}.type: {kind!r} is not Exact or RegularExpression")
    key = ("grpc", -len(service), -len(method), -len(headers))
    return Match(path=path, headers=(GRPC_CONTENT_TYPE, *headers)), key


def _path(raw: Any, at: str) -> PathMatch:
    p = as_map(raw if raw is not None else {}, at)
    kind, value = p.get("type", "PathPrefix"), p.get("value", "/")
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise Invalid(f"{at}.value: expected a path of 1 to 1024 characters")
    if kind == "RegularExpression":
        _value(value, "regex", f"{at}.value")
        return PathMatch("regex", value)
    if kind not in ("Exact", "PathPrefix"):
        raise Invalid(f"{at}.type: {kind!r} is not Exact, PathPrefix or RegularExpression")
    if (not value.startswith("/") or not _PATH_CHARS.fullmatch(value)
            or any(bad in value for bad in ("//", "/./", "/../", "%2f", "%2F"))
            or value.endswith(("/.", "/.."))):
        raise Invalid(f"{at}.value: not an absolute, normalized path: {value!r}")
    if kind == "Exact":
        return PathMatch("exact", value)
    return PathMatch("segments", value.rstrip("/") or "/")


def _headers(raw: Any, at: str) -> tuple[HeaderMatch, ...]:
    out: list[HeaderMatch] = []
    names: set[str] = set()
    items = as_list(raw, at)
    if len(items) > MAX_CONDITIONS:
        raise Invalid(f"{at}: more than {MAX_CONDITIONS} header conditions")
    for n, item in enumerate(items):
        where = f"{at}[{n}]"
        h = as_map(item, where)
        name, value = h.get("name"), h.get("value")
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name) or len(name) > 256:
            raise Invalid(f"{where}.name: not a header name: {name!r}")
        kind = _match_type(h.get("type", "Exact"), f"{where}.type")
        value = _value(value, kind, f"{where}.value")
        if name.lower() not in names:   # the spec: only the first of equal names counts
            names.add(name.lower())
            out.append(HeaderMatch(name.lower(), kind, value))
    return tuple(out)


def _match_type(raw: Any, at: str) -> Any:
    if raw == "Exact":
        return "exact"
    if raw == "RegularExpression":
        return "regex"
    raise Invalid(f"{at}: {raw!r} is not Exact or RegularExpression")


def _value(value: Any, kind: str, at: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise Invalid(f"{at}: expected a string of 1 to 4096 characters")
    if kind == "regex":
        if len(value) > MAX_REGEX:
            raise Invalid(f"{at}: a regular expression of more than {MAX_REGEX} characters")
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as e:
            raise Invalid(f"{at}: not a regular expression meshd (Python re) can use: "
                          f"{e}") from None
    elif not _printable(value):
        raise Invalid(f"{at}: not printable ASCII")
    return value


def _duration(raw: Any, at: str) -> float | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not _DURATION.fullmatch(raw):
        raise Invalid(f"{at}: not a Gateway API duration (like 10s, 1m30s, 500ms): {raw!r}")
    return sum(int(n) * _UNIT[u] for n, u in _DURATION_PART.findall(raw))


def _int(raw: Any, at: str, low: int, high: int) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not low <= raw <= high:
        raise Invalid(f"{at}: expected an integer {low}..{high}, got {raw!r}")
    return raw


def _printable(s: str) -> bool:
    return all(" " <= c <= "~" or c == "\t" for c in s)


