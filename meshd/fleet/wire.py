"""Fleet policies as plain values (msgpack- and JSON-able), and the checks meshd makes
of every part a source gives.

``Policy`` is the effective policy of one service as workers apply it: the parts the
control process chose (``meshd.control.fleet``: precedence, first source first).
``encode`` / ``decode`` turn parts and policies into nested lists and back (``pack`` /
``unpack``: msgpack bytes of a policy), for the snapshot workers read and the state
file a restart reads (``decode`` raises ValueError
on anything else: a file from another version is ignored, not trusted halfway).
``problem`` says why a part breaks meshd's bounds or cannot be applied (a regex that does
not compile), or None: such a part is refused as if its source had refused it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from meshd.fleet.api import (
    ANY_IDENTITY,
    MAX_AUTHZ_MATCHES,
    MAX_AUTHZ_PEERS,
    MAX_AUTHZ_RULES,
    MAX_CONDITIONS,
    MAX_FAILOVER,
    MAX_HEADER_EDITS,
    MAX_HEADER_VALUE,
    MAX_MATCHES,
    MAX_REGEX,
    MAX_REWRITE,
    MAX_ROUTES,
    MAX_SUBSETS,
    MAX_TARGETS,
    RETRY_KINDS,
    Authorization,
    AuthzRule,
    HeaderEdit,
    HeaderMatch,
    Match,
    Part,
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
from meshd.identity import spiffe

_SERVICE = re.compile(r"[A-Za-z0-9_.@-]{1,253}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_METHOD = re.compile(r"[A-Z]{1,32}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"(?:[!-~](?:[ -~]*[!-~])?)?")     # may be empty (a set to "")
_PATH = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(?::[0-9]{1,5})?"
                   r"|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?")
MAX_WEIGHT = 1_000_000


@dataclass(frozen=True, slots=True)
class Policy:
    """The effective fleet policy of one service: what workers apply (see
    ``meshd.fleet.api`` for each part's meaning)."""
    service: str
    routes: Routes | None = None
    split: Split | None = None
    resolver: Resolver | None = None
    authz: Authorization | None = None         # for inbound listeners serving the service


# -- encoding -------------------------------------------------------------------------------

_CLASSES: dict[str, type] = {c.__name__: c for c in (
    Policy, Routes, Route, Match, PathMatch, HeaderMatch, QueryMatch, Target, WeightedTarget,
    Split, Subset, Resolver, HeaderEdit)}
_CLASSES.update({c.__name__: c for c in (Authorization, AuthzRule)})
_SETS = {"methods", "retry_on"}        # frozenset fields, encoded as sorted lists


def encode(value: Any) -> Any:
    """A part or policy as nested values: {"_": class name, "f": [field values...]}."""
    if type(value).__name__ in _CLASSES and not isinstance(value, type):
        return {"_": type(value).__name__, "f": [encode(getattr(value, f.name)) for f in fields(value)]}
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [encode(v) for v in value]
    return value


def decode(raw: Any) -> Any:
    """The inverse of ``encode`` for a part or a policy. Raises ValueError."""
    try:
        return _decode(raw)
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"not a fleet policy: {type(e).__name__}: {e}") from None


def _decode(raw: Any) -> Any:
    if not isinstance(raw, dict) or not isinstance(raw.get("f"), list):
        raise TypeError(f"expected {{_: class, f: fields}}, got {type(raw).__name__}")
    cls = _CLASSES[raw["_"]]
    values = raw["f"]
    flds = fields(cls)
    if len(values) > len(flds):
        raise TypeError(f"{raw['_']}: {len(values)} fields, expected {len(flds)}")
    # Fewer: a state file from the version before fields were appended (they have
    # defaults, which the dataclass fills in; one without a default raises TypeError).
    kwargs = {f.name: _field(f.name, v) for f, v in zip(flds, values, strict=False)}
    return cls(**kwargs)


def _field(name: str, v: Any) -> Any:
    if name in _SETS:
        return None if v is None else frozenset(v)
    if isinstance(v, dict):
        return _decode(v)
    if isinstance(v, list):
        return tuple(_field("", x) for x in v)
    return v


def pack(policy: Policy) -> bytes:
    """A policy as msgpack bytes: what snapshots carry (packed once per change; a worker
    unpacks only the policies whose bytes changed)."""
    return bytes(msgpack.packb(encode(policy), use_bin_type=True))


def unpack(blob: bytes) -> Policy:
    """The inverse of ``pack``. Raises ValueError."""
    try:
        policy = decode(msgpack.unpackb(blob, raw=False))
    except (msgpack.UnpackException, TypeError) as e:
        raise ValueError(f"not a packed fleet policy: {e}") from None
    if not isinstance(policy, Policy):
        raise ValueError(f"not a fleet policy: {type(policy).__name__}")
    return policy


