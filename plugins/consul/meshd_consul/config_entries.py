"""Consul config entries in meshd's terms (sans-IO): ``service-router`` -> ``Routes``,
``service-splitter`` -> ``Split``, ``service-resolver`` -> ``Resolver`` (``meshd.fleet.api``).

Field names and meanings are those of Consul's config entry reference pages. What meshd
cannot apply faithfully is refused (``EntryError``, naming the field), never guessed:

- router: ``Match.HTTP`` PathExact / PathPrefix / PathRegex (RE2 syntax that Python's
  ``re`` does not take is refused), Methods, Header (Exact, Prefix, Suffix, Regex,
  Present, Invert), QueryParam (Exact, Regex, Present); ``Destination`` Service (default:
  the entry's name), ServiceSubset, RequestTimeout, IdleTimeout, NumRetries,
  RetryOnConnectFailure, RetryOn, RetryOnStatusCodes, PrefixRewrite (on a PathPrefix or
  PathExact match), RequestHeaders / ResponseHeaders (Add, Set, Remove; values without
  Envoy's %VARIABLE% placeholders; not of framing, connection-specific, Host or meshd's
  own fields). Refused: CaseInsensitive, a Namespace or Partition other than
  "default", a Peer. Retries are by meshd's failure kinds: RetryOnStatusCodes and RetryOn
  conditions map to the kinds that hold them (503 -> 5xx, connect-failure -> connect,
  reset/refused-stream -> reset, gateway-error/5xx -> 5xx, retriable-4xx -> 4xx).
  Consul's implicit last route (everything else to the service itself) is meshd's too.
- splitter: ``Splits`` Weight (0-100, two decimals, adding up to 100), Service (default:
  the entry's name), ServiceSubset.
- resolver: ConnectTimeout, RequestTimeout, Subsets (``Filter``: clauses joined by
  ``and``, each ``Service.Meta.KEY == VALUE``, ``VALUE in Service.Tags`` or
  ``Service.Tags contains VALUE``; ``OnlyPassing`` is what meshd's discovery does by
  default: ``passing_only``), DefaultSubset, Failover (the ``"*"`` key, or the default
  subset's: Service, ServiceSubset, Datacenters, Targets with Service / ServiceSubset /
  Datacenter). Refused: Redirect, failover keyed by other subsets, Peer, SamenessGroup.
  LoadBalancer is not applied (meshd balances by its own ``[service]`` balancer).

Another datacenter's service (``web@dc2``) is named ``web@dc2``, as meshd's discovery
names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshd.fleet.api import (
    MAX_HEADER_EDITS,
    MAX_HEADER_VALUE,
    MAX_REWRITE,
    HeaderEdit,
    HeaderMatch,
    Match,
    PathMatch,
    QueryMatch,
    Resolver,
    Route,
    Routes,
    Split,
    Subset,
    Target,
    WeightedTarget,
)
from meshd.fleet.rewrite import reserved

ROUTER, SPLITTER, RESOLVER = "service-router", "service-splitter", "service-resolver"
KINDS = {ROUTER: "routes", SPLITTER: "split", RESOLVER: "resolver"}

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_VALUE = r'(?:"([^"]*)"|([A-Za-z0-9_.:/-]+))'
_META = re.compile(rf"Service\.Meta\.([A-Za-z0-9_.-]+)\s*==\s*{_VALUE}")
_TAG_IN = re.compile(rf"{_VALUE}\s+in\s+Service\.Tags")
_TAG_CONTAINS = re.compile(rf"Service\.Tags\s+contains\s+{_VALUE}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_RETRY_ON = {"5xx": "5xx", "gateway-error": "5xx", "reset": "reset", "connect-failure": "connect",
             "refused-stream": "reset", "retriable-4xx": "4xx", "envoy-ratelimited": "4xx"}


class EntryError(ValueError):
    """The entry cannot be applied; the message names the field."""


def entry_name(kind: str, name: str) -> str:
    return f"{kind}/{name}"


def router(entry: Mapping[str, Any], service: str) -> Routes:
    _common(entry)
    raw = _list(entry, "Routes")
    routes = []
    for i, r in enumerate(raw):
        at = f"Routes[{i}]"
        r = _map(r, at)
        _only(r, at, ("Match", "Destination"))
        match = _route_match(r.get("Match"), f"{at}.Match")
        dest = _map(r.get("Destination") or {}, f"{at}.Destination")
        # A route's name (metrics' route label, traces, /config): Consul's routes have
        # none of their own, so the entry's and the route's index.
        routes.append(_destination(dest, f"{at}.Destination", service,
                                   f"{entry_name(ROUTER, service)}#{i}", match))
    return Routes(entry_name(ROUTER, service), tuple(routes))


def splitter(entry: Mapping[str, Any], service: str) -> Split:
    _common(entry)
    raw = _list(entry, "Splits")
    if not raw:
        raise EntryError("Splits: at least one split is required")
    targets, total = [], 0.0
    for i, s in enumerate(raw):
        at = f"Splits[{i}]"
        s = _map(s, at)
        _only(s, at, ("Weight", "Service", "ServiceSubset", "Namespace", "Partition"))
        _default_ns(s, at)
        weight = s.get("Weight", 0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
            raise EntryError(f"{at}.Weight: expected a number from 0 to 100, got {weight!r}")
        total += weight
        targets.append(WeightedTarget(Target(_service(s, at, service), _str(s, "ServiceSubset", at)),
                                      round(weight * 100)))
    if abs(total - 100) > 0.01:
        raise EntryError(f"Splits: the weights add up to {total:g}, not 100")
    return Split(entry_name(SPLITTER, service), tuple(targets))


def resolver(entry: Mapping[str, Any], service: str, local_dc: str = "") -> Resolver:
    _common(entry)
    if entry.get("Redirect"):
        raise EntryError("Redirect: not applied by meshd (name the target service instead)")
    subsets = []
    for name, raw in sorted(_map(entry.get("Subsets") or {}, "Subsets").items()):
        at = f"Subsets.{name}"
        raw = _map(raw, at)
        _only(raw, at, ("Filter", "OnlyPassing"))
        subsets.append(Subset(name, _filter(_str(raw, "Filter", at), f"{at}.Filter")))
    default = _str(entry, "DefaultSubset", "")
    failover: list[Target] = []
    raw_failover = _map(entry.get("Failover") or {}, "Failover")
    for key in raw_failover:
        if key not in ("*", default):
            raise EntryError(f"Failover.{key}: failover per subset is not applied by meshd "
                             '(use "*")')
    chosen = raw_failover.get(default) if default in raw_failover else raw_failover.get("*")
    if chosen is not None:
        failover = _failover(_map(chosen, "Failover"), "Failover", service, local_dc)
    return Resolver(entry_name(RESOLVER, service), tuple(subsets), default, tuple(failover),
                    _duration(entry, "ConnectTimeout", ""), _duration(entry, "RequestTimeout", ""))


# -- router parts ---------------------------------------------------------------------------

def _route_match(raw: Any, at: str) -> tuple[Match, ...]:
    if not raw:
        return ()
    raw = _map(raw, at)
    _only(raw, at, ("HTTP",))
    http = _map(raw.get("HTTP") or {}, f"{at}.HTTP")
    at = f"{at}.HTTP"
    _only(http, at, ("PathExact", "PathPrefix", "PathRegex", "CaseInsensitive", "Methods",
                     "Header", "QueryParam"))
    if http.get("CaseInsensitive"):
        raise EntryError(f"{at}.CaseInsensitive: not applied by meshd")
    paths = [(k, http[k]) for k in ("PathExact", "PathPrefix", "PathRegex") if http.get(k)]
    if len(paths) > 1:
        raise EntryError(f"{at}: at most one of PathExact, PathPrefix, PathRegex")
    path = None
    if paths:
        key, value = paths[0]
        if not isinstance(value, str):
            raise EntryError(f"{at}.{key}: expected a string, got {value!r}")
        if key != "PathRegex" and not value.startswith("/"):
            raise EntryError(f"{at}.{key}: must begin with a '/'")
        path = PathMatch({"PathExact": "exact", "PathPrefix": "prefix",
                          "PathRegex": "regex"}[key], value)  # type: ignore[arg-type]
        if key == "PathRegex":
            _regex(value, f"{at}.PathRegex")
    methods = http.get("Methods") or []
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise EntryError(f"{at}.Methods: expected a list of method names")
    headers = tuple(_header(h, f"{at}.Header[{j}]") for j, h in enumerate(http.get("Header") or []))
    query = tuple(_query(q, f"{at}.QueryParam[{j}]")
                  for j, q in enumerate(http.get("QueryParam") or []))
    return (Match(path, frozenset(m.upper() for m in methods), headers, query),)


def _header(raw: Any, at: str) -> HeaderMatch:
    raw = _map(raw, at)
    _only(raw, at, ("Name", "Present", "Exact", "Prefix", "Suffix", "Regex", "Invert"))
    name = _str(raw, "Name", at)
    if not name:
        raise EntryError(f"{at}.Name: required")
    kinds = [k for k in ("Exact", "Prefix", "Suffix", "Regex") if raw.get(k)]
    if raw.get("Present"):
        kinds.append("Present")
    if len(kinds) > 1:
        raise EntryError(f"{at}: at most one of Present, Exact, Prefix, Suffix, Regex")
    if not kinds:   # Consul: no condition given means Present
        kinds = ["Present"]
    kind = kinds[0]
    value = "" if kind == "Present" else _str(raw, kind, at)
    if kind == "Regex":
        _regex(value, f"{at}.Regex")
    return HeaderMatch(name.lower(), kind.lower(), value, bool(raw.get("Invert")))  # type: ignore[arg-type]


def _query(raw: Any, at: str) -> QueryMatch:
    raw = _map(raw, at)
    _only(raw, at, ("Name", "Present", "Exact", "Regex"))
    name = _str(raw, "Name", at)
    if not name:
        raise EntryError(f"{at}.Name: required")
    kinds = [k for k in ("Exact", "Regex") if raw.get(k)] + (["Present"] if raw.get("Present") else [])
    if len(kinds) != 1:
        raise EntryError(f"{at}: exactly one of Present, Exact, Regex")
    kind = kinds[0]
    value = "" if kind == "Present" else _str(raw, kind, at)
    if kind == "Regex":
        _regex(value, f"{at}.Regex")
    return QueryMatch(name, kind.lower(), value)  # type: ignore[arg-type]


def _destination(d: Mapping[str, Any], at: str, service: str, name: str,
                 matches: tuple[Match, ...]) -> Route:
    _only(d, at, ("Service", "ServiceSubset", "Namespace", "Partition", "PrefixRewrite",
                  "RequestTimeout", "IdleTimeout", "NumRetries", "RetryOnConnectFailure",
                  "RetryOn", "RetryOnStatusCodes", "RequestHeaders", "ResponseHeaders"))
    _default_ns(d, at)
    filters = _rewrites(d, at, matches)
    retries = d.get("NumRetries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                or not 0 <= retries <= 10):
        raise EntryError(f"{at}.NumRetries: expected 0..10 (meshd's bound), got {retries!r}")
    kinds: set[str] = set()
    if d.get("RetryOnConnectFailure"):
        kinds.add("connect")
    for j, cond in enumerate(d.get("RetryOn") or []):
        if cond not in _RETRY_ON:
            raise EntryError(f"{at}.RetryOn[{j}]: {cond!r} is not applied by meshd (known: "
                             f"{', '.join(sorted(_RETRY_ON))})")
        kinds.add(_RETRY_ON[cond])
    for j, code in enumerate(d.get("RetryOnStatusCodes") or []):
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            raise EntryError(f"{at}.RetryOnStatusCodes[{j}]: expected a 4xx or 5xx status, "
                             f"got {code!r}")
        kinds.add("5xx" if code >= 500 else "4xx")
    target = Target(_service(d, at, service), _str(d, "ServiceSubset", at))
    return Route(name, matches, (WeightedTarget(target, 1),),
                 timeout=_duration(d, "RequestTimeout", at),
                 idle_timeout=_duration(d, "IdleTimeout", at),
                 retries=retries, retry_on=frozenset(kinds) if kinds else None, **filters)


def _rewrites(d: Mapping[str, Any], at: str, matches: tuple[Match, ...]) -> dict[str, Any]:
    """PrefixRewrite (the matched PathPrefix or PathExact replaced, as Envoy does) and
    RequestHeaders / ResponseHeaders (Add, Set, Remove) as Route keyword args."""
    out: dict[str, Any] = {}
    prefix = d.get("PrefixRewrite")
    if prefix:   # "" is no rewrite in Consul
        if not isinstance(prefix, str) or len(prefix) > MAX_REWRITE:
            raise EntryError(f"{at}.PrefixRewrite: expected a path of at most {MAX_REWRITE} "
                             f"characters")
        if not matches or matches[0].path is None or matches[0].path.kind == "regex":
            raise EntryError(f"{at}.PrefixRewrite: needs a Match.HTTP PathPrefix or PathExact")
        out["prefix_rewrite"] = prefix
    for key, field in (("RequestHeaders", "request_headers"),
                       ("ResponseHeaders", "response_headers")):
        if d.get(key):
            out[field] = _header_edit(_map(d[key], f"{at}.{key}"), f"{at}.{key}")
    return out


def _header_edit(m: Mapping[str, Any], at: str) -> HeaderEdit:
    _only(m, at, ("Add", "Set", "Remove"))
    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    for op in ("Add", "Set"):
        raw = _map(m.get(op) or {}, f"{at}.{op}")
        if len(raw) > MAX_HEADER_EDITS:
            raise EntryError(f"{at}.{op}: more than {MAX_HEADER_EDITS} headers")
        got = []
        for name, value in sorted(raw.items()):
            where = f"{at}.{op}.{str(name)[:64]}"
            if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE:
                raise EntryError(f"{where}: expected a string of at most {MAX_HEADER_VALUE} "
                                 f"characters")
            if "%" in value:
                raise EntryError(f"{where}: Envoy's %VARIABLE% placeholders are not applied "
                                 f"by meshd")
            got.append((_modifiable(name, where), value.strip()))
        pairs[op] = tuple(got)
    remove = m.get("Remove") or []
    if not isinstance(remove, list) or len(remove) > MAX_HEADER_EDITS:
        raise EntryError(f"{at}.Remove: expected a list of at most {MAX_HEADER_EDITS} names")
    gone = tuple(_modifiable(n, f"{at}.Remove[{j}]") for j, n in enumerate(remove))
    return HeaderEdit(set=pairs["Set"], add=pairs["Add"], remove=gone)


def _modifiable(name: Any, at: str) -> str:
    if not isinstance(name, str) or len(name) > 256 or not _TOKEN.fullmatch(name):
        raise EntryError(f"{at}: not a header name: {str(name)[:64]!r}")
    if reserved(name):
        raise EntryError(f"{at}: meshd does not let a route change {name!r} (framing, "
                         f"connection-specific, Host or meshd's own fields)")
    return name


# -- resolver parts -------------------------------------------------------------------------

def _filter(expr: str, at: str) -> tuple[tuple[str, str], ...]:
    """A subset's bexpr Filter as discovery labels (``meshd_consul`` gives ("tag", t) and
    ("meta:KEY", v)); other expressions are refused."""
    if not expr.strip():
        return ()
    labels = []
    for clause in re.split(r"\s+and\s+", expr.strip()):
        clause = clause.strip()
        if m := _META.fullmatch(clause):
            labels.append((f"meta:{m.group(1)}", m.group(2) if m.group(2) is not None else m.group(3)))
        elif m := (_TAG_IN.fullmatch(clause) or _TAG_CONTAINS.fullmatch(clause)):
            labels.append(("tag", m.group(1) if m.group(1) is not None else m.group(2)))
        else:
            raise EntryError(f"{at}: {clause!r} is not applied by meshd (it takes "
                             "'Service.Meta.KEY == VALUE', 'VALUE in Service.Tags' and "
                             "'Service.Tags contains VALUE', joined by 'and')")
    return tuple(labels)


def _failover(f: Mapping[str, Any], at: str, service: str, local_dc: str) -> list[Target]:
    _only(f, at, ("Service", "ServiceSubset", "Namespace", "Datacenters", "Targets"))
    _default_ns(f, at)
    targets = f.get("Targets") or []
    if targets:
        out = []
        for j, t in enumerate(targets):
            tat = f"{at}.Targets[{j}]"
            t = _map(t, tat)
            _only(t, tat, ("Service", "ServiceSubset", "Namespace", "Partition", "Datacenter"))
            _default_ns(t, tat)
            out.append(Target(_in_dc(_service(t, tat, service), _str(t, "Datacenter", tat),
                                     local_dc), _str(t, "ServiceSubset", tat)))
        return out
    name, subset = _service(f, at, service), _str(f, "ServiceSubset", at)
    dcs = f.get("Datacenters") or []
    if not isinstance(dcs, list) or not all(isinstance(x, str) and x for x in dcs):
        raise EntryError(f"{at}.Datacenters: expected a list of datacenter names")
    if dcs:
        return [Target(_in_dc(name, dc, local_dc), subset) for dc in dcs]
    if name == service and not subset:
        raise EntryError(f"{at}: names no other service, subset or datacenter")
    return [Target(name, subset)]


def _in_dc(service: str, dc: str, local_dc: str) -> str:
    return f"{service}@{dc}" if dc and dc != local_dc else service


# -- values ---------------------------------------------------------------------------------

def _common(entry: Mapping[str, Any]) -> None:
    _default_ns(entry, "")


def _default_ns(m: Mapping[str, Any], at: str) -> None:
    for key in ("Namespace", "Partition"):
        value = m.get(key)
        if value not in (None, "", "default"):
            raise EntryError(f"{at + '.' if at else ''}{key}: {value!r}: meshd reads the default "
                             "namespace and partition only")
    for key in ("Peer", "SamenessGroup"):
        if m.get(key):
            raise EntryError(f"{at + '.' if at else ''}{key}: not applied by meshd")


def _only(m: Mapping[str, Any], at: str, known: tuple[str, ...]) -> None:
    for key in m:
        if key not in known and m[key] not in (None, "", [], {}, False, 0):
            raise EntryError(f"{at}.{key}: not applied by meshd")


def _map(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise EntryError(f"{at}: expected an object, got {type(value).__name__}")
    return dict(value)


def _list(entry: Mapping[str, Any], key: str) -> list[Any]:
    value = entry.get(key) or []
    if not isinstance(value, list):
        raise EntryError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def _str(m: Mapping[str, Any], key: str, at: str) -> str:
    value = m.get(key) or ""
    if not isinstance(value, str):
        raise EntryError(f"{at + '.' if at else ''}{key}: expected a string, got {value!r}")
    return value


def _service(m: Mapping[str, Any], at: str, default: str) -> str:
    return _str(m, "Service", at) or default.partition("@")[0]


def _regex(pattern: str, at: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:   # RE2 and Python differ (\pL, \C...): refuse, never half-match
        raise EntryError(f"{at}: {pattern!r} does not compile as a Python regex ({e})") from None


def _duration(m: Mapping[str, Any], key: str, at: str) -> float | None:
    """A Go duration: "15s", "1m30s", or a number of nanoseconds; 0 / absent: None."""
    value = m.get(key)
    where = f"{at + '.' if at else ''}{key}"
    if value in (None, "", 0, "0", "0s"):
        return None
    if isinstance(value, bool):
        raise EntryError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = value / 1e9
    elif isinstance(value, str):
        parts = _GO_DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise EntryError(f"{where}: expected a duration like \"15s\", got {value!r}")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise EntryError(f"{where}: expected a duration, got {value!r}")
    if not 0 < seconds <= 86400:
        raise EntryError(f"{where}: {value!r} is not between 0 and 24h")
    return seconds
