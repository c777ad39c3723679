"""Authorization from Kubernetes, below a real meshd: the translation of Istio
AuthorizationPolicies (``meshd_kubernetes.authz``: the subset, every refusal naming its
field, last good versions, fail-closed refusals), the fleet ``Authorization`` part's wire
checks and its decisions (``meshd.authz.FleetAuthorizer``: default deny, route scoping by
the fleet match model, canonical paths only, dry run), hypothesis properties of both, and
the config source's third informer kind against the Kubernetes test server (list+watch
in the Service's namespace, namespace-wide policies, bookmarks, 410 re-list)."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from meshd_kubernetes import authz
from meshd_kubernetes.config_source import KubernetesConfigSource

from meshd.authz import ALLOW, AuditDeny, Deny, FleetAuthorizer, canonical
from meshd.fleet import wire
from meshd.fleet.api import Authorization, Clear, Refused, Set, Update
from meshd.testing.k8s_server import authorization_policy

TD = "cluster.local"
FRONTEND = f"spiffe://{TD}/ns/default/sa/frontend"
BILLING = f"spiffe://{TD}/ns/default/sa/billing"


def policy(name: str = "p", service: str | None = "web", rules: Any = None,
           **kwargs: Any) -> dict[str, Any]:
    if rules is None:
        rules = [{"from": [{"source": {"principals": [FRONTEND.removeprefix("spiffe://")]}}]}]
    obj = authorization_policy(name, service, rules, **kwargs)
    obj["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    return obj


def part_of(*objs: dict[str, Any], service: str = "web") -> tuple[Authorization | None, list]:
    table = authz.ServiceAuthz("default", service)
    table.reset(authz.KIND, "default", objs)
    return table.part()


def decide(part: Authorization | None, client_id: str, method: bytes = b"GET",
           target: bytes | None = b"/", headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    assert part is not None and wire.problem(part) is None, wire.problem(part)  # type: ignore[arg-type]
    request = None if target is None else (method, target, headers or [])
    return FleetAuthorizer(part).decide(client_id, request)


# -- translation --------------------------------------------------------------------------------

def test_principals_and_namespaces_allow_those_identities_only():
    part, refused = part_of(policy(rules=[
        {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/frontend"]}},
                  {"source": {"namespaces": ["ops"]}}]},
        {"from": [{"source": {"principals": ["cluster.local/ns/batch/sa/*"]}}]}]))
    assert refused == []
    assert part is not None and part.entry == "AuthorizationPolicy default/p"
    assert part.enforced and not part.audited
    assert decide(part, FRONTEND) is ALLOW
    assert decide(part, "spiffe://cluster.local/ns/ops/sa/anyone") is ALLOW
    assert decide(part, "spiffe://cluster.local/ns/batch/sa/job") is ALLOW
    assert isinstance(decide(part, BILLING), Deny)
    assert isinstance(decide(part, "spiffe://cluster.local/ns/batch/sa/job/x"), Deny)
    assert isinstance(decide(part, ""), Deny)   # no verified identity
    assert decide(part, FRONTEND, target=None) is ALLOW   # opaque TCP: a rule without "to"


def test_no_from_is_any_peer_and_star_is_any_verified_identity():
    anyone, _ = part_of(policy(rules=[{}]))
    assert decide(anyone, "") is ALLOW and decide(anyone, BILLING) is ALLOW
    verified, _ = part_of(policy(rules=[{"from": [{"source": {"principals": ["*"]}}]}]))
    assert decide(verified, BILLING) is ALLOW
    assert isinstance(decide(verified, ""), Deny)


def test_a_policy_without_rules_allows_nothing_and_policies_add_up():
    nothing, _ = part_of(policy("none", rules=None) | {"spec": {"targetRefs": [
        {"group": "", "kind": "Service", "name": "web"}]}})
    assert nothing is not None and nothing.rules == ()
    assert isinstance(decide(nothing, FRONTEND), Deny)
    both, _ = part_of(nothing and policy("none", rules=[]), policy("front"))
    assert decide(both, FRONTEND) is ALLOW and isinstance(decide(both, BILLING), Deny)


def test_operations_scope_rules_by_path_and_method_on_canonical_paths_only():
    part, _ = part_of(policy(rules=[{
        "from": [{"source": {"principals": [FRONTEND.removeprefix("spiffe://")]}}],
        "to": [{"operation": {"paths": ["/public/*", "/health", "*.css"],
                              "methods": ["GET", "HEAD"]}}]}]))
    assert decide(part, FRONTEND, b"GET", b"/public/a?x=1") is ALLOW
    assert decide(part, FRONTEND, b"HEAD", b"/health") is ALLOW
    assert decide(part, FRONTEND, b"GET", b"/assets/site.css") is ALLOW
    for method, target in ((b"POST", b"/public/a"), (b"GET", b"/healthz"), (b"GET", b"/admin"),
                           (b"GET", b"/public/../admin"), (b"GET", b"/public/%2e%2e/admin"),
                           (b"GET", b"/public/%2F..%2Fadmin"), (b"GET", b"/public//x"),
                           (b"GET", b"/public/..;/admin"), (b"GET", b"/public\\..\\admin"),
                           (b"GET", b"http://web/public/a")):
        assert isinstance(decide(part, FRONTEND, method, target), Deny), target
    assert isinstance(decide(part, FRONTEND, target=None), Deny)   # no request: not covered


def test_dry_run_annotation_is_audit_mode():
    dry, _ = part_of(policy(dry_run=True))
    assert dry is not None and not dry.enforced and dry.audited
    assert decide(dry, FRONTEND) is ALLOW
    assert isinstance(decide(dry, BILLING), AuditDeny)   # let through, logged and counted
    # ALLOW policies add up, dry-run ones included: beside an enforced policy allowing
    # everyone, a dry-run one can deny nothing
    mixed, _ = part_of(policy("real", rules=[{}]), policy("dry", dry_run=True))
    assert decide(mixed, BILLING) is ALLOW and decide(mixed, FRONTEND) is ALLOW
    scoped, _ = part_of(policy("real", rules=[{"to": [{"operation": {"paths": ["/a"]}}]}]),
                        policy("dry", rules=[{"to": [{"operation": {"methods": ["GET"]}}]}],
                               dry_run=True))
    assert decide(scoped, BILLING, b"GET", b"/b") == Deny(decide(scoped, BILLING, b"GET",
                                                                  b"/b").reason)
    assert decide(scoped, BILLING, b"POST", b"/a") is ALLOW
    closed, _ = part_of(policy("real"), policy("dry", rules=[{}], dry_run=True))
    assert isinstance(decide(closed, BILLING), Deny)   # audit never opens what enforce shuts


def _with(path: str, value: Any) -> dict[str, Any]:
    """A valid policy with one field set (a dotted path; [i] indexes lists)."""
    obj = policy(rules=[{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"]}}],
                         "to": [{"operation": {"paths": ["/x"]}}]}])
    node: Any = obj
    keys = path.replace("[", ".").replace("]", "").split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[keys[-1]] = value
    return obj


@pytest.mark.parametrize(("path", "value", "field"), [
    ("spec.action", "DENY", "spec.action"),
    ("spec.action", "AUDIT", "spec.action"),
    ("spec.action", "CUSTOM", "spec.action"),
    ("spec.provider", {"name": "x"}, "spec.provider"),
    ("spec.rules[0].when", [{"key": "request.headers[x]", "values": ["y"]}],
     "spec.rules[0].when"),
    ("spec.rules[0].from[0].source.notPrincipals", ["a/b"],
     "spec.rules[0].from[0].source.notPrincipals"),
    ("spec.rules[0].from[0].source.ipBlocks", ["10.0.0.0/8"],
     "spec.rules[0].from[0].source.ipBlocks"),
    ("spec.rules[0].from[0].source.requestPrincipals", ["*"],
     "spec.rules[0].from[0].source.requestPrincipals"),
    ("spec.rules[0].from[0].source.namespaces", ["a"], "spec.rules[0].from[0].source"),
    ("spec.rules[0].from[0].source.principals", ["cluster.local/ns/*/sa/x"],
     "spec.rules[0].from[0].source.principals[0]"),
    ("spec.rules[0].from[0].source.principals", ["cluster.local/ns/a/sa/web-*"],
     "spec.rules[0].from[0].source.principals[0]"),
    ("spec.rules[0].from[0].source.principals", ["Not A Principal"],
     "spec.rules[0].from[0].source.principals[0]"),
    ("spec.rules[0].from", [], "spec.rules[0].from"),
    ("spec.rules[0].to[0].operation.hosts", ["web"], "spec.rules[0].to[0].operation.hosts"),
    ("spec.rules[0].to[0].operation.ports", ["80"], "spec.rules[0].to[0].operation.ports"),
    ("spec.rules[0].to[0].operation.notPaths", ["/x"],
     "spec.rules[0].to[0].operation.notPaths"),
    ("spec.rules[0].to[0].operation.paths", ["/a*b"], "spec.rules[0].to[0].operation.paths[0]"),
    ("spec.rules[0].to[0].operation.methods", ["get"],
     "spec.rules[0].to[0].operation.methods[0]"),
    ("spec.rules", [{}] * 65, "spec.rules"),
    ("spec.targetRefs", [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                          "name": "gw"}, {"group": "", "kind": "Service", "name": "web",
                                          "namespace": "shop"}],
     "spec.targetRefs[1].namespace"),
    ("metadata.annotations", {"istio.io/dry-run": "yes"}, "metadata.annotations.istio.io/dry-run"),
])
def test_everything_outside_the_subset_is_refused_with_its_field(path, value, field):
    with pytest.raises(authz.Invalid) as e:
        authz.parse(_with(path, value))
    assert str(e.value).startswith(field), str(e.value)


def test_edited_into_invalid_keeps_the_last_good_version_and_a_new_invalid_one_closes():
    table = authz.ServiceAuthz("default", "web")
    table.reset(authz.KIND, "default", [policy("p")])
    first = table.updates()
    assert [type(u) for u in first] == [Set]
    table.put(authz.KIND, _with("spec.rules[0].from[0].source.notPrincipals", ["x/y"])
              | {"metadata": policy("p")["metadata"]})
    updates = table.updates()
    assert updates == [Refused("authz", "AuthorizationPolicy default/p", updates[0].reason)]
    assert updates[0].reason.startswith("spec.rules[0].from[0].source.notPrincipals")
    # a new DENY policy has no good version: every request is denied until it is fixed
    table.put(authz.KIND, policy("deny", rules=[{}], action="DENY"))
    set_, refused = table.updates()
    assert isinstance(set_, Set) and isinstance(set_.part, Authorization)
    assert set_.part.rules == () and "default/deny" in set_.part.entry
    assert isinstance(decide(set_.part, FRONTEND), Deny)
    assert isinstance(refused, Refused) and "more refused policies" in refused.reason
    table.delete(authz.KIND, "default", "deny")
    table.put(authz.KIND, policy("p"))
    assert [type(u) for u in table.updates()] == [Set]   # the refusal cleared
    # A refused dry-run policy has no effect, neither has a selector one.
    table.put(authz.KIND, policy("dry", rules=[{}], action="DENY", dry_run=True))
    sel = policy("sel", service=None)
    sel["spec"]["selector"] = {"matchLabels": {"app": "web"}}
    table.put(authz.KIND, sel)
    part, refused_now = table.part()
    assert part is not None and part.entry == "AuthorizationPolicy default/p"
    assert [e for e, _ in refused_now] == ["AuthorizationPolicy default/dry",
                                           "AuthorizationPolicy default/sel"]


def test_which_policies_apply_to_a_service():
    other = policy("other", service="api")
    wide = policy("wide", service=None)             # Istio: every workload of the namespace
    elsewhere = policy("elsewhere") | {"metadata": {"name": "elsewhere", "namespace": "shop"}}
    part, _ = part_of(other, wide, elsewhere)
    assert part is not None and part.entry == "AuthorizationPolicy default/wide"
    assert authz.targets(other) == {("default", "api")}
    assert authz.targets(wide) == {("default", authz.NAMESPACE_WIDE)}


# -- properties ------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from([
                         "from", "to", "source", "operation", "principals", "namespaces",
                         "paths", "methods", "when", "rules", "action", "targetRefs",
                         "selector", "name", "kind", "group", "notPaths"]) | st.text(max_size=5),
                         inner, max_size=4), max_leaves=20)
_principal = st.sampled_from(["*", "cluster.local/ns/a/sa/*", "cluster.local/ns/a/sa/b",
                              "td/x", "", "a*b", "cluster.local/ns/../sa/x"])
_path = st.sampled_from(["*", "/a/*", "/a", "*.css", "a", "/a*b", "/", ""])


@settings(max_examples=300, deadline=None)
@given(spec=st.dictionaries(st.sampled_from(["rules", "action", "targetRefs", "selector",
                                             "when"]), _json, max_size=4),
       rules=st.lists(st.fixed_dictionaries({}, optional={
           "from": st.lists(st.fixed_dictionaries({"source": st.fixed_dictionaries({}, optional={
               "principals": st.lists(_principal, max_size=3),
               "namespaces": st.lists(st.sampled_from(["ops", "a-b", "*", "Bad"]),
                                      max_size=2)})}), max_size=2),
           "to": st.lists(st.fixed_dictionaries({"operation": st.fixed_dictionaries({}, optional={
               "paths": st.lists(_path, max_size=3),
               "methods": st.lists(st.sampled_from(["GET", "post", "PUT"]), max_size=2)})}),
               max_size=2)}), max_size=3))
def test_any_object_is_either_refused_by_field_or_a_part_meshd_accepts(spec, rules):
    for body in (spec, {"rules": rules}):
        obj = {"apiVersion": authz.GROUP_VERSION, "kind": authz.KIND,
               "metadata": {"name": "p", "namespace": "default"}, "spec": body}
        try:
            parsed = authz.parse(obj)
        except authz.Invalid as e:
            assert str(e).startswith(("spec", "metadata")), str(e)
            continue
        part = authz.merge([parsed])
        assert part is not None and wire.problem(part) is None, wire.problem(part)  # type: ignore[arg-type]
        policy_ = wire.Policy("web", authz=part)
        assert wire.unpack(wire.pack(policy_)) == policy_
        FleetAuthorizer(part).decide(FRONTEND, (b"GET", b"/a/b", []))


@settings(max_examples=200, deadline=None)
@given(allowed=st.sets(st.sampled_from(["a", "b", "c", "d"]), max_size=4),
       caller=st.sampled_from(["a", "b", "c", "d", "e"]))
def test_exact_principals_allow_exactly_those_callers(allowed, caller):
    rules = [{"from": [{"source": {"principals": [f"cluster.local/ns/x/sa/{n}"
                                                  for n in sorted(allowed)]}}]}] if allowed else []
    part, _ = part_of(policy(rules=rules))
    got = decide(part, f"spiffe://cluster.local/ns/x/sa/{caller}")
    assert (got is ALLOW) == (caller in allowed)


@settings(deadline=None)
@given(st.lists(st.sampled_from(["a", ".", "..", "", "%2e", "%2F", "b;c", "x%41"]),
                min_size=1, max_size=5))
def test_a_path_with_dot_empty_or_encoded_separator_segments_is_not_canonical(segments):
    path = ("/" + "/".join(segments)).encode()
    odd = any(s in (".", "..", "%2e", "%2F", "b;c") for s in segments) or "" in segments[:-1]
    assert canonical(path) == (not odd)


# -- the config source's third kind, against the test server ----------------------------------

class Recorder:
    """A config source's authorization watch of one service, in a thread."""

    def __init__(self, source: KubernetesConfigSource, service: str) -> None:
        self.updates: list[Update] = []
        self.part: Authorization | None = None
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._gen = source.watch_authorization(service)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for u in self._gen:
                with self._cond:
                    self.updates.append(u)
                    if isinstance(u, Set):
                        assert isinstance(u.part, Authorization)
                        self.part = u.part
                    elif isinstance(u, Clear):
                        self.part = None
                    self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def wait_for(self, cond: Callable[[Recorder], bool], timeout: float = 15.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: cond(self) or self.error is not None, timeout):
                raise TimeoutError(f"not reached; updates: {self.updates[-3:]}")
            assert self.error is None, repr(self.error)


