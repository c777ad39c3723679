"""Route status as the Gateway API defines it, for the routes meshd reads (sans-IO): what
``status.parents[]`` should say for each Service parentRef of an HTTPRoute or GRPCRoute,
and whether what the object says already is that.

One ``RouteParentStatus`` per Service parentRef (GAMMA: the parent is the Service), with
``controllerName`` ``CONTROLLER``, the ``parentRef`` as written, and two conditions, each
with the object's ``metadata.generation`` as ``observedGeneration``:

- ``Accepted``: True (reason ``Accepted``) when meshd applies the route; False (reason
  ``UnsupportedValue``, the message naming the field, as meshd's log and ``/ready``
  do) when meshd refuses it, the route's last good version, if any, serving meanwhile;
- ``ResolvedRefs``: False (reason ``InvalidKind``) when a backendRef is not a core
  Service, else True (reason ``ResolvedRefs``). meshd does not look Services up: a
  Service that does not exist is not reported (``BackendNotFound`` is not used).

``patch`` is the JSON merge patch (RFC 7386) for the ``status`` subresource: the other
controllers' entries kept as they are (a merge patch replaces a list whole), ours
replaced, with the object's ``resourceVersion`` as a precondition (a 409 means it changed
meanwhile, and its new version will be looked at). ``lastTransitionTime`` changes only
when a condition's status does; a status equal but for those times is not written again,
so the write meshd's own patch causes (a MODIFIED event) ends there, and several meshds
writing converge instead of taking turns.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from meshd_kubernetes.routes import Invalid, parse

CONTROLLER = "meshd.dev/fleet"
MAX_MESSAGE = 1024      # characters of a condition message (the API's own bound is 32768)
MAX_PARENTS = 32        # the CRD's maxItems for parentRefs and status.parents
MAX_SCAN = 64           # rules, and backendRefs per rule, looked at


def service_refs(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The parentRefs of ``obj`` that name a Service, as written."""
    spec = obj.get("spec")
    refs = spec.get("parentRefs") if isinstance(spec, Mapping) else None
    if not isinstance(refs, list):
        return []
    return [r for r in refs[:MAX_PARENTS] if isinstance(r, Mapping)
            and r.get("group", "") in ("", "core") and r.get("kind") == "Service"]


def conditions(kind: str, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The two conditions meshd reports (without ``lastTransitionTime``)."""
    md = obj.get("metadata")
    generation = md.get("generation") if isinstance(md, Mapping) else None
    generation = generation if isinstance(generation, int) else 0
    try:
        parse(kind, obj, lambda ns, n: n)
        accepted = ("True", "Accepted", "the route is applied by meshd")
    except Invalid as e:
        accepted = ("False", "UnsupportedValue", str(e)[:MAX_MESSAGE])
    resolved = ("True", "ResolvedRefs", "every backendRef is a Service")
    spec = obj.get("spec")
    rules = spec.get("rules") if isinstance(spec, Mapping) else None
    for i, rule in enumerate(rules[:MAX_SCAN] if isinstance(rules, list) else ()):
        refs = rule.get("backendRefs") if isinstance(rule, Mapping) else None
        for j, ref in enumerate(refs[:MAX_SCAN] if isinstance(refs, list) else ()):
            if isinstance(ref, Mapping) and (ref.get("group", "") not in ("", "core")
                                             or ref.get("kind", "Service") != "Service"):
                resolved = ("False", "InvalidKind",
                            f"spec.rules[{i}].backendRefs[{j}]: meshd routes to Services "
                            f"only, not {str(ref.get('group', ''))[:64]}/"
                            f"{str(ref.get('kind'))[:64]}")
                break
        if resolved[0] == "False":
            break
    return [{"type": t, "status": s, "reason": r, "message": m, "observedGeneration": generation}
            for t, (s, r, m) in (("Accepted", accepted), ("ResolvedRefs", resolved))]


def ours(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The ``status.parents`` entries of ``CONTROLLER`` the object has now."""
    st = obj.get("status")
    parents = st.get("parents") if isinstance(st, Mapping) else None
    if not isinstance(parents, list):
        return []
    return [p for p in parents[:MAX_PARENTS * 4] if isinstance(p, Mapping)
            and p.get("controllerName") == CONTROLLER]


def _without_times(entries: Sequence[Mapping[str, Any]]) -> list[Any]:
    return [{**p, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                 for c in p.get("conditions") or () if isinstance(c, Mapping)]}
            for p in entries]


def patch(kind: str, obj: Mapping[str, Any], now: datetime.datetime | None = None,
          ) -> dict[str, Any] | None:
    """The merge patch for the status subresource, or None when the object's status
    already says what meshd would (or no parentRef is a Service)."""
    refs = service_refs(obj)
    if not refs:
        return None
    conds = conditions(kind, obj)
    want: list[dict[str, Any]] = [
        {"parentRef": dict(r), "controllerName": CONTROLLER, "conditions": conds} for r in refs]
    have = ours(obj)
    if _without_times(have) == _without_times(want):
        return None
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = {(c.get("type"), c.get("status")): c.get("lastTransitionTime")
              for p in have for c in p.get("conditions") or () if isinstance(c, Mapping)}
    for entry in want:
        entry["conditions"] = [{**c, "lastTransitionTime":
                                before.get((c["type"], c["status"])) or stamp}
                               for c in entry["conditions"]]
    st = obj.get("status")
    parents = st.get("parents") if isinstance(st, Mapping) else None
    others = [p for p in (parents if isinstance(parents, list) else [])[:MAX_PARENTS * 4]
              if not (isinstance(p, Mapping) and p.get("controllerName") == CONTROLLER)]
    md = obj.get("metadata")
    rv = md.get("resourceVersion") if isinstance(md, Mapping) else None
    others = others[:max(0, MAX_PARENTS - len(want))]   # the CRD's bound on the list
    return {"metadata": {"resourceVersion": rv}, "status": {"parents": [*others, *want]}}
