"""Authorization: may this peer call this inbound listener (and route)? Sans-IO.

``Authorizer`` is compiled once per worker from ``Config.authorization`` (the
``[[authorization]]`` policies, checked by ``meshd.config_identity``); ``decide(listener,
route, peer)`` answers ``ALLOW``, ``Deny(reason)`` or ``AuditDeny(reason)``.

The rules (IDENTITY.md decision 8):
- A listener no policy names is open: every peer is allowed (``governs`` is False).
- Once a policy names a listener, its default is deny. A request is judged by the
  policies of the route it matches when some exist, else by the listener's policies
  without a route; when neither exists (the listener has route-scoped policies only and
  the request matches none of their routes) it is denied.
- Among the policies that judge a request, one allow-list pattern matching the peer's
  ``client_id`` allows it (patterns: ``meshd.identity.spiffe``, ``*`` within a segment).
  A peer without a verified identity (plaintext on a permissive listener, or TLS without
  a client certificate) matches no pattern.
- ``mode = "audit"`` is a dry run of the same policy in ``enforce``: the decision is made
  twice, with the enforce policies alone (the real one) and with every policy as if all
  were enforced. Real deny: ``Deny``. Real allow but the dry run denies: ``AuditDeny``
  (the caller logs and counts it, and lets the request through). So an audit policy never
  opens what an enforce policy closes, and never closes anything by itself.

Route scoping. Inbound requests are not routed today (an inbound listener forwards to its
``forward`` address; ``[[route]]`` tables pick services on outbound listeners), so for
authorization alone ``route_for`` matches a request against the conditions of the routes
the listener's policies name -- path prefix, path regex, methods, exact headers, and the
route's ``listener`` when it has one -- in file order, first match wins, as
``meshd.worker.routing`` matches them. The route's ``host`` is not compared: on an inbound
listener the service is the listener's, and the Host a peer sends is its own view of it.
Opaque TCP and tunnels have no request: they are judged with ``route = None``.

Fleet authorization (``FleetAuthorizer``): an inbound listener with ``service`` that no
policy of the file names takes the fleet ``Authorization`` part of that service
(``meshd.fleet.api``: an Istio AuthorizationPolicy from the kubernetes config source),
judged with its own rules -- the fleet match model instead of ``[[route]]`` names -- by
the same default-deny and audit rules. The file wins per listener, as for routes.

``DecisionCache`` keeps an identity provider's ``authorize(client_id)`` answers (Consul
intentions) per worker: bounded (``CACHE_SIZE`` ids, least recently used dropped first),
answers kept ``CACHE_TTL`` seconds, a failure to ask only ``ERROR_TTL`` (so an outage is
asked about again soon, but not once per request).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshd.config import RouteConfig
from meshd.config_identity import AuthorizationConfig
from meshd.errors import Forbidden
from meshd.fleet.api import ANY_IDENTITY, Authorization, AuthzRule
from meshd.fleet.select import request_matcher
from meshd.identity import spiffe
from meshd.worker.peer import Peer
from meshd.worker.routing import route_matcher

PUBLIC_REASON = Forbidden.reason
CACHE_SIZE = 1024
CACHE_TTL = 10.0
ERROR_TTL = 1.0
# What a log line shows of a client ID: it comes from a verified certificate, but a CA
# may sign long names (a SPIFFE ID may be 2048 bytes).
LOG_ID_LENGTH = 256

Headers = Sequence[tuple[bytes, bytes]]
Request = tuple[bytes, bytes, Headers]   # method, target, headers


@dataclass(frozen=True, slots=True)
class Allow:
    pass


@dataclass(frozen=True, slots=True)
class Deny:
    reason: str  # for the log line; the client gets PUBLIC_REASON


@dataclass(frozen=True, slots=True)
class AuditDeny:
    reason: str  # what an enforced policy would have refused, for the log line


Decision = Allow | Deny | AuditDeny
ALLOW = Allow()


class _Policy:
    __slots__ = ("index", "route", "enforce", "allow")

    def __init__(self, index: int, config: AuthorizationConfig) -> None:
        self.index = index
        self.route = config.route
        self.enforce = config.mode == "enforce"
        self.allow = config.allow


class _Listener:
    """The policies naming one listener, the routes they scope to (file order), and their
    judgments per (route, enforce policies only), made once."""

    __slots__ = ("name", "policies", "routes", "route_names", "has_audit", "_judgments")

    def __init__(self, name: str) -> None:
        self.name = name
        self.policies: list[_Policy] = []
        self.routes: list[tuple[str, Callable[[str, bytes, bytes, Headers], bool]]] = []
        self.route_names: frozenset[str] = frozenset()
        self.has_audit = False
        self._judgments: dict[tuple[str | None, bool], _Judgment | None] = {}

    def judgment(self, route: str | None, enforced_only: bool) -> _Judgment | None:
        """How the policies (the enforce ones alone, or all) judge a request of ``route``
        (one the policies name, or None); None: there are none of that kind."""
        key = (route, enforced_only)
        if key not in self._judgments:  # at most (named routes + 1) x 2 entries
            self._judgments[key] = _make_judgment(self, route, enforced_only)
        return self._judgments[key]


class _Judgment:
    """The allow-list patterns that judge a set of requests (None: no policy covers them,
    default deny) and the reasons of a refusal."""

    __slots__ = ("pattern", "refused", "anonymous")

    def __init__(self, pattern: re.Pattern[str] | None, refused: str, anonymous: str) -> None:
        self.pattern = pattern
        self.refused = refused      # an identity not in the lists
        self.anonymous = anonymous  # no verified identity

    def why(self, client_id: str) -> str | None:
        if self.pattern is None:
            return self.refused
        if not client_id:
            return self.anonymous
        return None if self.pattern.fullmatch(client_id) else self.refused


class Authorizer:
    def __init__(self, policies: Sequence[AuthorizationConfig],
                 routes: Sequence[RouteConfig] = ()) -> None:
        """``policies``: ``Config.authorization``; ``routes``: ``Config.routes`` (those the
        policies name are matched by ``route_for``)."""
        self._listeners: dict[str, _Listener] = {}
        for i, config in enumerate(policies):
            lst = self._listeners.get(config.listener)
            if lst is None:
                lst = self._listeners[config.listener] = _Listener(config.listener)
            lst.policies.append(_Policy(i, config))
            lst.has_audit = lst.has_audit or config.mode == "audit"
            if config.route is not None:
                lst.route_names |= {config.route}
        for route in routes:
            for lst in self._listeners.values():
                if any(p.route == route.name for p in lst.policies):
                    lst.routes.append((route.name, route_matcher(route)))

    def governs(self, listener: str) -> bool:
        """Whether any policy names ``listener`` (else it is open, and nothing is asked)."""
        return listener in self._listeners

    def scoped(self, listener: str) -> bool:
        """Whether a policy of ``listener`` names a route (``route_for`` is worth asking)."""
        lst = self._listeners.get(listener)
        return lst is not None and bool(lst.routes)

    def route_for(self, listener: str, method: bytes, target: bytes,
                  headers: Headers) -> str | None:
        """The first route, in file order, among those the listener's policies name,
        whose conditions the request meets; None when none does."""
        lst = self._listeners.get(listener)
        if lst is None or not lst.routes:
            return None
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
        for name, matches in lst.routes:
            if matches(listener, method, path, headers):
                return name
        return None

    def decide(self, listener: str, route: str | None, peer: Peer) -> Decision:
        lst = self._listeners.get(listener)
        if lst is None:
            return ALLOW
        if route not in lst.route_names:
            route = None  # a route no policy names is judged as no route
        client_id = peer.client_id
        real = lst.judgment(route, True)
        why = real.why(client_id) if real is not None else None
        if why is not None:
            return Deny(why)
        if lst.has_audit:
            dry = lst.judgment(route, False)
            why = dry.why(client_id) if dry is not None else None
            if why is not None:
                return AuditDeny(why)
        return ALLOW


def _make_judgment(lst: _Listener, route: str | None, enforced_only: bool,
                   ) -> _Judgment | None:
    policies = [p for p in lst.policies if p.enforce or not enforced_only]
    if not policies:
        return None
    judging = [p for p in policies if route is not None and p.route == route]
    scope = f"route {route!r}"
    if not judging:
        judging = [p for p in policies if p.route is None]
        scope = "the listener"
    if not judging:
        why = (f"no policy of listener {lst.name!r} covers this request (its policies "
               f"are for routes it does not match): default deny")
        return _Judgment(None, why, why)
    numbers = ", ".join(f"authorization[{p.index}]" for p in judging)
    return _Judgment(spiffe.compile_patterns([a for p in judging for a in p.allow]),
                     f"client identity not in the allow list of {scope} ({numbers})",
                     f"no verified client identity; {scope} allows identities only ({numbers})")


def log_id(client_id: str) -> str:
    """A client ID as a log line shows it: bounded, and "-" for none."""
    if not client_id:
        return "-"
    if len(client_id) > LOG_ID_LENGTH:
        return client_id[:LOG_ID_LENGTH] + "..."
    return client_id


class DecisionCache:
    """An identity provider's answers per client ID, bounded and expiring."""

    def __init__(self, size: int = CACHE_SIZE, ttl: float = CACHE_TTL,
                 error_ttl: float = ERROR_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self.error_ttl = error_ttl
        self.clock = clock
        # client_id -> (expires at, allowed; None: asking failed)
        self._entries: OrderedDict[str, tuple[float, bool | None]] = OrderedDict()

    def get(self, client_id: str) -> tuple[bool, bool | None]:
        """(found, answer): found False means ask the provider; an answer of None means
        asking failed lately (the caller applies its fail-open rule)."""
        entry = self._entries.get(client_id)
        if entry is None:
            return False, None
        if self.clock() >= entry[0]:
            del self._entries[client_id]
            return False, None
        self._entries.move_to_end(client_id)
        return True, entry[1]

    def put(self, client_id: str, allowed: bool | None) -> None:
        """Remember an answer (``None``: the provider could not tell)."""
        ttl = self.error_ttl if allowed is None else self.ttl
        self._entries[client_id] = (self.clock() + ttl, allowed)
        self._entries.move_to_end(client_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def pattern_matches(pattern: str, client_id: str) -> bool:
    """Whether one allow-list pattern matches ``client_id`` (tests and `meshd check`)."""
    return spiffe.compile_patterns([pattern]).fullmatch(client_id) is not None


# -- fleet authorization (an Authorization part of meshd.fleet, from a config source) ------

# A path a rule with path matches may cover: absolute, with no dot or empty segments, no
# ";" parameters, no backslash and no encoded "/", "." or "\" -- any of those may reach
# the application as another path than the one matched (a "/public/../admin" allowed by a
# "/public/*" rule), so such a request is covered by path-less rules only.
_CANONICAL = re.compile(rb"(?:/[A-Za-z0-9\-._~!$&'()*+,=:@%]+)*/?")
_ENCODED = re.compile(rb"%(?:2[eEfF]|5[cC])")
ENTRY_LENGTH = 200   # of the entry named in a denial reason (a list of policy names)


def canonical(path: bytes) -> bool:
    """Whether ``path`` (a request target up to "?") is one the rules may match on."""
    if not _CANONICAL.fullmatch(path) or _ENCODED.search(path):
        return False
    return not any(seg in (b".", b"..") for seg in path.split(b"/"))


class _FleetRule:
    __slots__ = ("audit", "anyone", "any_identity", "peers", "holds", "paths")

    def __init__(self, rule: AuthzRule) -> None:
        self.audit = rule.audit
        self.anyone = rule.peers is None
        patterns = [p for p in rule.peers or () if p != ANY_IDENTITY]
        self.any_identity = rule.peers is not None and ANY_IDENTITY in rule.peers
        self.peers = spiffe.compile_patterns(patterns)
        self.holds = request_matcher(rule.matches) if rule.matches else None
        self.paths = any(m.path is not None for m in rule.matches)

    def covers(self, client_id: str, request: Request | None) -> bool:
        if not self.anyone and not (client_id and (
                self.any_identity or self.peers.fullmatch(client_id))):
            return False
        if self.holds is None:
            return True
        if request is None:   # opaque TCP: no request for a rule's matches to hold
            return False
        method, target, headers = request
        if self.paths:
            q = target.find(b"?")
            if not canonical(target if q < 0 else target[:q]):
                return False
        return self.holds(method, target, headers)


class FleetAuthorizer:
    """A service's fleet ``Authorization`` compiled, for the inbound listeners serving it
    that no ``[[authorization]]`` table names (``meshd.fleet.api`` has the semantics)."""

    def __init__(self, part: Authorization) -> None:
        self.part = part
        self.rules = [_FleetRule(r) for r in part.rules]
        entry = part.entry if len(part.entry) <= ENTRY_LENGTH else part.entry[:ENTRY_LENGTH] + "..."
        self.refused = (f"no rule of {entry} allows this peer and request (default deny)"
                        if part.rules else f"{entry}: no rule, every request is denied")

    def decide(self, client_id: str, request: Request | None) -> Decision:
        """``request``: (method, target, headers), None for an opaque connection."""
        if self.part.enforced and not any(r.covers(client_id, request) for r in self.rules
                                          if not r.audit):
            return Deny(self.refused)
        if self.part.audited and not any(r.covers(client_id, request) for r in self.rules):
            return AuditDeny(self.refused)
        return ALLOW
