"""Fleet policies without sockets: Consul entries in meshd's terms (and what is refused),
the wire encoding and bounds, and the worker's selection (matches, exact split shares,
subsets, failover)."""

from __future__ import annotations

from collections import Counter

import pytest
from meshd_consul.config_entries import EntryError, resolver, router, splitter

from meshd.fleet.api import (
    MAX_ROUTES,
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
from meshd.fleet.select import NO_SUCH_SUBSET, Selector, in_subset
from meshd.fleet.wire import Policy, decode, encode, problem, referenced


def test_router_entry_in_meshd_terms() -> None:
    routes = router({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/admin", "Methods": ["get"],
                            "Header": [{"Name": "X-Debug", "Exact": "1"},
                                       {"Name": "x-skip", "Present": True, "Invert": True}],
                            "QueryParam": [{"Name": "v", "Regex": "[0-9]+"}]}},
         "Destination": {"Service": "admin", "RequestTimeout": "1.5s", "NumRetries": 3,
                         "RetryOnConnectFailure": True, "RetryOnStatusCodes": [503]}},
        {"Destination": {"ServiceSubset": "v2", "RequestTimeout": 2_000_000_000}}]}, "web")
    assert routes.entry == "service-router/web"
    first, second = routes.routes
    assert first.matches == (Match(PathMatch("prefix", "/admin"), frozenset({"GET"}),
                                   (HeaderMatch("x-debug", "exact", "1"),
                                    HeaderMatch("x-skip", "present", "", True)),
                                   (QueryMatch("v", "regex", "[0-9]+"),)),)
    assert first.destination == (WeightedTarget(Target("admin"), 1),)
    assert (first.timeout, first.retries, first.retry_on) == (1.5, 3, frozenset({"connect", "5xx"}))
    assert second.matches == () and second.timeout == 2.0
    assert second.destination == (WeightedTarget(Target("web", "v2"), 1),)


def test_splitter_and_resolver_entries() -> None:
    split = splitter({"Kind": "service-splitter", "Name": "web", "Splits": [
        {"Weight": 90.5, "ServiceSubset": "v1"}, {"Weight": 9.5, "Service": "web-canary"}]}, "web")
    assert split.targets == (WeightedTarget(Target("web", "v1"), 9050),
                             WeightedTarget(Target("web-canary"), 950))
    res = resolver({"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1",
                    "ConnectTimeout": "250ms",
                    "Subsets": {"v1": {"Filter": 'Service.Meta.version == "v1" and prod in Service.Tags'},
                                "v2": {"Filter": "Service.Tags contains canary", "OnlyPassing": True}},
                    "Failover": {"*": {"Datacenters": ["dc2", "dc3"]}}}, "web", "dc1")
    assert res.subsets == (Subset("v1", (("meta:version", "v1"), ("tag", "prod"))),
                           Subset("v2", (("tag", "canary"),)))
    assert res.failover == (Target("web@dc2"), Target("web@dc3"))
    assert (res.default_subset, res.connect_timeout) == ("v1", 0.25)
    targets = resolver({"Kind": "service-resolver", "Name": "web", "Failover": {"*": {
        "Targets": [{"Service": "backup"}, {"Datacenter": "dc2", "ServiceSubset": "v1"}]}}}, "web")
    assert targets.failover == (Target("backup"), Target("web@dc2", "v1"))


@pytest.mark.parametrize("kind, entry, field", [
    ("split", {"Splits": [{"Weight": 50}, {"Weight": 40, "Service": "b"}]}, "add up to 90"),
    ("split", {"Splits": [{"Weight": "50"}]}, "Splits[0].Weight"),
    ("routes", {"Routes": [{"Match": {"HTTP": {"PathRegex": "/\\pL+"}}}]}, "PathRegex"),
    ("routes", {"Routes": [{"Destination": {"PrefixRewrite": "/v2"}}]}, "PrefixRewrite"),
    ("routes", {"Routes": [{"Match": {"HTTP": {"PathPrefix": "/a", "PathExact": "/b"}}}]},
     "at most one"),
    ("routes", {"Routes": [{"Destination": {"RetryOn": ["cancelled"]}}]}, "RetryOn[0]"),
    ("routes", {"Routes": [{"Destination": {"Namespace": "team-a"}}]}, "Namespace"),
    ("resolver", {"Subsets": {"v1": {"Filter": "Service.Meta.v matches \"1.*\""}}},
     "Subsets.v1.Filter"),
    ("resolver", {"Redirect": {"Service": "other"}}, "Redirect"),
    ("resolver", {"Failover": {"v2": {"Datacenters": ["dc2"]}}}, "Failover.v2"),
])
def test_entries_meshd_cannot_apply_are_refused_by_field(kind: str, entry: dict, field: str) -> None:
    fn = {"split": splitter, "routes": router, "resolver": resolver}[kind]
    with pytest.raises(EntryError, match=field.replace("[", r"\[").replace("]", r"\]")):
        fn({"Kind": "x", "Name": "web", **entry}, "web")


