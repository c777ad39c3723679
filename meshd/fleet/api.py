"""The config-source plugin contract (API version 1): routes, splits and failover of a
service from a fleet store (Consul config entries, the Kubernetes Gateway API).

A plugin is a class published by a distribution under the entry-point group
``meshd.config``; the entry point's name is what ``plugin = "..."`` in a
``[[config_source]]`` table picks. meshd constructs it once per table as
``Source(name, options)`` (``options``: the table's keys other than ``name`` and
``plugin``, read-only) in the control process and in ``meshd check``; the
constructor validates them and raises ``meshd.errors.ConfigError`` with key paths
relative to the table (``("address", "expected a URL")``). It must not do I/O.

Watches are per service and on demand, as for discovery: the control process calls
``watch(service)`` once for every service it watches endpoints of (configured, listed by a
discovery source, asked for by a request: discovery's ``max_watches`` bounds those) and
for every service a fleet policy names (a route's destination, a split's target, a
failover target), and iterates the generator
in a greenlet of its own (the control process is gevent-patched: sockets, ``requests``,
``time.sleep`` are cooperative there). A name may carry a datacenter, ``web@dc2``, as
for discovery. A watch that is no longer needed is closed (``GeneratorExit`` at its
``yield``, or ``GreenletExit`` while it blocks): release what it holds in ``finally``.

``watch`` yields ``Set`` / ``Clear`` / ``Refused`` updates, one *part* of the service's
policy at a time. A service's policy has three parts, each coming from at most one
entry of the store:

- ``Routes`` (Consul ``service-router``; an ``HTTPRoute`` whose parentRef is the
  Service): requests naming the service are matched against its routes in order; the
  first match decides the destination (a service, or a weighted split of services) and
  may set the request timeout and the retries;
- ``Split`` (Consul ``service-splitter``): requests that end up at the service, and no
  route sent elsewhere, are split by weight between targets (a canary);
- ``Resolver`` (Consul ``service-resolver``): subsets of the service's endpoints by
  label, the default subset, failover targets tried in order when the chosen target
  has no endpoints (another service or datacenter), connect timeout.

A fourth part, ``Authorization`` (kind ``"authz"``; an Istio ``AuthorizationPolicy``
targeting the Service), says who may call the service; it comes from the optional
``watch_authorization(service)``, called only for the services this meshd's inbound
listeners serve (``[[listener]] service``). Until some source that has the method has
answered for a service, its inbound listeners deny every request (fail closed: a
policy not known yet must not leave them open); a local ``[[authorization]]`` table
naming a listener wins over the fleet part for that listener.

The first update of a watch (any kind) counts as its first answer; a source that has
nothing for a service yields ``Clear`` for each kind it serves, so that meshd knows the
answer is "nothing" rather than "not yet".

Errors: a watch that raises (store unreachable, 5xx, ACL) is logged naming the plugin's
distribution and restarted with jittered backoff; the parts it gave stay in use (fail
static) and are persisted under ``state_dir``, so a meshd restarted while the store is
down routes with them. An entry the store holds but that cannot be used (a weight that
is not a number, weights not adding up, an unknown match kind, a regex that does not
compile, an unsupported field value) is ``Refused``: meshd keeps the last good part of
that kind, and names the entry and the reason in its log, in
``meshd_fleet_refused_entries`` and in ``/ready``'s detail (meshd stays ready: it routes
with the previous version). Plugins should refuse rather than guess: a partially applied
canary is worse than the previous one.

Precedence with the local file: the file wins for what it names, at the granularity of
(service, part). A service that is the ``host`` of a local ``[[route]]`` takes its
routing from the file: the fleet ``Routes`` and ``Split`` of that service are not
applied. A service with a ``[service.NAME]`` table takes failover and timeouts from it:
the fleet ``Resolver`` of that service is not applied. ``/config`` shows both, with
where each effective part came from. (Why: the file on one machine is the operator's
explicit, local decision, the one lever that still works when the fleet store is wrong
or unreachable; a fleet that silently overrode it would make a local emergency override
impossible. Services the file does not name, which is the point of a fleet store, are
wholly fleet-controlled.)

With several ``[[config_source]]`` tables, the first (in file order) that has a part of
a given kind for a service supplies it.

Everything here is a frozen value; ``meshd.fleet.wire`` encodes it for the snapshot.
Bounds a source must respect (meshd refuses the part otherwise, as if the plugin had
said ``Refused``): at most ``MAX_ROUTES`` routes, ``MAX_MATCHES`` matches per route,
``MAX_TARGETS`` targets per split, ``MAX_SUBSETS`` subsets, ``MAX_FAILOVER`` failover
targets, regexes of at most ``MAX_REGEX`` characters, ``MAX_HEADER_EDITS`` header
edits of each kind (names of at most 256 characters, values of at most
``MAX_HEADER_VALUE``), paths and hosts written of at most ``MAX_REWRITE``.

A route may change the request it sends (``prefix_rewrite``, ``full_path_rewrite``,
``host_rewrite``, ``request_headers``) and the response the client gets
(``response_headers``): see ``meshd.fleet.rewrite``. A ``Routes`` part whose
``unmatched`` is "reject" answers 404 to a request none of its routes match.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

API_VERSION = 1

MAX_ROUTES = 256
MAX_MATCHES = 16
MAX_CONDITIONS = 16     # header or query conditions of one match
MAX_TARGETS = 32
MAX_SUBSETS = 64
MAX_FAILOVER = 16
MAX_REGEX = 1024
MAX_HEADER_EDITS = 16   # set, add and remove each (the Gateway API's own maxItems)
MAX_REWRITE = 1024      # characters of a path or host a filter writes
MAX_HEADER_VALUE = 4096

PathKind = Literal["prefix", "segments", "exact", "regex"]
HeaderKind = Literal["exact", "prefix", "suffix", "regex", "present"]
QueryKind = Literal["exact", "regex", "present"]
PartKind = Literal["routes", "split", "resolver", "authz"]
Unmatched = Literal["default", "reject"]
PART_KINDS: tuple[PartKind, ...] = ("routes", "split", "resolver", "authz")
# What counts as a failed attempt, to be retried (meshd's ``failure_on`` kinds).
RETRY_KINDS = ("connect", "reset", "timeout", "5xx", "4xx")


@dataclass(frozen=True, slots=True)
class PathMatch:
    """``prefix``: the path starts with ``value`` (Consul PathPrefix); ``segments``: by
    whole path elements, "/foo" matches "/foo", "/foo/" and "/foo/bar" but not "/foobar"
    (Gateway API PathPrefix); ``exact``; ``regex``: the whole path matches (``re.fullmatch``,
    Python syntax). The path is the request target up to "?", not decoded."""
    kind: PathKind
    value: str           # starts with "/" unless a regex


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """Holds when some line of the header matches (``regex``: ``re.fullmatch``);
    ``present``: the header is there whatever its value."""
    name: str            # lower case
    kind: HeaderKind
    value: str = ""      # "" for present
    invert: bool = False # the condition holds when the header does NOT match


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """Holds when some ``name=value`` pair of the query string (percent-decoded, "+" as
    space) matches; ``regex``: ``re.fullmatch``."""
    name: str            # exact, case-sensitive, as decoded from the query string
    kind: QueryKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class Match:
    """Every given condition must hold (an empty Match matches every request)."""
    path: PathMatch | None = None
    methods: frozenset[str] = frozenset()      # upper case; empty: any
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class Target:
    """A service (``web``, or ``web@dc2`` in another datacenter), optionally one of its
    subsets (named by that service's ``Resolver``; "" is its default subset)."""
    service: str
    subset: str = ""


@dataclass(frozen=True, slots=True)
class WeightedTarget:
    target: Target
    weight: int          # relative; 0: none. Consul's percent with two decimals x 100.


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """Changes to a header section (Gateway API RequestHeaderModifier, Consul
    RequestHeaders), applied in this order: ``remove`` every field of those names,
    ``set`` (every field of the name replaced by one), ``add`` (one more field line;
    RFC 9110 §5.3: the same as appending ", value" to a list header). Names are matched
    case-insensitively; at most ``MAX_HEADER_EDITS`` of each."""
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """Requests matching any of ``matches`` (empty: every request) go to
    ``destination`` (a weighted split; empty: the service itself, then its ``Split``)."""
    # The route's name in metrics (route label), traces and /config: unique among the
    # service's routes, shared by Routes that are one route (docs/config-sources.md).
    name: str
    matches: tuple[Match, ...] = ()
    destination: tuple[WeightedTarget, ...] = ()
    timeout: float | None = None               # the whole request, seconds; None: unchanged
    try_timeout: float | None = None           # one attempt
    idle_timeout: float | None = None
    retries: int | None = None                 # None: the service's retries
    retry_on: frozenset[str] | None = None     # subset of RETRY_KINDS; None: the service's
    prefix_rewrite: str | None = None          # the matched path prefix (or exact path) replaced
    # -- filters (``meshd.fleet.rewrite`` applies them to the request sent upstream) --
    full_path_rewrite: str | None = None       # the whole path replaced (the query kept)
    host_rewrite: str | None = None            # the Host (HTTP/2 :authority) sent upstream
    request_headers: HeaderEdit | None = None  # header fields of the request sent upstream
    response_headers: HeaderEdit | None = None # header fields of the response to the client


@dataclass(frozen=True, slots=True)
class Routes:
    entry: str                                 # the store's name, e.g. "service-router/web"
    routes: tuple[Route, ...]
    # A request matching none of ``routes``: "default" sends it to the service itself
    # (then its Split; Consul's implicit last route), "reject" answers 404 (GAMMA: a
    # Service with HTTPRoutes attached rejects requests none of their rules match).
    unmatched: Unmatched = "default"


@dataclass(frozen=True, slots=True)
class Split:
    entry: str
    targets: tuple[WeightedTarget, ...]        # weights need not add up to anything


@dataclass(frozen=True, slots=True)
class Subset:
    """Endpoints carrying every one of ``labels`` (discovery labels: Consul gives
    ("tag", t) and ("meta:KEY", v), Kubernetes pod labels)."""
    name: str
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Resolver:
    entry: str
    subsets: tuple[Subset, ...] = ()
    default_subset: str = ""
    failover: tuple[Target, ...] = ()          # in order, when the target has no endpoints
    connect_timeout: float | None = None
    timeout: float | None = None               # request timeout of the service


# -- authorization ----------------------------------------------------------------------------

MAX_AUTHZ_RULES = 256     # rules of one service's Authorization, all policies together
MAX_AUTHZ_PEERS = 64      # identity patterns of one rule
MAX_AUTHZ_MATCHES = 64    # request matches of one rule
ANY_IDENTITY = "*"        # a peer pattern: any verified identity


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """Requests a rule allows: from ``peers`` (None: any peer, with or without a verified
    identity; else the peer's verified SPIFFE ID matches one pattern, ``meshd.identity.
    spiffe`` syntax, ``*`` within a segment, or is any verified ID for ``ANY_IDENTITY``)
    and matching one of ``matches`` (the fleet request model; empty: every request, and
    opaque TCP connections, which no match covers). A rule with matches covers only
    requests whose path is canonical (no dot or empty segments, no encoded "/", "." or
    "\\"): a path the application may read differently is never allowed by a path rule.
    ``audit``: the rule comes from a dry-run policy (``Authorization``)."""
    name: str                                  # shown in /config and in denial reasons
    peers: tuple[str, ...] | None = None
    matches: tuple[Match, ...] = ()
    audit: bool = False


@dataclass(frozen=True, slots=True)
class Authorization:
    """Who may call the service's inbound listeners (those with ``service`` set to it that
    no local ``[[authorization]]`` table names): a request is allowed when an enforced
    rule covers it, denied otherwise (default deny) -- when ``enforced`` (some enforced
    policy exists; an enforced policy without rules denies everything). ``audited``: some
    dry-run policy exists; the request is then judged again with every rule, dry-run ones
    included, as if all were enforced, and a request the real decision allows but that
    judgement denies is let through, logged and counted as an audit denial (meshd's
    ``mode = "audit"``: an audit policy never opens what an enforced one closes)."""
    entry: str
    rules: tuple[AuthzRule, ...] = ()
    enforced: bool = True
    audited: bool = False


Part = Routes | Split | Resolver | Authorization


def kind_of(part: Part) -> PartKind:
    if isinstance(part, Authorization):
        return "authz"
    return "routes" if isinstance(part, Routes) else "split" if isinstance(part, Split) else "resolver"


# -- updates --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Set:
    """This part of the service's policy is now ``part`` (replacing the previous one)."""
    part: Part


@dataclass(frozen=True, slots=True)
class Clear:
    """The source has no entry of ``kind`` for the service (none, or deleted)."""
    kind: PartKind


@dataclass(frozen=True, slots=True)
class Refused:
    """The store holds ``entry`` (of ``kind``) but it cannot be used: the last good part
    stays. ``reason`` names the field (``Splits[1].Weight: expected a number``)."""
    kind: PartKind
    entry: str
    reason: str


Update = Set | Clear | Refused


class Source:
    """Base class for config sources (inheriting is optional; the shape is the contract)."""

    api_version = API_VERSION

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options = options

    def watch(self, service: str) -> Iterator[Update]:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; called when the control process stops."""

    # Optional (a source without it serves no authorization):
    # def watch_authorization(self, service: str) -> Iterator[Update]:
    #     Called, like ``watch``, once per service that an inbound listener of this meshd
    #     serves (``[[listener]] service``), and only for those; yields ``Set(Authorization)``,
    #     ``Clear("authz")`` and ``Refused("authz", ...)``.
