"""From EndpointSlices to meshd endpoints: the sans-IO core of the plugin (no sockets here).

Which endpoints get traffic (the rule, over all slices of a service merged):

1. *Ready*: ``conditions.ready`` is true or unset (unset means ready, as the API says),
   and ``conditions.terminating`` is not true.
2. Only when no endpoint is ready: the endpoints that are ``serving`` and
   ``terminating`` (a rollout where every old pod is draining and no new one is ready
   yet), as kube-proxy does, so a service is not black-holed while it still answers.
3. Anything else (not ready, terminating and not serving) gets no traffic.

The port: the slice port named by ``port`` (from ``"web:http"`` or the ``port`` option),
else the slice's first port that is not the meshd inbound port. A slice without that
port contributes nothing.

Meshed detection needs no extra API call: the EndpointSlice controller copies a
Service's labels onto its slices, so a Service labelled ``meshed_label`` = ``"true"``
(default ``meshd.io/meshed``) marks all its endpoints meshed. Their meshd inbound port
is the slice port named ``inbound_port_name`` (default ``meshd-inbound``; slice ports
are resolved target ports, so a named container port works), else 4143.

Expected identity (mTLS between meshds): a meshed slice whose Service is also labelled
``service_account_label`` (default ``meshd.io/service-account``) = the pods' service
account gives its endpoints the identity
``spiffe://<trust_domain>/ns/<slice namespace>/sa/<account>`` (Istio's and Linkerd's
shape). EndpointSlices do not carry the pods' service account and a label value cannot
hold a URI, hence the label. A value that is not a Kubernetes name (DNS-1123 subdomain)
gives no identity and a throttled warning naming the slice; meshed without the label: no
identity, so plaintext h2c to that endpoint as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshd.discovery.api import Endpoint
from meshd.identity.spiffe import for_service_account
from meshd.ratelog import Throttle

log = logging.getLogger("meshd.discovery.kubernetes")
# The label is set by whoever may label Services: a bad one must not flood the log on
# every slice event. Keyed by the option name and the kind of problem only.
_throttle = Throttle(log)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_INBOUND_PORT = 4143


@dataclass(frozen=True, slots=True)
class ServiceRef:
    namespace: str
    name: str
    port: str | None  # port name; None: the configured default

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}" + (f":{self.port}" if self.port else "")


def parse_service(service: str, namespace: str, cluster_domain: str) -> ServiceRef | None:
    """``web``, ``web.ns``, ``web.ns.svc``, ``web.ns.svc.<cluster_domain>``, each with an
    optional ``:portname``. None when the name cannot be a Kubernetes service."""
    name, _, port = service.lower().partition(":")  # DNS names are case-insensitive
    parts = name.split(".")
    if len(parts) == 1:
        ns = namespace
    elif len(parts) == 2 or (len(parts) >= 3 and parts[2] == "svc" and
                             ".".join(parts[3:]) in ("", cluster_domain)):
        ns = parts[1]
    else:
        return None
    if not all(dns_label(p) for p in (parts[0], ns)) or (port and not dns_label(port)):
        return None
    return ServiceRef(ns, parts[0], port or None)


def dns_subdomain(s: str) -> bool:
    """An RFC 1123 subdomain (what service account names are): dot-separated labels of
    lowercase letters, digits and "-" (each starting and ending alphanumeric), at most 253."""
    return 0 < len(s) <= 253 and all(dns_label(p) for p in s.split("."))


def dns_label(s: str) -> bool:
    """An RFC 1123 label (what namespace, service and port names are); lowercase only."""
    return (0 < len(s) <= 63 and s == s.lower() and s[0].isalnum() and s[-1].isalnum()
            and all(c.isalnum() or c == "-" for c in s) and s.isascii())


@dataclass(frozen=True, slots=True)
class Options:
    port: str | None
    meshed_label: str
    inbound_port_name: str
    service_account_label: str = "meshd.io/service-account"
    trust_domain: str = "cluster.local"


def endpoints(slices: Iterable[Mapping[str, Any]], ref: ServiceRef,
              opts: Options) -> tuple[Endpoint, ...]:
    """The endpoints that get traffic, by the rule in the module docstring, sorted."""
    ready: dict[tuple[str, int], Endpoint] = {}
    draining: dict[tuple[str, int], Endpoint] = {}
    for sl in slices:
        port, inbound = _ports(sl, ref.port or opts.port, opts.inbound_port_name)
        if port is None:
            continue
        labels = (sl.get("metadata") or {}).get("labels") or {}
        meshed = labels.get(opts.meshed_label) == "true"
        identity = _identity(sl, labels, ref, opts) if meshed else ""
        for ep in sl.get("endpoints") or ():
            cond = ep.get("conditions") or {}
            terminating = cond.get("terminating") is True
            is_ready = cond.get("ready") is not False and not terminating
            fallback = terminating and cond.get("serving") is True
            if not (is_ready or fallback):
                continue
            target = ep.get("targetRef") or {}
            pod = target.get("name") if target.get("kind", "Pod") == "Pod" else None
            # "pod" and its "namespace" also label the endpoint's metrics (dst_pod,
            # dst_namespace: meshd.metrics.DST_LABELS).
            extra = sorted((k, v) for k, v in (("node", ep.get("nodeName")), ("pod", pod),
                                                ("namespace", pod and (target.get("namespace")
                                                                       or ref.namespace)))
                           if isinstance(v, str) and v)
            for address in ep.get("addresses") or ():
                e = Endpoint(host=address, port=port, zone=ep.get("zone") or "",
                             meshed=meshed, inbound_port=inbound if meshed else 0,
                             labels=tuple(extra), identity=identity)
                (ready if is_ready else draining).setdefault(e.address, e)
    chosen = ready or draining
    return tuple(chosen[k] for k in sorted(chosen))


def _identity(sl: Mapping[str, Any], labels: Mapping[str, Any], ref: ServiceRef,
              opts: Options) -> str:
    """The expected SPIFFE ID of a meshed slice's endpoints, or "" (none: plaintext)."""
    account = labels.get(opts.service_account_label)
    if account is None:
        return ""
    if not isinstance(account, str) or not dns_subdomain(account):
        name = str((sl.get("metadata") or {}).get("name") or "")[:253]
        _throttle.log(logging.WARNING, "kubernetes.service_account_label.invalid",
                      "kubernetes: EndpointSlice %s/%s (service %s): label %s = %.80r is not a "
                      "service account name (DNS-1123 subdomain); its endpoints get no "
                      "identity (plaintext to them)", ref.namespace, name, ref,
                      opts.service_account_label, account)
        return ""
    # The slices of a service are listed in its namespace: ref.namespace is theirs.
    return for_service_account(opts.trust_domain, ref.namespace, account)


def _ports(sl: Mapping[str, Any], wanted: str | None,
           inbound_name: str) -> tuple[int | None, int]:
    port: int | None = None
    inbound = DEFAULT_INBOUND_PORT
    for p in sl.get("ports") or ():
        number, name = p.get("port"), p.get("name") or ""
        if not isinstance(number, int) or p.get("protocol", "TCP") != "TCP":
            continue
        if name == inbound_name:
            inbound = number
        elif port is None and (wanted is None or name == wanted):
            port = number
    return port, inbound
