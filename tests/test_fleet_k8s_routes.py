"""The Gateway API translation of the kubernetes config source (sans-IO): HTTPRoute and
GRPCRoute objects to meshd fleet Routes, validation with field paths, the spec's
precedence across the routes of one Service, and the last-good bookkeeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshd_kubernetes.routes import (
    DISABLED,
    GRPC_CONTENT_TYPE,
    Invalid,
    ServiceRoutes,
    attaches,
    merge,
    parse,
)

from meshd.fleet.api import (
    Clear,
    HeaderMatch,
    PathMatch,
    QueryMatch,
    Refused,
    Routes,
    Set,
    Target,
    WeightedTarget,
)
from meshd.testing.k8s_server import backend, grpc_route, http_route


def name(ns: str, svc: str) -> str:
    return svc if ns == "default" else f"{svc}.{ns}"


def stamped(obj, created="2026-01-01T00:00:00Z"):
    obj["metadata"]["creationTimestamp"] = created
    return obj


def canary(weight: int, **kw):
    return stamped(http_route("web-canary", "web", [
        {"backendRefs": [backend("web", 100 - weight), backend("web-canary", weight)]}], **kw))


def test_canary_route_becomes_one_weighted_route_on_every_path():
    p = parse("HTTPRoute", canary(10), name)
    assert p.entry == "HTTPRoute default/web-canary"
    (_, route), = p.routes
    assert route.name == "default/web-canary#0"
    assert route.matches[0].path == PathMatch("segments", "/")   # the spec's default match
    assert route.destination == (WeightedTarget(Target("web"), 90),
                                 WeightedTarget(Target("web-canary"), 10))
    assert route.timeout is None and route.retries is None


def test_matches_timeouts_and_retries_translate():
    obj = stamped(http_route("api", "web", [{
        "matches": [{"path": {"type": "PathPrefix", "value": "/api/"},
                     "method": "POST",
                     "headers": [{"name": "X-Version", "value": "2"},
                                 {"name": "x-version", "value": "ignored: same name"},
                                 {"type": "RegularExpression", "name": "x-user",
                                  "value": "a.*"}],
                     "queryParams": [{"name": "debug", "value": "1"}]},
                    {"path": {"type": "Exact", "value": "/health"}}],
        "timeouts": {"request": "1m30s", "backendRequest": "500ms"},
        "retry": {"attempts": 2, "codes": [502, 503]},
        "backendRefs": [backend("api")]}]))
    (_, r), health = parse("HTTPRoute", obj, name).routes
    assert health[1].matches[0].path == PathMatch("exact", "/health")
    m = r.matches[0]
    assert m.path == PathMatch("segments", "/api") and m.methods == {"POST"}
    assert m.headers == (HeaderMatch("x-version", "exact", "2"),
                         HeaderMatch("x-user", "regex", "a.*"))
    assert m.query == (QueryMatch("debug", "exact", "1"),)
    assert (r.timeout, r.try_timeout, r.retries) == (90.0, 0.5, 2)
    assert r.retry_on == {"connect", "reset", "5xx"} and r.prefix_rewrite is None
    assert r.destination == (WeightedTarget(Target("api"), 1),)   # weight defaults to 1


def test_zero_timeouts_disable():
    obj = stamped(http_route("t", "web", [{"timeouts": {"request": "0s",
                                                        "backendRequest": "0s"}}]))
    (_, r), = parse("HTTPRoute", obj, name).routes
    assert (r.timeout, r.try_timeout) == (DISABLED, 0.0)
    assert r.destination == ()   # no backendRefs: the parent Service itself


def test_backends_get_meshd_names_in_any_namespace():
    obj = stamped(http_route("c", "web", [{"backendRefs": [
        backend("web-v2", 1), {"name": "web", "namespace": "default", "port": 80}]}],
        namespace="shop"))
    (_, r), = parse("HTTPRoute", obj, name).routes
    assert [t.target for t in r.destination] == [Target("web-v2.shop"), Target("web")]


def test_consumer_routes_replace_producer_routes_for_this_client():
    t = ServiceRoutes("shop", "cart", name)   # meshd runs in "default", the Service in "shop"
    producer = stamped(http_route("p", "cart", [{"backendRefs": [backend("cart-v2")]}],
                                  namespace="shop"))
    consumer = stamped(http_route("c", "cart", [{"timeouts": {"request": "100ms"}}],
                                  namespace="default", service_namespace="shop"))
    t.put("HTTPRoute", producer)
    part = t.routes()[0]
    assert part is not None and part.entry == "HTTPRoute shop/p"
    assert part.routes[0].destination[0].target == Target("cart-v2.shop")
    t.put("HTTPRoute", consumer)
    part = t.routes()[0]
    assert part is not None and part.entry == "HTTPRoute default/c"
    assert part.routes[0].timeout == 0.1
    t.reset("HTTPRoute", "default", [])   # the consumer route is gone: producer again
    assert t.routes()[0] is not None and t.routes()[0].entry == "HTTPRoute shop/p"


@pytest.mark.parametrize("rule, where", [
    ({"matches": [{"path": {"type": "RegularExpression", "value": "/a(["}}]},
     r"spec.rules\[0\].matches\[0\].path.value: not a regular expression"),
    ({"matches": [{"path": {"type": "Prefix", "value": "/a"}}]},
     r"matches\[0\].path.type: 'Prefix' is not"),
    ({"matches": [{"path": {"value": "/a//b"}}]}, r"path.value: not an absolute, normalized"),
    ({"matches": [{"headers": [{"name": "x", "value": "1", "type": "Prefix"}]}]},
     r"headers\[0\].type"),
    ({"matches": [{"method": "BREW"}]}, r"matches\[0\].method"),
    ({"backendRefs": [backend("a", 0), backend("b", 0)]}, r"backendRefs: every weight is 0"),
    ({"backendRefs": [backend("a", 1_000_001)]}, r"backendRefs\[0\].weight: expected an int"),
    ({"backendRefs": [{"name": "a", "weight": "10"}]}, r"backendRefs\[0\].weight"),
    ({"backendRefs": [{"name": "a", "namespace": "Other", "port": 80}]},
     r"backendRefs\[0\].namespace: not a namespace name"),
    ({"backendRefs": [{"name": "a", "kind": "ServiceImport",
                       "group": "multicluster.x-k8s.io"}]}, r"only Services"),
    ({"filters": [{"type": "RequestMirror", "requestMirror": {}}]},
     r"filters\[0\]: filter 'RequestMirror' is not supported"),
    ({"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]},
     r"filters\[0\]: filter 'RequestRedirect' is not supported"),
    ({"matches": [{"path": {"type": "Exact", "value": "/a"}}],
      "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
          "type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}}]},
     r"matches\[0\].path: URLRewrite's ReplacePrefixMatch needs a PathPrefix"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "Content-Length", "value": "1"}]}}]},
     r"requestHeaderModifier.set\[0\].name: meshd does not let a route change"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "add": [{"name": "x-a", "value": "a\r\nb"}]}}]},
     r"requestHeaderModifier.add\[0\].value: expected printable ASCII"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "remove": [f"x-{i}" for i in range(17)]}}]},
     r"requestHeaderModifier.remove: more than 16"),
    ({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
                  {"type": "RequestHeaderModifier", "requestHeaderModifier": {}}]},
     r"filters\[1\].type: RequestHeaderModifier is given twice"),
    ({"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "a..b_"}}]},
     r"urlRewrite.hostname: not a host name"),
    ({"timeouts": {"request": "10"}}, r"timeouts.request: not a Gateway API duration"),
    ({"timeouts": {"request": "1s", "backendRequest": "2s"}}, r"backendRequest: longer"),
    ({"retry": {"codes": [429]}}, r"retry.codes\[0\]: meshd retries 5xx"),
    ({"sessionPersistence": {"sessionName": "s"}}, r"sessionPersistence: not supported"),
])
def test_invalid_routes_are_refused_naming_the_field(rule, where):
    with pytest.raises(Invalid, match=where):
        parse("HTTPRoute", stamped(http_route("bad", "web", [rule])), name)


def test_attaches_only_to_the_named_service_in_its_namespace():
    r = http_route("r", "web", [])
    assert attaches(r, "default", "web") and not attaches(r, "default", "api")
    assert not attaches(r, "shop", "web")
    r["spec"]["parentRefs"] = [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                "name": "web"}, {"group": "core", "kind": "Service",
                                                 "name": "web", "namespace": "default"}]
    assert attaches(r, "default", "web")   # group "core" as the GAMMA docs write it
    r["spec"]["parentRefs"] = r["spec"]["parentRefs"][:1]
    assert not attaches(r, "default", "web")   # a Gateway of the same name is not it
    assert not attaches({"spec": "junk"}, "default", "web")


def test_grpc_routes_match_service_and_method_and_come_before_http_routes():
    g = stamped(grpc_route("g", "web", [
        {"matches": [{"method": {"service": "helloworld.Greeter", "method": "SayHello"}},
                     {"method": {"service": "helloworld.Greeter"}},
                     {"method": {"method": "Check"}},
                     {"method": {"type": "RegularExpression", "service": "grpc\\..*"}}],
         "backendRefs": [backend("greeter")]}]), "2026-06-01T00:00:00Z")
    h = stamped(http_route("h", "web", [{"matches": [{"path": {"type": "Exact",
                                                                "value": "/x"}}]}]))
    merged = merge([parse("HTTPRoute", h, name), parse("GRPCRoute", g, name)])
    assert merged is not None
    assert merged.entry == "GRPCRoute default/g, HTTPRoute default/h"
    paths = [r.matches[0].path for r in merged.routes]
    assert paths == [PathMatch("exact", "/helloworld.Greeter/SayHello"),
                     PathMatch("prefix", "/helloworld.Greeter/"),
                     PathMatch("regex", "/(?:grpc\\..*)/(?:[^/]+)"),   # service chars 7 > 0
                     PathMatch("regex", "/[^/]+/Check"),
                     PathMatch("exact", "/x")]
    assert all(r.matches[0].headers[0] == GRPC_CONTENT_TYPE for r in merged.routes[:4])
    assert merged.routes[4].matches[0].headers == ()
    with pytest.raises(Invalid, match=r"method: one of service and method"):
        parse("GRPCRoute", grpc_route("g", "web", [{"matches": [{"method": {}}]}]), name)
    with pytest.raises(Invalid, match=r"method.service: not a gRPC name"):
        parse("GRPCRoute", grpc_route("g", "web", [{"matches": [
            {"method": {"service": "a/b"}}]}]), name)


def test_precedence_across_routes_follows_the_spec():
    old = stamped(http_route("b-old", "web", [
        {"matches": [{"path": {"value": "/"}}]},                        # shortest prefix
        {"matches": [{"path": {"value": "/api"}, "method": "GET"}]},
        {"matches": [{"path": {"value": "/api"}}]}]), "2026-01-01T00:00:00Z")
    new = stamped(http_route("a-new", "web", [
        {"matches": [{"path": {"value": "/api"}}]},                     # tie: b-old is older
        {"matches": [{"path": {"value": "/api/v1"}}]},                  # longer prefix
        {"matches": [{"path": {"type": "Exact", "value": "/a"}}]},      # exact first
        {"matches": [{"path": {"value": "/api"},
                      "headers": [{"name": "x", "value": "1"}]}]}]), "2026-02-01T00:00:00Z")
    same = stamped(http_route("a-same", "web", [{"matches": [{"path": {"value": "/api"}}]}]),
                   "2026-01-01T00:00:00Z")                               # tie: a-same < b-old
    merged = merge([parse("HTTPRoute", o, name) for o in (new, old, same)])
    assert merged is not None
    assert [r.name for r in merged.routes] == [
        "default/a-new#2",
        "default/a-new#1",
        "default/b-old#1",
        "default/a-new#3",
        "default/a-same#0",
        "default/b-old#2",
        "default/a-new#0",
        "default/b-old#0"]


# -- properties -------------------------------------------------------------------------------

_paths = st.one_of(
    st.builds(lambda v: {"type": "Exact", "value": v}, st.sampled_from(["/", "/a", "/a/b"])),
    st.builds(lambda v: {"type": "PathPrefix", "value": v},
              st.sampled_from(["/", "/a", "/ab", "/a/b"])),
    st.builds(lambda v: {"type": "RegularExpression", "value": v},
              st.sampled_from(["/a.*", "/.*"])))
_matches = st.fixed_dictionaries({"path": _paths}, optional={
    "method": st.sampled_from(["GET", "POST"]),
    "headers": st.lists(st.builds(lambda n: {"name": n, "value": "v"},
                                  st.sampled_from("xyz")), max_size=2),
    "queryParams": st.lists(st.builds(lambda n: {"name": n, "value": "v"},
                                      st.sampled_from("pq")), max_size=2)})
_routes = st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3", "r4"]),
                             st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]),
                             st.lists(st.fixed_dictionaries(
                                 {"matches": st.lists(_matches, min_size=1, max_size=3)}),
                                 min_size=1, max_size=3)),
                   min_size=1, max_size=4, unique_by=lambda t: t[0])


def _rank(route):
    m = route.matches[0]
    kind = {"exact": 0, "regex": 1, "segments": 2}[m.path.kind]
    return (kind, -len(m.path.value), not m.methods, -len({h.name for h in m.headers}),
            -len({q.name for q in m.query}))


@settings(max_examples=150, deadline=None)
@given(_routes, st.randoms(use_true_random=False))
def test_merge_is_ordered_by_precedence_and_independent_of_input_order(routes, rnd):
    parsed = [parse("HTTPRoute", stamped(http_route(n, "web", rules), c), name)
              for n, c, rules in routes]
    merged = merge(parsed)
    assert merged is not None
    assert len(merged.routes) == sum(len(r["matches"]) for _, _, rules in routes
                                     for r in rules)
    ranks = [_rank(r) for r in merged.routes]
    assert ranks == sorted(ranks)
    shuffled = list(parsed)
    rnd.shuffle(shuffled)
    assert merge(shuffled) == merged


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(
                         ["spec", "rules", "matches", "path", "type", "value", "name",
                          "backendRefs", "weight", "headers", "timeouts", "request",
                          "filters", "method", "service", "metadata", "namespace"]),
                         inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_json, st.sampled_from(["HTTPRoute", "GRPCRoute"]))
def test_any_object_is_parsed_or_refused_never_crashes(obj, kind):
    doc = {"metadata": {"name": "x", "namespace": "default"}, "spec": obj}
    try:
        parse(kind, doc, name)
    except Invalid:
        pass
    table = ServiceRoutes("default", "web", name)
    table.put(kind, doc)
    assert table.updates()


# -- last good ------------------------------------------------------------------------------

def test_an_invalid_edit_is_refused_and_the_last_good_version_keeps_serving():
    t = ServiceRoutes("default", "web", name)
    assert t.updates() == [Clear("routes")]
    t.put("HTTPRoute", canary(10))
    (first,) = t.updates()
    assert isinstance(first, Set) and isinstance(first.part, Routes)
    assert t.updates() == []   # nothing changed: nothing said
    bad = canary(10)
    bad["spec"]["rules"][0]["backendRefs"][1]["weight"] = -1
    t.put("HTTPRoute", bad)
    assert t.updates() == [Refused("routes", "HTTPRoute default/web-canary",
                                   "spec.rules[0].backendRefs[1].weight: expected an integer "
                                   "0..1000000, got -1")]
    assert t.routes()[0] == first.part   # the last good stays in the merge
    # Another route changes meanwhile: Set the new merge, then the refusal again (a Set
    # clears meshd's refusal of the part).
    other = stamped(http_route("other", "web", [{"matches": [{"path": {"value": "/x"}}]}]))
    t.put("HTTPRoute", other)
    out = t.updates()
    assert [type(u) for u in out] == [Set, Refused]
    # Fixed with the same content as before: the Set clears the refusal.
    t.put("HTTPRoute", canary(10))
    assert t.updates() == [out[0]]
    t.put("HTTPRoute", canary(50))
    assert isinstance(t.updates()[0], Set)
    t.delete("HTTPRoute", "default", "web-canary")
    t.reset("HTTPRoute", "default", [])    # the list no longer has "other" either
    assert t.updates() == [Clear("routes")]


def test_a_route_never_good_is_refused_with_nothing_applied_and_moves_away():
    t = ServiceRoutes("default", "web", name)
    bad = stamped(http_route("bad", "web", [{"matches": [{"method": "BREW"}]}]))
    t.put("HTTPRoute", bad)
    assert t.updates() == [Clear("routes"), Refused(
        "routes", "HTTPRoute default/bad",
        "spec.rules[0].matches[0].method: not an HTTP method of the spec: 'BREW'")]
    bad["spec"]["parentRefs"][0]["name"] = "api"   # now attached elsewhere
    t.put("HTTPRoute", bad)
    assert t.updates() == [Clear("routes")]


def test_more_matches_than_meshd_takes_leave_the_newest_routes_out():
    t = ServiceRoutes("default", "web", name)
    rules = [{"matches": [{"path": {"value": f"/p{i}"}} for i in range(64)]}] * 3
    t.put("HTTPRoute", stamped(http_route("old", "web", rules), "2026-01-01T00:00:00Z"))
    t.put("HTTPRoute", stamped(http_route("new", "web", rules), "2026-01-02T00:00:00Z"))
    part, refused = t.routes()
    assert part is not None and part.entry == "HTTPRoute default/old"
    assert refused[0][0] == "HTTPRoute default/new" and "more than 256" in refused[0][1]


_ops = st.lists(st.tuples(st.sampled_from(["put", "put", "bad", "delete", "move", "relist"]),
                          st.sampled_from(["a", "b", "c"]), st.integers(0, 100)),
                max_size=25)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_what_meshd_ends_up_with_is_the_merge_of_each_routes_last_good_version(ops):
    """Applied as meshd applies them (Set replaces, Clear empties, Refused keeps), the
    updates always leave the merge of the last good version of each route still there,
    and a refusal is shown exactly while some route is refused."""
    t = ServiceRoutes("default", "web", name)
    store: dict[str, dict] = {}
    last_good: dict[str, dict] = {}
    shown: Routes | None = None
    refused_shown = None
    for i, (op, n, w) in enumerate(ops):
        created = f"2026-01-01T00:00:{ord(n) - 90:02d}Z"
        if op in ("put", "bad"):
            obj = stamped(http_route(n, "web", [{"backendRefs": [backend("web", w)]}]),
                          created)
            obj["spec"]["rules"][0]["backendRefs"].append(backend(f"v{n}", 100 - w))
            if op == "bad":
                obj["spec"]["rules"][0]["backendRefs"][0]["weight"] = -w - 1
            store[n] = obj
            t.put("HTTPRoute", obj)
            if op == "put":
                last_good[n] = obj
        elif op == "move" and n in store:   # attached elsewhere now: gone for web
            store[n]["spec"]["parentRefs"][0]["name"] = "api"
            t.put("HTTPRoute", store.pop(n))
            last_good.pop(n, None)
        elif op == "delete":
            store.pop(n, None)
            last_good.pop(n, None)
            t.delete("HTTPRoute", "default", n)
        elif op == "relist":
            t.reset("HTTPRoute", "default", list(store.values()))
        for u in t.updates() if i % 2 == 0 or i == len(ops) - 1 else ():
            if isinstance(u, Set):
                shown, refused_shown = u.part, None   # type: ignore[assignment]
            elif isinstance(u, Clear):
                shown, refused_shown = None, None
            elif isinstance(u, Refused):
                refused_shown = u
    expected = merge(parse("HTTPRoute", o, name) for o in last_good.values())
    assert shown == expected
    bad = sorted(n for n in store if n not in last_good or store[n] is not last_good[n])
    assert (refused_shown is not None) == bool(bad)
    if refused_shown is not None:
        assert refused_shown.entry == f"HTTPRoute default/{bad[0]}"
