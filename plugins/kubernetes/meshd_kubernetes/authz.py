"""From Istio ``AuthorizationPolicy`` objects (``security.istio.io/v1``) to meshd's fleet
``Authorization`` of one Service: the sans-IO core of the kubernetes config source's
authorization (no sockets here).

Why this resource: it is one object, widely installed with its CRD, and its principals
*are* SPIFFE IDs without the scheme (``cluster.local/ns/default/sa/web``), which is what
meshd's allow lists hold. (Linkerd's needs three kinds -- ``Server``,
``AuthorizationPolicy``, ``MeshTLSAuthentication`` -- and a mapping from its own
identity names.)

A strict subset is read; anything else is refused with the field path, never
approximated:

- which policies apply to a Service: those whose ``targetRefs`` (or the older
  ``targetRef``) name it (``group`` "" or "core", ``kind`` Service, no other namespace),
  and those with neither ``targetRefs`` nor ``selector``, which Istio applies to every
  workload of their namespace (targetRefs to Gateways are someone else's: ignored). A ``selector`` policy is refused, for every Service of its
  namespace (meshd cannot tell which pods its labels pick; use ``targetRefs``), and has
  no effect;
- ``action``: ``ALLOW`` (the default) only. ``DENY``, ``AUDIT`` (Istio's: mark for audit
  logging, not a dry run) and ``CUSTOM`` (``provider``) are refused;
- the annotation ``istio.io/dry-run: "true"`` is Istio's dry run: meshd's ``mode =
  "audit"`` (judged, logged and counted, never enforced);
- ``rules[].from[].source``: ``principals`` (``*`` alone: any verified identity; as a
  whole last segment: ``td/ns/NS/sa/*``; elsewhere refused, since Istio's prefix match is
  wider than meshd's one-segment glob) or ``namespaces`` (exact names: any identity
  ``spiffe://*/ns/NAME/sa/*``), not both in one source (Istio ANDs them). Several
  ``from`` entries: any of them. No ``from``: any peer, with or without an identity;
- ``rules[].to[].operation``: ``paths`` (exact, ``prefix*``, ``*suffix``, ``*``) and
  ``methods``; both given: both must hold. No ``to``: every request, and opaque TCP;
- refused everywhere: ``when``, ``notPrincipals``, ``notNamespaces``, ``ipBlocks``,
  ``remoteIpBlocks``, ``requestPrincipals``, ``serviceAccounts``, ``hosts``, ``ports``,
  ``notPaths``, ``notMethods`` (and their ``not`` forms).

Semantics (Istio's for ALLOW): no policy, the Service is open; otherwise a request is
allowed when some rule of some policy covers it (``meshd.fleet.api.Authorization``).
An enforced policy without rules allows nothing.

``ServiceAuthz`` keeps each policy at its last good version: one edited into something
meshd refuses keeps serving as it was. A policy refused with no good version (a new
``DENY`` policy, say) closes the Service: every request is denied until it is fixed or
deleted. (Ignoring it could leave open what it was written to shut -- a DENY policy
subtracts from what the others allow -- and meshd cannot know how much: it fails
closed.) A dry-run policy refused, or a selector policy, has no effect.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshd.fleet.api import (
    ANY_IDENTITY,
    MAX_AUTHZ_MATCHES,
    MAX_AUTHZ_PEERS,
    MAX_AUTHZ_RULES,
    Authorization,
    AuthzRule,
    Match,
    PathMatch,
    Update,
)
from meshd.identity import spiffe
from meshd_kubernetes.objects import (
    MAX_ITEMS,
    Invalid,
    as_list,
    as_map,
    object_name,
    timestamp,
)
from meshd_kubernetes.reports import PartReporter

KIND = "AuthorizationPolicy"
GROUP_VERSION = "security.istio.io/v1"
RESOURCE = "authorizationpolicies"
DRY_RUN = "istio.io/dry-run"
NAMESPACE_WIDE = "*"     # a targets() name: every Service of the namespace
SELECTOR = "*selector"   # a targets() name: refused for every Service of the namespace
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_METHOD = re.compile(r"[A-Z]{1,32}")
_PATH = re.compile(r"[!-~]{1,1024}")   # printable ASCII, no space
_SPEC_KEYS = ("targetRefs", "targetRef", "rules", "action", "selector", "provider")


@dataclass(frozen=True, slots=True)
class Parsed:
    namespace: str
    name: str
    created: datetime.datetime
    rules: tuple[AuthzRule, ...]
    dry_run: bool

    @property
    def entry(self) -> str:
        return f"{KIND} {self.namespace}/{self.name}"


def targets(obj: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
    """The Services (namespace, name) ``obj`` applies to; (ns, NAMESPACE_WIDE) for every
    Service of its namespace, (ns, SELECTOR) for a selector policy. Lenient: a policy
    too broken to say is no Service's concern."""
    md, spec = obj.get("metadata"), obj.get("spec", {})
    if not isinstance(md, Mapping) or not isinstance(md.get("namespace"), str):
        return frozenset()
    own = md["namespace"]
    if not isinstance(spec, Mapping):
        spec = {}
    refs = spec.get("targetRefs")
    if refs is None and spec.get("targetRef") is not None:
        refs = [spec["targetRef"]]
    if refs is None:
        return frozenset({(own, SELECTOR if spec.get("selector") is not None else NAMESPACE_WIDE)})
    out: set[tuple[str, str]] = set()
    for r in refs[:MAX_ITEMS] if isinstance(refs, list) else ():
        if (isinstance(r, Mapping) and r.get("group", "") in ("", "core")
                and r.get("kind") == "Service" and r.get("namespace", own) == own
                and isinstance(r.get("name"), str)):
            out.add((own, r["name"]))
    return frozenset(out)


