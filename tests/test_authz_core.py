"""meshd.authz: the policy rules (default deny, route scoping, audit) and the glob
semantics of allow-list patterns, without sockets."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.authz import (
    ALLOW,
    AuditDeny,
    Authorizer,
    DecisionCache,
    Deny,
    log_id,
    pattern_matches,
)
from meshd.config import RouteConfig
from meshd.config_identity import AuthorizationConfig
from meshd.identity import spiffe
from meshd.worker.peer import PLAINTEXT, Peer

WEB = Peer(tls=True, client_id="spiffe://cluster.local/ns/default/sa/web")
API = Peer(tls=True, client_id="spiffe://cluster.local/ns/default/sa/api")
ADMIN = Peer(tls=True, client_id="spiffe://cluster.local/ns/ops/sa/admin")
ANON_TLS = Peer(tls=True, client_id="")


def pol(listener: str, *allow: str, route: str | None = None,
        mode: str = "enforce") -> AuthorizationConfig:
    return AuthorizationConfig(listener=listener, allow=tuple(allow), route=route, mode=mode)


# -- glob semantics -----------------------------------------------------------------------

SEG = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))
DOMAIN = st.text(alphabet="abc019.-_", min_size=1, max_size=8)


@st.composite
def spiffe_ids(draw: st.DrawFn) -> str:
    segments = draw(st.lists(SEG, min_size=1, max_size=5))
    return f"spiffe://{draw(DOMAIN)}/" + "/".join(segments)


@given(spiffe_ids())
def test_an_id_matches_itself_as_a_pattern(sid: str) -> None:
    assert spiffe.problem(sid) is None
    assert pattern_matches(sid, sid)


@given(spiffe_ids(), st.data())
def test_star_for_a_whole_segment_matches_any_value_of_it(sid: str, data: st.DataObject) -> None:
    domain, path = sid[len("spiffe://"):].split("/", 1)
    segments = path.split("/")
    i = data.draw(st.integers(0, len(segments) - 1))
    pattern = f"spiffe://{domain}/" + "/".join("*" if j == i else s
                                                for j, s in enumerate(segments))
    assert pattern_matches(pattern, sid)
    other = list(segments)
    other[i] = data.draw(SEG)
    assert pattern_matches(pattern, f"spiffe://{domain}/" + "/".join(other))


@given(spiffe_ids(), SEG)
def test_star_never_crosses_a_slash(sid: str, extra: str) -> None:
    domain, path = sid[len("spiffe://"):].split("/", 1)
    segments = path.split("/")
    pattern = f"spiffe://{domain}/" + "/".join([*segments[:-1], "*"])
    assert pattern_matches(pattern, sid)
    # one more segment under the starred one: "*" would have to match "x/extra"
    assert not pattern_matches(pattern, f"{sid}/{extra}")
    # nor can it eat the separator before it
    if len(segments) > 1:
        assert not pattern_matches(f"spiffe://{domain}/*", sid)


@given(spiffe_ids(), spiffe_ids())
def test_no_stars_means_exact_equality(a: str, b: str) -> None:
    assert pattern_matches(a, b) == (a == b)


@given(spiffe_ids(), st.sampled_from(["", "/x", "x", "?q", "#f", ":1"]))
def test_a_pattern_matches_the_whole_id(sid: str, tail: str) -> None:
    if tail:
        assert not pattern_matches(sid, sid + tail)
        assert not pattern_matches(sid + tail, sid)


@given(spiffe_ids(), st.integers(0, 3), st.integers(0, 3))
def test_star_inside_a_segment_is_a_prefix_suffix_match(sid: str, pre: int, suf: int) -> None:
    domain, path = sid[len("spiffe://"):].split("/", 1)
    segments = path.split("/")
    last = segments[-1]
    if pre + suf > len(last):
        return
    glob = last[:pre] + "*" + last[len(last) - suf:]
    pattern = f"spiffe://{domain}/" + "/".join([*segments[:-1], glob])
    assert spiffe.pattern_problem(pattern) is None
    assert pattern_matches(pattern, sid)
    expected = re.fullmatch(re.escape(last[:pre]) + "[A-Za-z0-9._-]*"
                            + re.escape(last[len(last) - suf:]), "zz" + last) is not None
    moved = f"spiffe://{domain}/" + "/".join([*segments[:-1], "zz" + last])
    assert pattern_matches(pattern, moved) == expected


@given(st.lists(spiffe_ids(), min_size=1, max_size=4), spiffe_ids())
def test_a_list_allows_what_one_of_its_patterns_allows(patterns: list[str], sid: str) -> None:
    together = Authorizer([pol("in", *patterns)]).decide("in", None, Peer(True, sid))
    alone = any(pattern_matches(p, sid) for p in patterns)
    assert (together == ALLOW) == alone


def test_the_empty_identity_matches_nothing() -> None:
    assert not pattern_matches("spiffe://cluster.local/*", "")
    a = Authorizer([pol("in", "spiffe://cluster.local/ns/*/sa/*")])
    assert isinstance(a.decide("in", None, PLAINTEXT), Deny)
    assert isinstance(a.decide("in", None, ANON_TLS), Deny)
    assert "no verified client identity" in a.decide("in", None, ANON_TLS).reason  # type: ignore[union-attr]


# -- rules --------------------------------------------------------------------------------

def test_a_listener_no_policy_names_is_open() -> None:
    a = Authorizer([pol("in", WEB.client_id)])
    assert not a.governs("other")
    assert a.decide("other", None, PLAINTEXT) is ALLOW
    assert a.decide("other", "r", ADMIN) is ALLOW


def test_default_deny_once_a_policy_names_the_listener() -> None:
    a = Authorizer([pol("in", WEB.client_id)])
    assert a.governs("in")
    assert a.decide("in", None, WEB) is ALLOW
    d = a.decide("in", None, API)
    assert isinstance(d, Deny) and "authorization[0]" in d.reason


def test_glob_in_policy() -> None:
    a = Authorizer([pol("in", "spiffe://cluster.local/ns/default/sa/*")])
    assert a.decide("in", None, WEB) is ALLOW
    assert a.decide("in", None, API) is ALLOW
    assert isinstance(a.decide("in", None, ADMIN), Deny)


def test_several_listener_policies_add_up() -> None:
    a = Authorizer([pol("in", WEB.client_id), pol("in", ADMIN.client_id)])
    assert a.decide("in", None, WEB) is ALLOW
    assert a.decide("in", None, ADMIN) is ALLOW
    assert isinstance(a.decide("in", None, API), Deny)


def test_route_policies_replace_the_listener_ones_for_their_requests() -> None:
    a = Authorizer([pol("in", WEB.client_id, API.client_id),
                    pol("in", ADMIN.client_id, route="admin")])
    # requests of route "admin": only its policy judges them
    assert a.decide("in", "admin", ADMIN) is ALLOW
    assert isinstance(a.decide("in", "admin", WEB), Deny)
    # the rest falls to the listener's policies without route
    assert a.decide("in", None, WEB) is ALLOW
    assert isinstance(a.decide("in", None, ADMIN), Deny)
    # a route no policy names is judged like no route
    assert a.decide("in", "other", API) is ALLOW


def test_only_route_policies_deny_requests_of_no_route() -> None:
    a = Authorizer([pol("in", WEB.client_id, route="api")])
    assert a.decide("in", "api", WEB) is ALLOW
    d = a.decide("in", None, WEB)
    assert isinstance(d, Deny) and "default deny" in d.reason
    assert isinstance(a.decide("in", "other", WEB), Deny)


def test_audit_never_denies_and_reports_what_enforce_would() -> None:
    a = Authorizer([pol("in", WEB.client_id, mode="audit")])
    assert a.decide("in", None, WEB) is ALLOW
    d = a.decide("in", None, API)
    assert isinstance(d, AuditDeny) and "allow list" in d.reason


def test_audit_never_opens_what_enforce_closes() -> None:
    a = Authorizer([pol("in", WEB.client_id), pol("in", API.client_id, mode="audit")])
    assert isinstance(a.decide("in", None, API), Deny)
    assert a.decide("in", None, WEB) is ALLOW


def test_audit_route_policy_under_an_enforced_listener() -> None:
    # trying out a narrower rule for one route while the listener's stays enforced
    a = Authorizer([pol("in", WEB.client_id, API.client_id),
                    pol("in", WEB.client_id, route="admin", mode="audit")])
    assert a.decide("in", "admin", WEB) is ALLOW
    assert isinstance(a.decide("in", "admin", API), AuditDeny)   # enforced: allowed
    assert isinstance(a.decide("in", "admin", ADMIN), Deny)      # enforced: refused
    assert a.decide("in", None, API) is ALLOW


def test_audit_only_route_policies_audit_the_default_deny() -> None:
    a = Authorizer([pol("in", WEB.client_id, route="api", mode="audit")])
    d = a.decide("in", None, WEB)
    assert isinstance(d, AuditDeny) and "default deny" in d.reason


def route(name: str, **kw: object) -> RouteConfig:
    return RouteConfig(name=name, host="svc", **kw)  # type: ignore[arg-type]


def test_route_for_matches_the_named_routes_in_file_order() -> None:
    routes = [route("unnamed", path_prefix="/"),
              route("admin", path_prefix="/admin", methods=frozenset({"POST"})),
              route("api", path_prefix="/api"),
              route("hdr", headers=(("x-debug", "1"),)),
              route("other-listener", listener="out", path_prefix="/")]
    a = Authorizer([pol("in", WEB.client_id, route="admin"), pol("in", WEB.client_id, route="api"),
                    pol("in", WEB.client_id, route="hdr")], routes)
    assert a.scoped("in")
    # "unnamed" matches everything but no policy names it: not a scope
    assert a.route_for("in", b"POST", b"/admin/x?y=1", []) == "admin"
    assert a.route_for("in", b"GET", b"/admin/x", []) is None
    assert a.route_for("in", b"GET", b"/api?x", []) == "api"
    assert a.route_for("in", b"GET", b"/x?/api", []) is None  # the query is not the path
    assert a.route_for("in", b"GET", b"/x", [(b"X-Debug", b"1")]) == "hdr"
    assert a.route_for("other", b"GET", b"/api", []) is None
    assert not Authorizer([pol("in", WEB.client_id)], routes).scoped("in")


def test_route_for_honours_the_routes_listener() -> None:
    a = Authorizer([pol("in", WEB.client_id, route="r")],
                   [route("r", listener="in2", path_prefix="/")])
    assert a.route_for("in", b"GET", b"/", []) is None


def test_log_id_is_bounded() -> None:
    long = "spiffe://cluster.local/" + "a" * 3000
    assert len(log_id(long)) <= 260
    assert log_id("") == "-"
    assert log_id(WEB.client_id) == WEB.client_id


# -- provider answers cache ---------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_keeps_answers_for_their_ttl() -> None:
    clock = Clock()
    c = DecisionCache(size=4, ttl=10.0, error_ttl=1.0, clock=clock)
    assert c.get("a") == (False, None)
    c.put("a", True)
    c.put("b", False)
    c.put("e", None)
    assert c.get("a") == (True, True)
    assert c.get("b") == (True, False)
    assert c.get("e") == (True, None)
    clock.now += 1.0
    assert c.get("e") == (False, None)   # errors are asked again after 1 s
    assert c.get("b") == (True, False)
    clock.now += 9.0
    assert c.get("a") == (False, None)
    assert c.get("b") == (False, None)


def test_cache_is_bounded_least_recently_used_first() -> None:
    c = DecisionCache(size=3, clock=Clock())
    for k in "abc":
        c.put(k, True)
    c.get("a")
    c.put("d", True)
    assert len(c) == 3
    assert c.get("b") == (False, None)
    assert c.get("a") == (True, True)


@given(st.lists(st.text(max_size=3), max_size=200))
def test_cache_never_exceeds_its_size(keys: list[str]) -> None:
    c = DecisionCache(size=8, clock=Clock())
    for k in keys:
        c.put(k, bool(len(k) % 2))
        assert len(c) <= 8


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_config_roundtrip(mode: str) -> None:
    import tomllib

    from meshd.config import parse
    toml = f"""
[identity]
provider = "files"
[[listener]]
name = "in"
direction = "inbound"
listen = "127.0.0.1:1"
forward = "127.0.0.1:2"
mtls = "permissive"
[[route]]
name = "admin"
host = "web"
path_prefix = "/admin"
[[authorization]]
listener = "in"
route = "admin"
allow = ["spiffe://cluster.local/ns/ops/sa/*"]
mode = "{mode}"
"""
    cfg = parse(tomllib.loads(toml))
    a = Authorizer(cfg.authorization, cfg.routes)
    assert a.route_for("in", b"GET", b"/admin", []) == "admin"
    d = a.decide("in", "admin", WEB)
    assert isinstance(d, Deny if mode == "enforce" else AuditDeny)
    assert a.decide("in", "admin", ADMIN) is ALLOW