@pytest.fixture
def source(api, tmp_path):
    token = tmp_path / "token"
    token.write_text("test-token\n")
    made: list[KubernetesConfigSource] = []

    def make(**options: Any) -> KubernetesConfigSource:
        made.append(KubernetesConfigSource("k8s", {
            "api_server": api.url, "token_file": str(token), "ca_file": api.ca_file,
            "namespace": "default", "timeout": "2s", **options}))
        return made[-1]
    yield make
    for s in made:
        s.close()


def peers(rec: Recorder) -> set[str]:
    return {p for r in (rec.part.rules if rec.part else ()) for p in r.peers or ()}


def test_policies_follow_apply_edit_delete_one_watch_per_namespace_and_410(api, source):
    src = source()
    web, other = Recorder(src, "web"), Recorder(src, "api")
    web.wait_for(lambda r: r.updates == [Clear("authz")])
    other.wait_for(lambda r: r.updates == [Clear("authz")])
    api.wait_watches(1, timeout=15)   # authorizationpolicies of ns default, shared by both
    assert api.open_watches() == 1
    api.apply(policy("p"))
    web.wait_for(lambda r: peers(r) == {FRONTEND})
    api.apply(policy("p", rules=[{"from": [{"source": {"principals": [
        BILLING.removeprefix("spiffe://")]}}]}]))
    web.wait_for(lambda r: peers(r) == {BILLING})
    api.apply(policy("wide", service=None, rules=[]))   # a namespace-wide one: both
    other.wait_for(lambda r: r.part is not None and r.part.entry.endswith("default/wide"))
    api.send_bookmark()
    api.expire_history()
    api.drop_watches()   # the re-watch from the old resourceVersion gets 410: listed again
    api.wait_requests(2, watch=False, resource="authorizationpolicies", timeout=15)
    api.delete("authorizationpolicies", "wide")   # seen by the new watch (or the list)
    other.wait_for(lambda r: isinstance(r.updates[-1], Clear))
    assert peers(web) == {BILLING} and web.error is None
    api.delete("authorizationpolicies", "p")
    web.wait_for(lambda r: isinstance(r.updates[-1], Clear))
    # The authorization watch reads policies only (routes are the routing watch's).
    assert not api.slice_requests(resource="httproutes")