def parse(obj: Mapping[str, Any]) -> Parsed:
    """A policy's meshd rules; ``Invalid`` naming the field otherwise."""
    md = as_map(obj.get("metadata"), "metadata")
    namespace, name = md.get("namespace"), md.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str) or not name:
        raise Invalid("metadata: no namespace and name")
    annotations = md.get("annotations") or {}
    dry = as_map(annotations, "metadata.annotations").get(DRY_RUN, "false")
    if dry not in ("true", "false"):
        raise Invalid(f'metadata.annotations.{DRY_RUN}: expected "true" or "false", '
                      f"got {str(dry)[:64]!r}")
    spec = as_map(obj.get("spec", {}), "spec")
    for key in spec:
        if key not in _SPEC_KEYS:
            raise Invalid(f"spec.{str(key)[:64]}: unknown field")
    if spec.get("selector") is not None and spec.get("targetRefs", spec.get("targetRef")) is None:
        raise Invalid("spec.selector: meshd cannot tell which pods a selector picks; "
                      "use targetRefs naming the Service")
    if spec.get("selector") is not None:
        raise Invalid("spec.selector: give targetRefs or selector, not both")
    action = spec.get("action", "ALLOW")
    if action != "ALLOW":
        raise Invalid(f"spec.action: {str(action)[:32]!r}: meshd applies ALLOW policies only "
                      f"(DENY, AUDIT and CUSTOM are refused; for a dry run annotate "
                      f'{DRY_RUN}: "true")')
    if spec.get("provider") is not None:
        raise Invalid("spec.provider: CUSTOM authorization is not supported by meshd")
    if spec.get("targetRefs") is not None:
        _target_refs(as_list(spec["targetRefs"], "spec.targetRefs"), "spec.targetRefs", namespace)
    elif spec.get("targetRef") is not None:
        _target_refs([spec["targetRef"]], "spec.targetRef", namespace)
    label = f"{KIND} {namespace}/{name}"
    rules = tuple(_rule(as_map(raw, f"spec.rules[{i}]"), f"spec.rules[{i}]", label, dry == "true")
                  for i, raw in enumerate(as_list(spec.get("rules", []), "spec.rules")))
    return Parsed(namespace, name, timestamp(md.get("creationTimestamp")), rules,
                  dry == "true")


def merge(parsed: Iterable[Parsed]) -> Authorization | None:
    """The policies of one Service as one part (oldest first); None if there are none."""
    items = sorted(parsed, key=lambda p: (p.created, p.namespace, p.name))
    if not items:
        return None
    return Authorization(", ".join(p.entry for p in items),
                         tuple(r for p in items for r in p.rules),
                         enforced=any(not p.dry_run for p in items),
                         audited=any(p.dry_run for p in items))