# -- checks ---------------------------------------------------------------------------------

def problem(part: Part) -> str | None:
    """Why meshd cannot apply ``part`` (its bounds, a regex, a name), or None."""
    try:
        if isinstance(part, Routes):
            _routes(part)
        elif isinstance(part, Split):
            _targets("targets", part.targets)
        elif isinstance(part, Resolver):
            _resolver(part)
        elif isinstance(part, Authorization):
            _authz(part)
        else:
            return f"not a part: {type(part).__name__}"
    except ValueError as e:
        return str(e)
    return None


def _routes(part: Routes) -> None:
    _bound("routes", part.routes, MAX_ROUTES)
    for i, route in enumerate(part.routes):
        at = f"routes[{i}]"
        _bound(f"{at}.matches", route.matches, MAX_MATCHES)
        for j, m in enumerate(route.matches):
            _match(f"{at}.matches[{j}]", m)
        if route.destination:
            _targets(f"{at}.destination", route.destination)
        for key in ("timeout", "try_timeout", "idle_timeout"):
            value = getattr(route, key)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 86400):
                raise ValueError(f"{at}.{key}: expected seconds in (0, 86400], got {value!r}")
        if route.retries is not None and not (isinstance(route.retries, int) and 0 <= route.retries <= 10):
            raise ValueError(f"{at}.retries: expected 0..10, got {route.retries!r}")
        if route.retry_on is not None and not route.retry_on <= set(RETRY_KINDS):
            raise ValueError(f"{at}.retry_on: expected some of {', '.join(RETRY_KINDS)}")
        _filters(at, route)
    if part.unmatched not in ("default", "reject"):
        raise ValueError(f"unmatched: expected default or reject, got {part.unmatched!r}")


def _filters(at: str, route: Route) -> None:
    """A route's filters (``meshd.fleet.rewrite``): bounded, and what they write valid in
    both HTTP/1.1 and HTTP/2 heads."""
    if route.prefix_rewrite is not None and route.full_path_rewrite is not None:
        raise ValueError(f"{at}: prefix_rewrite and full_path_rewrite together")
    for key in ("prefix_rewrite", "full_path_rewrite"):
        value = getattr(route, key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > MAX_REWRITE or not _PATH.fullmatch(value):
            raise ValueError(f"{at}.{key}: expected a path of at most {MAX_REWRITE} URI path "
                             f"characters, got {str(value)[:64]!r}")
        if key == "full_path_rewrite" and not value.startswith("/"):
            raise ValueError(f"{at}.{key}: expected a path starting with /, got {value[:64]!r}")
    if route.prefix_rewrite is not None:
        for j, m in enumerate(route.matches):
            if m.path is None or m.path.kind == "regex":
                raise ValueError(f"{at}.matches[{j}]: prefix_rewrite needs a prefix or an "
                                 f"exact path match")
    host = route.host_rewrite
    if host is not None and (not isinstance(host, str) or len(host) > MAX_REWRITE
                             or not _HOST.fullmatch(host)):
        raise ValueError(f"{at}.host_rewrite: not a host name: {str(host)[:64]!r}")
    for key in ("request_headers", "response_headers"):
        edit = getattr(route, key)
        if edit is not None:
            _header_edit(f"{at}.{key}", edit)


def _header_edit(at: str, edit: HeaderEdit) -> None:
    if not isinstance(edit, HeaderEdit):
        raise ValueError(f"{at}: expected a HeaderEdit, got {type(edit).__name__}")
    for kind in ("set", "add", "remove"):
        items = getattr(edit, kind)
        if not isinstance(items, tuple):
            raise ValueError(f"{at}.{kind}: expected a tuple")
        _bound(f"{at}.{kind}", items, MAX_HEADER_EDITS)
        for item in items:
            if kind != "remove" and not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"{at}.{kind}: expected (name, value) pairs")
            name, value = (item, None) if kind == "remove" else item
            if not isinstance(name, str) or len(name) > 256 or not _TOKEN.fullmatch(name):
                raise ValueError(f"{at}.{kind}: not a header name: {str(name)[:64]!r}")
            if reserved(name):
                raise ValueError(f"{at}.{kind}: {name!r} is not a field a route may change")
            if value is not None and (not isinstance(value, str) or len(value) > MAX_HEADER_VALUE
                                      or not _VALUE.fullmatch(value)):
                raise ValueError(f"{at}.{kind}.{name}: expected printable ASCII of at most "
                                 f"{MAX_HEADER_VALUE} characters, no blank at either end")


