"""Fleet route filters and GAMMA's reject without sockets: the path rewrites (the Gateway
API's ReplacePrefixMatch table, Consul's PrefixRewrite as characters, ReplaceFullPath),
header edits on HTTP/1.1 and HTTP/2 heads, the checks every filter passes (bounds,
reserved names, values), the translation from HTTPRoutes and Consul service-routers, the
worker's choice (a reject only where the routes say so) and state files written before
these fields existed."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from meshd_consul.config_entries import EntryError, router
from meshd_kubernetes.routes import Invalid, merge, parse

from meshd.fleet.api import (
    HeaderEdit,
    Match,
    PathMatch,
    Route,
    Routes,
    Target,
    WeightedTarget,
)
from meshd.fleet.rewrite import Rewrite, reserved
from meshd.fleet.select import Selector
from meshd.fleet.wire import Policy, decode, encode, pack, problem, unpack
from meshd.proto import http1
from meshd.proto.h2_headers import request_problem
from meshd.proto.translate import h2_request, http1_request


def segments(prefix: str, replace: str) -> Rewrite:
    route = Route("r", (Match(PathMatch("segments", prefix)),), prefix_rewrite=replace)
    rw = Rewrite.of(route, route.matches[0])
    assert rw is not None
    return rw


# The table of the Gateway API's HTTPPathModifier.ReplacePrefixMatch, row by row.
@pytest.mark.parametrize("path, prefix, replace, want", [
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
])
def test_replace_prefix_match_follows_the_spec_table(path, prefix, replace, want) -> None:
    assert segments(prefix, replace).target(path.encode()) == want.encode()


def test_path_rewrites_keep_the_query_and_leave_other_targets() -> None:
    rw = segments("/", "/api")
    assert rw.target(b"/x/y?a=1&b=/c") == b"/api/x/y?a=1&b=/c"
    assert rw.target(b"*") == b"*"
    consul = Route("r", (Match(PathMatch("prefix", "/api")),), prefix_rewrite="/")
    crw = Rewrite.of(consul, consul.matches[0])
    assert crw is not None and crw.target(b"/api/x?q") == b"//x?q"   # characters, as Envoy
    assert crw.target(b"/apiv2") == b"/v2"
    exact = Route("r", (Match(PathMatch("exact", "/old")),), prefix_rewrite="/new")
    erw = Rewrite.of(exact, exact.matches[0])
    assert erw is not None and erw.target(b"/old?x=1") == b"/new?x=1"
    full = Rewrite.of(Route("r", full_path_rewrite="/one"), None)
    assert full is not None and full.target(b"/a/b/c?k=v") == b"/one?k=v"
    assert Rewrite.of(Route("r"), None) is None   # most routes: nothing to do per request


def test_header_edits_on_http1_and_http2_heads() -> None:
    edit = HeaderEdit(set=(("X-Route", "v1"),), add=(("X-Added", "a"),),
                      remove=("x-drop", "X-Route-Old"))
    rw = Rewrite.of(Route("r", request_headers=edit, host_rewrite="api.internal",
                          full_path_rewrite="/p"), None)
    assert rw is not None
    req = http1.RequestHead(b"GET", b"/q?x", b"HTTP/1.1",
                            [(b"Host", b"web"), (b"x-route", b"client"), (b"X-Drop", b"1"),
                             (b"X-Added", b"c"), (b"Accept", b"*/*")], b"web", None, False,
                            True, False, None, frozenset())
    sent = rw.http1(req)
    assert sent.target == b"/p?x" and sent.host == b"api.internal"
    assert sent.headers == [(b"X-Added", b"c"), (b"Accept", b"*/*"), (b"Host", b"api.internal"),
                            (b"X-Route", b"v1"), (b"X-Added", b"a")]
    assert req.target == b"/q?x" and (b"X-Drop", b"1") in req.headers   # the original kept
    h2 = rw.h2([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web"),
                (b":path", b"/q"), (b"x-route", b"client"), (b"x-drop", b"1")])
    assert h2 == [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"api.internal"),
                  (b":path", b"/p"), (b"x-route", b"v1"), (b"x-added", b"a")]
    target, authority, fields = rw.h2_request(b"/q", b"web", [(b"host", b"web"),
                                                             (b"x-drop", b"1")])
    assert (target, authority, fields) == (b"/p", b"api.internal",
                                           [(b"x-route", b"v1"), (b"x-added", b"a")])
    resp = Rewrite.of(Route("r", response_headers=HeaderEdit(remove=("x-backend",),
                                                               set=(("x-by", "mesh"),))), None)
    assert resp is not None
    assert resp.response([(b":status", b"200"), (b"x-backend", b"a")], True) == [
        (b":status", b"200"), (b"x-by", b"mesh")]


@pytest.mark.parametrize("route, where", [
    (Route("r", request_headers=HeaderEdit(set=(("Content-Length", "1"),))), "not a field"),
    (Route("r", request_headers=HeaderEdit(add=(("Host", "x"),))), "not a field"),
    (Route("r", request_headers=HeaderEdit(remove=("meshd-orig-proto",))), "not a field"),
    (Route("r", response_headers=HeaderEdit(set=(("transfer-encoding", "x"),))), "not a field"),
    (Route("r", request_headers=HeaderEdit(set=(("x-a", "a\r\nb: c"),))), "printable ASCII"),
    (Route("r", request_headers=HeaderEdit(set=(("x-a", " padded"),))), "printable ASCII"),
    (Route("r", request_headers=HeaderEdit(set=(("x-a", "v" * 4097),))), "printable ASCII"),
    (Route("r", request_headers=HeaderEdit(set=(("bad name", "v"),))), "not a header name"),
    (Route("r", request_headers=HeaderEdit(remove=tuple(f"x-{i}" for i in range(17)))),
     "at most 16"),
    (Route("r", full_path_rewrite="no-slash"), "starting with /"),
    (Route("r", full_path_rewrite="/a b"), "URI path characters"),
    (Route("r", full_path_rewrite="/" + "a" * 1024), "URI path characters"),
    (Route("r", prefix_rewrite="/a", full_path_rewrite="/b"), "together"),
    (Route("r", (Match(PathMatch("regex", "/.*")),), prefix_rewrite="/a"), "prefix_rewrite"),
    (Route("r", (Match(),), prefix_rewrite="/a"), "prefix_rewrite"),
    (Route("r", host_rewrite="a b"), "host_rewrite"),
])
def test_filters_meshd_cannot_apply_faithfully_are_refused(route, where) -> None:
    assert where in (problem(Routes("e", (route,))) or "")


def test_a_reject_only_where_the_routes_say_so() -> None:
    v1 = Route("v1", (Match(PathMatch("segments", "/v1")),),
               (WeightedTarget(Target("api"), 1),), prefix_rewrite="/")
    gamma = Policy("web", routes=Routes("HTTPRoute default/web", (v1,), unmatched="reject"))
    consul = Policy("shop", routes=Routes("service-router/shop", (v1,)))
    empty = Policy("empty", routes=Routes("HTTPRoute default/empty", (), unmatched="reject"))
    sel = Selector({"web": gamma, "shop": consul, "empty": empty})
    target, route, rw = sel.route("web", b"GET", b"/v1/x", [])
    assert target == Target("api") and route is v1 and rw is not None
    assert rw.target(b"/v1/x") == b"/x"
    assert sel.route("web", b"GET", b"/v2", [])[1] is None
    assert sel.rejects("web") == "HTTPRoute default/web"
    assert sel.rejects("shop") is None   # Consul: the rest goes to the service itself
    assert sel.route("shop", b"GET", b"/v2", [])[0] == Target("shop")
    assert sel.rejects("empty") == "HTTPRoute default/empty"
    assert sel.route("empty", b"GET", b"/", [])[1] is None
    assert problem(Routes("e", (), unmatched="drop")) is not None  # type: ignore[arg-type]


def test_policies_round_trip_and_older_state_files_still_load() -> None:
    route = Route("r", (Match(PathMatch("segments", "/a")),), prefix_rewrite="/b",
                  request_headers=HeaderEdit(set=(("x-a", "1"),), add=(("x-b", "2"),),
                                             remove=("x-c",)),
                  response_headers=HeaderEdit(remove=("x-d",)), host_rewrite="h")
    p = Policy("web", routes=Routes("e", (route,), unmatched="reject"))
    assert unpack(pack(p)) == p
    assert problem(p.routes) is None  # type: ignore[arg-type]
    # a state file of the previous version: Route and Routes had fewer fields
    old = encode(Policy("web", routes=Routes("e", (Route("r"),))))
    old["f"][1]["f"] = old["f"][1]["f"][:2]
    old["f"][1]["f"][1][0]["f"] = old["f"][1]["f"][1][0]["f"][:10]
    assert decode(old) == Policy("web", routes=Routes("e", (Route("r"),)))
    old["f"][1]["f"].extend([1, 2, 3])
    with pytest.raises(ValueError):
        decode(old)


def _route(rules: list[dict[str, object]], kind: str = "HTTPRoute") -> dict[str, object]:
    return {"kind": kind, "metadata": {"namespace": "default", "name": "web"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": rules}}


def test_httproute_filters_and_gamma_reject_in_meshd_terms() -> None:
    parsed = parse("HTTPRoute", _route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [
             {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                 "set": [{"name": "X-Route", "value": "v1"}],
                 "add": [{"name": "x-added", "value": "a"}], "remove": ["x-drop"]}},
             {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                 "remove": ["x-backend"]}},
             {"type": "URLRewrite", "urlRewrite": {"hostname": "api.internal", "path": {
                 "type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
        {"matches": [{"path": {"type": "Exact", "value": "/x"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {
             "type": "ReplaceFullPath", "replaceFullPath": "/y"}}}]}]), lambda ns, n: n)
    routes = merge([parsed])
    assert routes is not None and routes.unmatched == "reject"
    assert problem(routes) is None
    by_name = {r.name: r for r in routes.routes}   # one match per rule here
    old = by_name["default/web#0"]
    assert old.prefix_rewrite == "/new" and old.host_rewrite == "api.internal"
    assert old.request_headers == HeaderEdit(set=(("X-Route", "v1"),), add=(("x-added", "a"),),
                                             remove=("x-drop",))
    assert old.response_headers == HeaderEdit(remove=("x-backend",))
    assert by_name["default/web#1"].full_path_rewrite == "/y"
    with pytest.raises(Invalid, match=r"filters\[0\]: filter 'URLRewrite' is not supported"):
        parse("GRPCRoute", _route([{"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}],
                                  "GRPCRoute"), lambda ns, n: n)


def test_consul_router_filters_in_meshd_terms() -> None:
    routes = router({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/api/"}},
         "Destination": {"PrefixRewrite": "/", "RequestHeaders": {
             "Set": {"X-Route": "v1"}, "Add": {"x-added": "a"}, "Remove": ["x-drop"]},
             "ResponseHeaders": {"Remove": ["x-backend"]}}}]}, "web")
    assert routes.unmatched == "default"   # Consul: the rest goes to the service itself
    (r,) = routes.routes
    assert r.prefix_rewrite == "/" and r.request_headers == HeaderEdit(
        set=(("X-Route", "v1"),), add=(("x-added", "a"),), remove=("x-drop",))
    assert r.response_headers == HeaderEdit(remove=("x-backend",))
    assert problem(routes) is None
    for dest, where in (
            ({"PrefixRewrite": "/x"}, "needs a Match.HTTP PathPrefix"),
            ({"RequestHeaders": {"Set": {"x-ip": "%DOWNSTREAM_REMOTE_ADDRESS%"}}},
             "placeholders"),
            ({"RequestHeaders": {"Set": {"Connection": "close"}}}, "does not let a route"),
            ({"RequestHeaders": {"Remove": [f"x-{i}" for i in range(17)]}}, "at most 16"),
            ({"RequestHeaders": {"Append": {"x": "y"}}}, "Append")):
        with pytest.raises(EntryError, match=where):
            router({"Kind": "service-router", "Name": "web",
                    "Routes": [{"Destination": dest}]}, "web")


# -- what passes the checks keeps every head valid -----------------------------------------------

_NAMES = st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}", fullmatch=True).filter(
    lambda n: not reserved(n))
_VALUES = st.from_regex(r"(?:[!-~](?:[ -~]{0,12}[!-~])?)?", fullmatch=True)
_PAIRS = st.lists(st.tuples(_NAMES, _VALUES), max_size=4).map(tuple)
_PATHS = st.from_regex(r"/(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9A-F]{2}){0,12}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(_PAIRS, _PAIRS, st.lists(_NAMES, max_size=4).map(tuple),
       st.one_of(st.none(), _PATHS), st.booleans(),
       st.one_of(st.none(), st.sampled_from(["api", "api.internal:8080", "[::1]:80"])))
def test_what_the_checks_accept_keeps_both_protocols_heads_valid(
        sets, adds, removes, path, prefix, host) -> None:
    route = Route("r", (Match(PathMatch("segments", "/a")),),
                  prefix_rewrite=path if prefix else None,
                  full_path_rewrite=None if prefix else path, host_rewrite=host,
                  request_headers=HeaderEdit(sets, adds, removes))
    assume(problem(Routes("e", (route,))) is None)
    rw = Rewrite.of(route, route.matches[0])
    assert rw is not None
    # an HTTP/2 client's head, to an HTTP/2 upstream and to an HTTP/1.1 one
    h2 = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a/b?c=d"),
          (b":authority", b"web"), (b"x-drop", b"1"), (b"user-agent", b"curl/8")]
    out = rw.h2(h2)
    assert request_problem(out, http1_rules=True) is None, out
    target, authority, fields = rw.h2_request(b"/a/b?c=d", b"web", h2[4:])
    head, _ = http1_request(b"GET", target, authority, fields, None, True)
    assert http1.parse_request_head(head).target == target
    # an HTTP/1.1 client's head, to an HTTP/1.1 upstream and to an HTTP/2 one
    req = http1.parse_request_head(b"GET /a/b?c=d HTTP/1.1\r\nHost: web\r\nX-Drop: 1\r\n\r\n")
    sent = rw.http1(req)
    again = http1.parse_request_head(http1.serialize_request_head(
        sent.method, sent.target, sent.headers, []))
    assert (again.target, again.host) == (sent.target, sent.host)
    assert request_problem(h2_request(sent, False, False), http1_rules=True) is None
