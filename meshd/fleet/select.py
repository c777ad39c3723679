"""Applying fleet policies to one request (sans-IO: values in, a choice out).

A worker builds one ``Selector`` per set of policies it loads (the snapshot's ``fleet``,
rebuilt only when that changes) and asks it, per request naming a service that has a
policy: which route matches (``route``), which target its destination or the service's
split picks (``target``), and where that target's endpoints are (``resolve``: the
subset's labels, then the failover targets with theirs). The order of those steps is
that of ``docs/config-sources.md``: routes, then the split of a target that a route did
not already pick by weight, then the resolver.

Weighted picks use smooth weighted round robin (``meshd.balance.p2c.RoundRobin``), one
state per route and per split in each worker: exact shares over every run of
sum-of-weights requests (10 % is one request in ten, not a coin toss), so a canary's
share is what the operator wrote from the first requests on.

A route's filters (``meshd.fleet.rewrite``) are compiled per match (a prefix rewrite
replaces the prefix of the match that held) and returned with the route. A service whose
``Routes`` say ``unmatched = "reject"`` (an HTTPRoute attached, GAMMA) names its entry in
``rejects``: the worker answers 404 to a request none of its routes matched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from meshd.balance.p2c import Candidate, RoundRobin
from meshd.fleet.api import HeaderMatch, Match, Resolver, Route, Target, WeightedTarget
from meshd.fleet.rewrite import Rewrite
from meshd.fleet.wire import Policy
from meshd.rowkeys import fleet_route_key

Labels = tuple[tuple[str, str], ...]
NO_SUCH_SUBSET: Labels = (("\0", "no such subset"),)   # no endpoint carries it
MAX_QUERY = 4096     # bytes of a query string looked at (client-controlled)


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where a target's requests go: ``service``'s endpoints carrying ``labels`` (all of
    them; () keeps every endpoint), else each ``failover`` (service, labels) in order."""
    service: str
    labels: Labels
    failover: tuple[tuple[str, Labels], ...]
    resolver: Resolver | None


class _Weighted:
    __slots__ = ("targets", "rr", "candidates")

    def __init__(self, targets: tuple[WeightedTarget, ...]) -> None:
        self.targets = targets
        self.rr = RoundRobin()
        self.candidates = [Candidate(float(t.weight)) for t in targets]

    def pick(self) -> Target:
        if len(self.targets) == 1:
            return self.targets[0].target
        return self.targets[self.rr.pick(self.candidates)].target


class _Route:
    __slots__ = ("route", "matches", "destination", "rewrite")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.matches = [_Match(m, route) for m in route.matches]
        self.destination = _Weighted(route.destination) if route.destination else None
        self.rewrite = Rewrite.of(route, None)   # of a route without matches

    def holds(self, method: bytes, path: str, query: str | None,
              headers: Sequence[tuple[bytes, bytes]]) -> tuple[bool, Rewrite | None]:
        """(whether the route matches, the filters of the match that held)."""
        if not self.matches:
            return True, self.rewrite
        params: list[tuple[str, str]] | None = None
        for m in self.matches:
            if m.query and params is None:
                params = parse_qsl(query or "", keep_blank_values=True)
            if m.holds(method, path, params or [], headers):
                return True, m.rewrite
        return False, None


class _Match:
    __slots__ = ("path_kind", "path", "path_re", "methods", "headers", "query", "rewrite")

    def __init__(self, m: Match, route: Route) -> None:
        # a prefix rewrite replaces the prefix of the match that held
        self.rewrite = Rewrite.of(route, m)
        self.path_kind = m.path.kind if m.path is not None else ""
        self.path = m.path.value if m.path is not None else ""
        self.path_re = re.compile(self.path) if self.path_kind == "regex" else None
        self.methods = frozenset(x.encode() for x in m.methods)
        self.headers = [(h, h.name.encode("latin-1"), re.compile(h.value) if h.kind == "regex"
                         else None) for h in m.headers]
        self.query = [(q, re.compile(q.value) if q.kind == "regex" else None) for q in m.query]

    def holds(self, method: bytes, path: str, params: list[tuple[str, str]],
              headers: Sequence[tuple[bytes, bytes]]) -> bool:
        if self.methods and method not in self.methods:
            return False
        kind = self.path_kind
        if kind == "prefix" and not path.startswith(self.path):
            return False
        if kind == "exact" and path != self.path:
            return False
        if kind == "segments" and not _segment_prefix(path, self.path):
            return False
        if self.path_re is not None and self.path_re.fullmatch(path) is None:
            return False
        for h, name, rx in self.headers:
            values = [v.decode("latin-1") for k, v in headers if k.lower() == name]
            if _header_holds(h, values, rx) == h.invert:
                return False
        for q, rx in self.query:
            values = [v for k, v in params if k == q.name]
            if q.kind == "present":
                ok = bool(values)
            elif rx is not None:
                ok = any(rx.fullmatch(v) for v in values)
            else:
                ok = q.value in values
            if not ok:
                return False
        return True


def _segment_prefix(path: str, prefix: str) -> bool:
    """Gateway API PathPrefix: "/foo" matches "/foo", "/foo/" and "/foo/bar", not "/foobar"."""
    base = prefix.rstrip("/")
    if not base:
        return True
    return path == base or path.startswith(base + "/")