def _match(at: str, m: Match) -> None:
    if m.path is not None:
        if m.path.kind == "regex":
            _regex(f"{at}.path", m.path.value)
        elif m.path.kind in ("prefix", "segments", "exact"):
            if not m.path.value.startswith("/"):
                raise ValueError(f"{at}.path: expected a path starting with /, got {m.path.value!r}")
        else:
            raise ValueError(f"{at}.path: unknown kind {m.path.kind!r}")
    for method in m.methods:
        if not _METHOD.fullmatch(method):
            raise ValueError(f"{at}.methods: expected upper-case letters, got {method!r}")
    _bound(f"{at}.headers", m.headers, MAX_CONDITIONS)
    for h in m.headers:
        if not _HEADER_NAME.fullmatch(h.name):
            raise ValueError(f"{at}.headers: invalid (or not lower-case) name {h.name!r}")
        if h.kind == "regex":
            _regex(f"{at}.headers.{h.name}", h.value)
        elif h.kind not in ("exact", "prefix", "suffix", "present"):
            raise ValueError(f"{at}.headers.{h.name}: unknown kind {h.kind!r}")
    _bound(f"{at}.query", m.query, MAX_CONDITIONS)
    for q in m.query:
        if q.kind == "regex":
            _regex(f"{at}.query.{q.name}", q.value)
        elif q.kind not in ("exact", "present"):
            raise ValueError(f"{at}.query.{q.name}: unknown kind {q.kind!r}")


def _targets(at: str, targets: tuple[WeightedTarget, ...]) -> None:
    _bound(at, targets, MAX_TARGETS)
    for i, t in enumerate(targets):
        _service(f"{at}[{i}].service", t.target.service)
        if not isinstance(t.weight, int) or not 0 <= t.weight <= MAX_WEIGHT:
            raise ValueError(f"{at}[{i}].weight: expected 0..{MAX_WEIGHT}, got {t.weight!r}")
    if targets and not any(t.weight for t in targets):
        raise ValueError(f"{at}: every weight is 0")


def _resolver(part: Resolver) -> None:
    _bound("subsets", part.subsets, MAX_SUBSETS)
    names = {s.name for s in part.subsets}
    if len(names) != len(part.subsets):
        raise ValueError("subsets: a name is given twice")
    if part.default_subset and part.default_subset not in names:
        raise ValueError(f"default_subset: no subset is named {part.default_subset!r}")
    _bound("failover", part.failover, MAX_FAILOVER)
    for i, t in enumerate(part.failover):
        _service(f"failover[{i}].service", t.service)
    for key in ("connect_timeout", "timeout"):
        value = getattr(part, key)
        if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 86400):
            raise ValueError(f"{key}: expected seconds in (0, 86400], got {value!r}")


def _bound(at: str, items: tuple[Any, ...], most: int) -> None:
    if len(items) > most:
        raise ValueError(f"{at}: {len(items)} given, meshd takes at most {most}")


def _regex(at: str, pattern: str) -> None:
    if len(pattern) > MAX_REGEX:
        raise ValueError(f"{at}: a regex of {len(pattern)} characters, at most {MAX_REGEX}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{at}: invalid regex {pattern!r}: {e}") from None


def _service(at: str, name: str) -> None:
    if not isinstance(name, str) or not _SERVICE.fullmatch(name):
        raise ValueError(f"{at}: not a service name: {name!r}")


def _authz(part: Authorization) -> None:
    _bound("rules", part.rules, MAX_AUTHZ_RULES)
    for i, rule in enumerate(part.rules):
        at = f"rules[{i}]"
        if rule.peers is not None:
            _bound(f"{at}.peers", rule.peers, MAX_AUTHZ_PEERS)
            for j, pattern in enumerate(rule.peers):
                why = (None if pattern == ANY_IDENTITY else spiffe.pattern_problem(pattern)
                       if isinstance(pattern, str) else "not a string")
                if why is not None:
                    raise ValueError(f"{at}.peers[{j}]: {why}")
        _bound(f"{at}.matches", rule.matches, MAX_AUTHZ_MATCHES)
        for j, m in enumerate(rule.matches):
            _match(f"{at}.matches[{j}]", m)


def referenced(policy: Policy) -> set[str]:
    """The services a policy can send requests to (watched while it is in effect)."""
    names: set[str] = set()
    if policy.routes is not None:
        for route in policy.routes.routes:
            names.update(t.target.service for t in route.destination)
    if policy.split is not None:
        names.update(t.target.service for t in policy.split.targets)
    if policy.resolver is not None:
        names.update(t.service for t in policy.resolver.failover)
    names.discard(policy.service)
    return names

