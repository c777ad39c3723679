"""The config of identity, mTLS and authorization: ``[identity]``, a listener's ``mtls``
and ``[listener.tls]``, and ``[[authorization]]`` (CONTRACT, "Identity, mTLS and
authorization").

Rules a config must satisfy here, each reported under its key path:
- ``[identity] provider`` names a plugin (checked by ``meshd.validate`` in a child, as
  discovery plugins are); its other keys beside ``trust_domain`` are the plugin's.
- ``mtls`` is for inbound listeners, and anything but "off" needs ``[identity]``; an
  inbound listener's default is "permissive" once ``[identity]`` is set, else "off".
- ``[listener.tls]`` (TLS for ordinary clients, with a certificate of their world, not a
  workload identity) cannot share a listener with ``mtls`` other than "off".
- ``[[authorization]]`` names an inbound listener whose ``mtls`` is not "off" (a client
  identity exists only after an mTLS handshake), and optionally a ``[[route]]`` of it;
  ``allow`` holds SPIFFE ID patterns (``meshd.identity.spiffe``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from meshd.config_table import Problems, Table, array, choice, default, show, string
from meshd.identity import spiffe

if TYPE_CHECKING:
    from meshd.config import ListenerConfig, RouteConfig

MTLS_MODES = ("off", "permissive", "strict")


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """``[identity]``: this meshd's workload identity and the provider that gives it."""
    provider: str
    trust_domain: str = "cluster.local"
    options: Mapping[str, Any] = field(default_factory=dict)  # the provider's own keys


@dataclass(frozen=True, slots=True)
class ListenerTlsConfig:
    """``[listener.tls]``: TLS for ordinary clients (ALPN h2 and http/1.1)."""
    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    """One ``[[authorization]]`` policy: who may call ``listener`` (and ``route`` of it)."""
    listener: str
    allow: tuple[str, ...]
    route: str | None = None
    mode: str = "enforce"  # | "audit": log and count a denial, let it through


def identity(raw: object, problems: Problems) -> IdentityConfig | None:
    """``[identity]``, or None when the table is absent."""
    if raw is None:
        return None
    t = Table(raw, "identity", problems)
    provider = t.take("provider", string(), "", required=True)
    trust_domain = t.field(IdentityConfig, "trust_domain", _trust_domain)
    return IdentityConfig(provider=provider, trust_domain=trust_domain,
                          options=MappingProxyType(t.rest()))


def listener_mtls(t: Table) -> str | None:
    """A listener's ``mtls`` as written (None: not given; ``resolve_listeners`` decides)."""
    return t.take("mtls", choice(*MTLS_MODES), None)


def listener_tls(t: Table) -> ListenerTlsConfig | None:
    raw = t.raw("tls", None)
    if raw is None:
        return None
    tt = Table(raw, f"{t.path}.tls", t.problems)
    tls = ListenerTlsConfig(cert_file=tt.take("cert_file", string(), "", required=True),
                            key_file=tt.take("key_file", string(), "", required=True))
    tt.finish()
    return tls


def resolve_listeners(listeners: tuple[ListenerConfig, ...], given: list[str | None],
                      ident: IdentityConfig | None, problems: Problems,
                      ) -> tuple[ListenerConfig, ...]:
    """Each listener with its ``mtls`` decided (the default depends on ``[identity]``),
    after the rules between ``mtls``, ``tls``, the direction and ``[identity]``."""
    out = []
    for i, (listener, mtls) in enumerate(zip(listeners, given, strict=True)):
        key = f"listener[{i}]"
        if mtls is None:
            mtls = ("permissive" if ident is not None and listener.direction == "inbound"
                    and listener.tls is None else default(type(listener), "mtls"))
        elif mtls != "off" and listener.direction != "inbound":
            problems.append((f"{key}.mtls", "only an inbound listener terminates mTLS from "
                                            "peer meshds; an outbound one takes [listener.tls] "
                                            "for TLS from its clients"))
        elif mtls != "off" and ident is None:
            problems.append((f"{key}.mtls", f'mtls = "{mtls}" needs an [identity] table: the '
                                            f"listener presents this meshd's certificate"))
        if mtls != "off" and listener.tls is not None:
            problems.append((f"{key}.tls", f'a listener with mtls = "{mtls}" presents the '
                                           f'workload certificate; [listener.tls] needs '
                                           f'mtls = "off"'))
        out.append(dataclasses.replace(listener, mtls=mtls))
    return tuple(out)


def authorizations(top: Table) -> tuple[AuthorizationConfig, ...]:
    policies = []
    for t in array(top, "authorization", required=False):
        policies.append(AuthorizationConfig(
            listener=t.take("listener", string(), "", required=True),
            allow=t.take("allow", _allow_list, (), required=True),
            route=t.field(AuthorizationConfig, "route", string()),
            mode=t.field(AuthorizationConfig, "mode", choice("enforce", "audit"))))
        t.finish()
    return tuple(policies)


def check_authorizations(policies: tuple[AuthorizationConfig, ...],
                         listeners: tuple[ListenerConfig, ...],
                         routes: tuple[RouteConfig, ...], problems: Problems) -> None:
    by_name = {lst.name: lst for lst in listeners}
    route_names = {r.name: r for r in routes}
    for i, policy in enumerate(policies):
        key = f"authorization[{i}]"
        listener = by_name.get(policy.listener)
        if not policy.listener:
            pass  # reported as required
        elif listener is None:
            problems.append((f"{key}.listener", f"no [[listener]] is named {policy.listener!r}"))
        elif listener.direction != "inbound":
            problems.append((f"{key}.listener", f"listener {policy.listener!r} is outbound; "
                                                f"authorization is checked where peers call in"))
        elif listener.mtls == "off":
            problems.append((f"{key}.listener",
                             f'listener {policy.listener!r} has mtls = "off": no client '
                             f"identity to check (set [identity] and mtls)"))
        if policy.route is not None:
            route = route_names.get(policy.route)
            if route is None:
                problems.append((f"{key}.route", f"no [[route]] is named {policy.route!r}"))
            elif route.listener is not None and route.listener != policy.listener:
                problems.append((f"{key}.route", f"route {policy.route!r} is for listener "
                                                 f"{route.listener!r}, not {policy.listener!r}"))


def _trust_domain(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    why = spiffe.trust_domain_problem(value)
    if why:
        raise ValueError(why)
    return value


def _allow_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'expected a non-empty list of SPIFFE ID patterns '
                         f'("spiffe://TD/ns/NS/sa/*"), got {show(value)}')
    for i, item in enumerate(value):
        why = spiffe.pattern_problem(item) if isinstance(item, str) else f"{item!r} is not a string"
        if why:
            raise ValueError(f"[{i}]: {why}")
    return tuple(value)