class ServiceAuthz:
    """The AuthorizationPolicies of one Service, each at its last good version, and the
    updates that tell meshd about them (the interface of ``routes.ServiceRoutes``)."""

    def __init__(self, namespace: str, service: str) -> None:
        self.namespace = namespace
        self.service = service
        self.good: dict[str, Parsed] = {}        # name -> the last good version
        self.refused: dict[str, str] = {}        # name -> why the current one is not
        self.inert: dict[str, bool] = {}         # name -> a selector or dry-run policy
        self._report = PartReporter("authz", "policies")

    def applies(self, obj: Mapping[str, Any]) -> bool:
        keys = targets(obj)
        return any(k in keys for k in ((self.namespace, self.service),
                                       (self.namespace, NAMESPACE_WIDE),
                                       (self.namespace, SELECTOR)))

    def reset(self, kind: str, namespace: str, objects: Iterable[Mapping[str, Any]]) -> None:
        """A full list: what is not in it is gone."""
        seen = set()
        for obj in objects:
            seen.add(object_name(obj))
            self.put(kind, obj)
        for name in [n for n in (*self.good, *self.refused) if n not in seen]:
            self.delete(kind, namespace, name)

    def put(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = object_name(obj)
        if not self.applies(obj):
            self.delete(kind, self.namespace, name)   # edited to target another Service
            return
        md = obj.get("metadata")
        annotations = md.get("annotations") if isinstance(md, Mapping) else None
        self.inert[name] = ((self.namespace, SELECTOR) in targets(obj) or (
            isinstance(annotations, Mapping) and annotations.get(DRY_RUN) == "true"))
        try:
            self.good[name] = parse(obj)
            self.refused.pop(name, None)
        except Invalid as e:
            self.refused[name] = str(e)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.good.pop(name, None)
        self.refused.pop(name, None)
        self.inert.pop(name, None)

    def part(self) -> tuple[Authorization | None, list[tuple[str, str]]]:
        """The merged part and the refused (entry, reason). A refused policy without a
        good version (not a selector or dry-run one) denies everything; past
        MAX_AUTHZ_RULES the newest are left out."""
        refused = [(f"{KIND} {self.namespace}/{n}", why) for n, why in self.refused.items()]
        closing = sorted(n for n in self.refused if n not in self.good and not self.inert.get(n))
        if closing:
            names = ", ".join(f"{KIND} {self.namespace}/{n}" for n in closing)
            return (Authorization(f"{names} (refused and never applied, so every request "
                                  f"is denied until it is fixed or deleted)"),
                    sorted(refused))
        chosen = sorted(self.good.values(), key=lambda p: (p.created, p.name))
        total = 0
        for i, p in enumerate(chosen):
            total += len(p.rules)
            if total > MAX_AUTHZ_RULES:
                refused += [(q.entry, f"spec.rules: Service {self.namespace}/{self.service} "
                                      f"has more than {MAX_AUTHZ_RULES} authorization rules "
                                      f"in all; the newest policies are left out")
                            for q in chosen[i:]]
                chosen = chosen[:i]
                break
        return merge(chosen), sorted(refused)

    def updates(self) -> list[Update]:
        """What changed since the last call (``reports.PartReporter``)."""
        return self._report.updates(*self.part())


# -- one policy ---------------------------------------------------------------------------

def _target_refs(refs: list[Any], at: str, namespace: str) -> None:
    for n, raw in enumerate(refs):
        where = f"{at}[{n}]" if at.endswith("s") else at
        ref = as_map(raw, where)
        if ref.get("group", "") not in ("", "core") or ref.get("kind") != "Service":
            continue   # a Gateway's (as routes' parentRefs to Gateways): not the mesh's
        if ref.get("namespace", namespace) != namespace:
            raise Invalid(f"{where}.namespace: a policy targets Services of its own "
                          f"namespace only")
        name = ref.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 63:
            raise Invalid(f"{where}.name: not a Service name: {str(name)[:64]!r}")


def _rule(rule: Mapping[str, Any], at: str, label: str, dry: bool) -> AuthzRule:
    for key in rule:
        if key not in ("from", "to"):
            raise Invalid(f"{at}.{str(key)[:64]}: not supported by meshd" if key == "when"
                          else f"{at}.{str(key)[:64]}: unknown field")
    peers: tuple[str, ...] | None = None
    if rule.get("from") is not None:
        sources = as_list(rule["from"], f"{at}.from")
        if not sources:
            raise Invalid(f"{at}.from: an empty list (leave it out for any peer)")
        found: list[str] = []
        for n, raw in enumerate(sources):
            found += _source(as_map(raw, f"{at}.from[{n}]"), f"{at}.from[{n}]")
        peers = tuple(dict.fromkeys(found))
        if len(peers) > MAX_AUTHZ_PEERS:
            raise Invalid(f"{at}.from: {len(peers)} principals and namespaces, meshd takes at "
                          f"most {MAX_AUTHZ_PEERS} per rule")
    matches: list[Match] = []
    if rule.get("to") is not None:
        ops = as_list(rule["to"], f"{at}.to")
        if not ops:
            raise Invalid(f"{at}.to: an empty list (leave it out for every request)")
        for n, raw in enumerate(ops):
            matches += _operation(as_map(raw, f"{at}.to[{n}]"), f"{at}.to[{n}]")
        if len(matches) > MAX_AUTHZ_MATCHES:
            raise Invalid(f"{at}.to: {len(matches)} path and method combinations, meshd "
                          f"takes at most {MAX_AUTHZ_MATCHES} per rule")
    return AuthzRule(f"{label} {at.removeprefix('spec.')}", peers, tuple(matches), dry)


def _source(item: Mapping[str, Any], at: str) -> list[str]:
    for key in item:
        if key != "source":
            raise Invalid(f"{at}.{str(key)[:64]}: unknown field")
    src = as_map(item.get("source"), f"{at}.source")
    for key in src:
        if key not in ("principals", "namespaces"):
            raise Invalid(f"{at}.source.{str(key)[:64]}: not supported by meshd (principals "
                          f"and namespaces are)")
    if "principals" in src and "namespaces" in src:
        raise Invalid(f"{at}.source: principals and namespaces together (Istio requires "
                      f"both to hold) are not supported by meshd; give one per source")
    if "principals" in src:
        values = as_list(src["principals"], f"{at}.source.principals")
        return [_principal(v, f"{at}.source.principals[{n}]") for n, v in enumerate(values)]
    if "namespaces" in src:
        values = as_list(src["namespaces"], f"{at}.source.namespaces")
        out = []
        for n, v in enumerate(values):
            if not isinstance(v, str) or not _NAME.fullmatch(v) or len(v) > 63:
                raise Invalid(f"{at}.source.namespaces[{n}]: meshd takes namespace names "
                              f"(no wildcards), not {str(v)[:64]!r}")
            out.append(f"{spiffe.SCHEME}*/ns/{v}/sa/*")
        return out
    raise Invalid(f"{at}.source: empty (give principals or namespaces)")


def _principal(raw: Any, at: str) -> str:
    if not isinstance(raw, str) or not raw or len(raw) > 1024:
        raise Invalid(f"{at}: expected a principal of 1 to 1024 characters")
    if raw == "*":
        return ANY_IDENTITY
    if "*" in raw[:-1] or (raw.endswith("*") and not raw.endswith("/*")):
        raise Invalid(f'{at}: meshd takes "*" alone or as a whole last segment '
                      f'("cluster.local/ns/NS/sa/*"), not {raw[:64]!r}')
    pattern = spiffe.SCHEME + raw
    why = spiffe.pattern_problem(pattern)
    if why is not None:
        raise Invalid(f"{at}: not a SPIFFE ID without its scheme: {why}")
    return pattern


def _operation(item: Mapping[str, Any], at: str) -> list[Match]:
    for key in item:
        if key != "operation":
            raise Invalid(f"{at}.{str(key)[:64]}: unknown field")
    op = as_map(item.get("operation"), f"{at}.operation")
    for key in op:
        if key not in ("paths", "methods"):
            raise Invalid(f"{at}.operation.{str(key)[:64]}: not supported by meshd (paths "
                          f"and methods are)")
    if not op:
        raise Invalid(f"{at}.operation: empty (give paths or methods)")
    methods: set[str] = set()
    for n, m in enumerate(as_list(op.get("methods", []), f"{at}.operation.methods")):
        if not isinstance(m, str) or not _METHOD.fullmatch(m):
            raise Invalid(f"{at}.operation.methods[{n}]: not an upper-case HTTP method: "
                          f"{str(m)[:64]!r}")
        methods.add(m)
    paths = [_path(p, f"{at}.operation.paths[{n}]")
             for n, p in enumerate(as_list(op.get("paths", []), f"{at}.operation.paths"))]
    return [Match(path=p, methods=frozenset(methods)) for p in (paths or [None])]


def _path(raw: Any, at: str) -> PathMatch | None:
    if not isinstance(raw, str) or not _PATH.fullmatch(raw):
        raise Invalid(f"{at}: expected a path of 1 to 1024 printable characters")
    if raw == "*":
        return None
    if raw.startswith("*"):
        if "*" in raw[1:]:
            raise Invalid(f'{at}: "*" only at the start or the end, not {raw[:64]!r}')
        return PathMatch("regex", ".*" + re.escape(raw[1:]))
    if not raw.startswith("/"):
        raise Invalid(f"{at}: expected a path starting with /, got {raw[:64]!r}")
    if raw.endswith("*"):
        if "*" in raw[:-1]:
            raise Invalid(f'{at}: "*" only at the start or the end, not {raw[:64]!r}')
        return PathMatch("prefix", raw[:-1])
    if "*" in raw:
        raise Invalid(f'{at}: "*" only at the start or the end, not {raw[:64]!r}')
    return PathMatch("exact", raw)