def test_the_kind_can_be_left_out_and_is_checked():
    with pytest.raises(Exception) as e:
        KubernetesConfigSource("k8s", {"api_server": "https://127.0.0.1:1",
                                       "kinds": ["AuthorizationPolicies"]})
    assert "kinds" in str(getattr(e.value, "problems", e.value))
    src = KubernetesConfigSource("k8s", {"api_server": "https://127.0.0.1:1", "token_file": "/x",
                                         "kinds": ["HTTPRoute"]})
    assert next(src.watch_authorization("web")) == Clear("authz")   # nothing asked
    src.close()


def test_shipped_rbac_grants_what_the_authorization_watch_reads():
    docs = list(yaml.safe_load_all((Path(__file__).parent.parent /
                                    "deploy/kubernetes/rbac-authorization-policies.yaml")
                                   .read_text()))
    assert [d["kind"] for d in docs] == ["ClusterRole", "ClusterRoleBinding"]
    granted = {(g, r, v) for rule in docs[0]["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("security.istio.io", authz.RESOURCE, v) for v in ("get", "list", "watch")}
    assert docs[1]["roleRef"]["name"] == docs[0]["metadata"]["name"]


def test_wire_checks_the_bounds_of_an_authorization_part():
    from meshd.fleet.api import MAX_AUTHZ_RULES, AuthzRule, Match, PathMatch
    ok = Authorization("e", (AuthzRule("r", ("*", FRONTEND), (Match(PathMatch("prefix", "/a")),)),))
    assert wire.problem(ok) is None
    assert wire.decode(wire.encode(ok)) == ok
    many = Authorization("e", (AuthzRule("r"),) * (MAX_AUTHZ_RULES + 1))
    assert wire.problem(many) == f"rules: {MAX_AUTHZ_RULES + 1} given, meshd takes at most " \
                                 f"{MAX_AUTHZ_RULES}"
    bad_peer = Authorization("e", (AuthzRule("r", ("spiffe://td/../x",)),))
    assert (wire.problem(bad_peer) or "").startswith("rules[0].peers[0]: ")
    bad_path = Authorization("e", (AuthzRule("r", None, (Match(PathMatch("regex", "(")),)),))
    assert (wire.problem(bad_path) or "").startswith("rules[0].matches[0].path: invalid regex")


def test_server_serves_the_security_group_like_the_api_server(api):
    s = requests.Session()
    s.headers["Authorization"] = "Bearer test-token"
    s.request = functools.partial(s.request, verify=api.ca_file)  # type: ignore[method-assign]
    url = api.url + f"/apis/{authz.GROUP_VERSION}/namespaces/default/{authz.RESOURCE}"
    r = s.post(url, json=policy("p"))
    assert r.status_code == 201, r.text
    rv = r.json()["metadata"]["resourceVersion"]
    assert s.post(url, json=policy("p")).json()["reason"] == "AlreadyExists"
    assert "authorizationpolicies.security.istio.io" in s.post(url, json=policy("p")).json()[
        "message"]
    lst = s.get(url).json()
    assert lst["kind"] == "AuthorizationPolicyList" and lst["items"][0]["kind"] == authz.KIND
    stale = policy("p")
    stale["metadata"]["resourceVersion"] = "1"
    assert s.put(url + "/p", json=stale).status_code == 409
    r = s.patch(url + "/p", json={"spec": {"action": "ALLOW"}},
                headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200 and r.json()["metadata"]["generation"] == 2
    assert r.json()["spec"]["rules"] == policy("p")["spec"]["rules"]   # merged
    w = s.get(url, params={"watch": "1", "resourceVersion": rv, "timeoutSeconds": "1",
                           "allowWatchBookmarks": "true"})
    assert [e["type"] for e in map(json.loads, w.text.splitlines())
            if e["type"] != "BOOKMARK"] == ["MODIFIED"]
    assert s.delete(url + "/p").status_code == 200
    assert s.delete(url + "/p").status_code == 404