def _header_holds(h: HeaderMatch, values: list[str], rx: re.Pattern[str] | None) -> bool:
    if h.kind == "present":
        return bool(values)
    if h.kind == "exact":
        return h.value in values
    if h.kind == "prefix":
        return any(v.startswith(h.value) for v in values)
    if h.kind == "suffix":
        return any(v.endswith(h.value) for v in values)
    return rx is not None and any(rx.fullmatch(v) for v in values)


class Selector:
    """The compiled policies of one snapshot."""

    def __init__(self, policies: Mapping[str, Policy], previous: Selector | None = None) -> None:
        """``previous``: the selector these policies replace; the compiled routes and
        splits (and their weighted-pick state) of every policy it shares are kept."""
        self.policies = policies
        self._routes: dict[str, list[_Route]] = {}
        self._splits: dict[str, _Weighted] = {}
        # service -> route name -> the route's metric row key (``route_key``)
        self._keys: dict[str, dict[str, str]] = {}
        for name, p in policies.items():
            same = previous is not None and previous.policies.get(name) is p
            if p.routes is not None:
                self._routes[name] = (previous._routes[name] if same and previous is not None
                                      else [_Route(r) for r in p.routes.routes])
                self._keys[name] = (previous._keys[name] if same and previous is not None
                                    else {r.name: fleet_route_key(r.name, name)
                                          for r in p.routes.routes})
            if p.split is not None:
                self._splits[name] = (previous._splits[name] if same and previous is not None
                                      else _Weighted(p.split.targets))

    def __contains__(self, service: str) -> bool:
        return service in self.policies

    def route(self, service: str, method: bytes, target: bytes,
              headers: Sequence[tuple[bytes, bytes]],
              ) -> tuple[Target, Route | None, Rewrite | None]:
        """The target of a request naming ``service``, the route that chose it (None:
        none matched, see ``rejects``) and that route's filters."""
        routes = self._routes.get(service)
        if routes:
            q = target.find(b"?")
            path = (target if q < 0 else target[:q]).decode("latin-1")
            query = None if q < 0 else target[q + 1:q + 1 + MAX_QUERY].decode("latin-1")
            for r in routes:
                held, rewrite = r.holds(method, path, query, headers)
                if held:
                    if r.destination is None:
                        return self.split(Target(service)), r.route, rewrite
                    if len(r.destination.targets) == 1:
                        return self.split(r.destination.pick()), r.route, rewrite
                    # weighted: final, splits do not nest
                    return r.destination.pick(), r.route, rewrite
        if self.rejects(service) is not None:   # answered 404: no split pick spent
            return Target(service), None, None
        return self.split(Target(service)), None, None

    def rejects(self, service: str) -> str | None:
        """The entry whose routes reject a request to ``service`` that none of them
        matched (``Routes.unmatched`` "reject"), or None."""
        policy = self.policies.get(service)
        routes = policy.routes if policy is not None else None
        if routes is None or routes.unmatched != "reject":
            return None
        return routes.entry

    def route_key(self, service: str, route: Route) -> str:
        """The metric row key of ``route``, one of ``service``'s routes (made when the
        routes were compiled: a request builds no string for it); "" for a route that is
        not one of them (no row: not counted in the route_* families)."""
        keys = self._keys.get(service)
        return "" if keys is None else keys.get(route.name, "")

    def split(self, target: Target) -> Target:
        """The split of ``target``'s service picks, when it names no subset."""
        if target.subset:
            return target
        split = self._splits.get(target.service)
        return target if split is None else split.pick()

    def resolve(self, target: Target) -> Resolved:
        policy = self.policies.get(target.service)
        resolver = policy.resolver if policy is not None else None
        failover = () if resolver is None else tuple(
            (t.service, self._labels(t)) for t in resolver.failover)
        return Resolved(target.service, self._labels(target), failover, resolver)

    def _labels(self, target: Target) -> Labels:
        policy = self.policies.get(target.service)
        resolver = policy.resolver if policy is not None else None
        if resolver is None:
            return NO_SUCH_SUBSET if target.subset else ()
        name = target.subset or resolver.default_subset
        if not name:
            return ()
        for subset in resolver.subsets:
            if subset.name == name:
                return subset.labels
        return NO_SUCH_SUBSET


def in_subset(labels: Labels, endpoint_labels: Labels) -> bool:
    return all(kv in endpoint_labels for kv in labels)


# -- fleet authorization: the same match model, for inbound requests (meshd.authz) --------

Holds = Callable[[bytes, bytes, Sequence[tuple[bytes, bytes]]], bool]


def request_matcher(matches: tuple[Match, ...]) -> Holds:
    """``holds(method, target, headers)``: the request meets one of ``matches`` (every
    request when there are none), as a fleet route's matches are tried."""
    route = _Route(Route("", matches))

    def holds(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        q = target.find(b"?")
        path = (target if q < 0 else target[:q]).decode("latin-1")
        query = None if q < 0 else target[q + 1:q + 1 + MAX_QUERY].decode("latin-1")
        return route.holds(method, path, query, headers)[0]
    return holds