def _policy() -> Policy:
    return Policy(
        "web",
        Routes("r", (
            Route("api", (Match(PathMatch("segments", "/api"), frozenset({"GET"}),
                                (HeaderMatch("x-v", "regex", "[12]"),)),),
                  (WeightedTarget(Target("api"), 1),), timeout=1.0),
            Route("beta", (Match(query=(QueryMatch("beta", "present"),)),),
                  (WeightedTarget(Target("web", "v2"), 1),)),
            Route("canary", (Match(PathMatch("exact", "/c")),),
                  (WeightedTarget(Target("web", "v1"), 3), WeightedTarget(Target("web", "v2"), 1))),
        )),
        Split("s", (WeightedTarget(Target("web", "v1"), 9000), WeightedTarget(Target("web", "v2"), 1000))),
        Resolver("res", (Subset("v1", (("meta:version", "v1"),)), Subset("v2", (("meta:version", "v2"),))),
                 "v1", (Target("web@dc2"), Target("backup", "nope")), 0.5))


def test_selector_routes_splits_and_resolves() -> None:
    sel = Selector({"web": _policy()})
    h = [(b"X-V", b"2")]
    assert sel.route("web", b"GET", b"/api/x", h)[0] == Target("api")
    assert sel.route("web", b"GET", b"/api", h)[0] == Target("api")
    # /apix is not under /api by path segments; a wrong header or method misses too:
    # those fall to the service's split.
    for method, target, headers in ((b"GET", b"/apix", h), (b"GET", b"/api", [(b"x-v", b"3")]),
                                    (b"POST", b"/api", h)):
        assert sel.route("web", method, target, headers)[1] is None
    assert sel.route("web", b"GET", b"/x?a=1&beta", [])[0] == Target("web", "v2")
    # Exact shares: 90/10 over every 10 picks, 3/1 over every 4.
    picks = Counter(sel.route("web", b"GET", b"/", [])[0].subset for _ in range(1000))
    assert picks == {"v1": 900, "v2": 100}
    picks = Counter(sel.route("web", b"GET", b"/c", [])[0].subset for _ in range(400))
    assert picks == {"v1": 300, "v2": 100}
    r = sel.resolve(Target("web"))
    assert r.labels == (("meta:version", "v1"),)
    assert r.failover == (("web@dc2", ()), ("backup", NO_SUCH_SUBSET))
    assert in_subset(r.labels, (("meta:version", "v1"), ("tag", "x")))
    assert not in_subset(r.labels, (("meta:version", "v2"),))


def test_wire_round_trip_bounds_and_references() -> None:
    p = _policy()
    assert decode(encode(p)) == p
    assert problem(p.routes) is None and problem(p.split) is None and problem(p.resolver) is None
    assert referenced(p) == {"api", "web@dc2", "backup"}
    too_many = Routes("r", tuple(Route(f"r{i}") for i in range(MAX_ROUTES + 1)))
    assert "at most" in (problem(too_many) or "")
    assert "every weight is 0" in (problem(Split("s", (WeightedTarget(Target("a"), 0),))) or "")
    assert "default_subset" in (problem(Resolver("r", (), "v9")) or "")
    regex = Match(path=PathMatch("regex", "/v[0-9]+/.*"))
    assert "prefix_rewrite" in (problem(Routes("r", (Route("x", (regex,), prefix_rewrite="/v2"),)))
                                or "")
    with pytest.raises(ValueError):
        decode({"_": "Nope", "f": []})


def test_a_new_selector_keeps_what_did_not_change() -> None:
    web, other = _policy(), Policy("api", split=Split("s", (WeightedTarget(Target("a"), 1),
                                                             WeightedTarget(Target("b"), 1))))
    first = Selector({"web": web, "api": other})
    assert first.route("api", b"GET", b"/", [])[0] == Target("a")
    changed = Policy("web", split=Split("s2", (WeightedTarget(Target("web", "v2"), 1),)))
    second = Selector({"web": changed, "api": other}, first)
    # api's alternation goes on where it was (a, then b); web's policy is the new one.
    assert second.route("api", b"GET", b"/", [])[0] == Target("b")
    assert second.route("web", b"GET", b"/", [])[0] == Target("web", "v2")
