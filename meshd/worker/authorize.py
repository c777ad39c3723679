"""Authorization in the worker: the ``[[authorization]]`` policies (``meshd.authz``) and
the identity provider's ``authorize()`` (Consul intentions), applied to each request of
an inbound listener (HTTP/1.1, HTTP/2, gRPC) and to each opaque or tunneled connection
before meshd connects upstream.

``Gate`` is built once per worker (the worker is remade on reload, so is the gate). A
denial in ``enforce`` mode raises ``Forbidden`` (HTTP: the client side answers 403 with
the public reason, nothing reaches the application; a gRPC client maps 403 to
PERMISSION_DENIED) or makes ``tcp`` return False (the caller closes the connection
unconnected). In ``audit`` mode the request goes on. Either way the denial is counted
(``meshd_authz_denied_total{listener, mode, protocol}``, the F_AUTHZ_DENIED fields of
the listener's own shm row) and logged through a throttle keyed by listener and kind
(never by client input), with the client ID bounded (``meshd.authz.log_id``).

The provider is asked only when it says it authorizes (``authorizes()``), only on
listeners with mTLS and only about authenticated peers: a plaintext peer of a permissive
listener is not subject to intentions (as with Consul's own permissive mode; a policy or
``mtls = "strict"`` refuses it). Its answers go through a per-worker ``DecisionCache``,
concurrent misses for one ID wait for one call, a call is bounded by
``PROVIDER_TIMEOUT``, and "cannot tell" (it raised, or timed out) denies unless the
provider's ``fail_open`` says otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from meshd.authz import (
    ALLOW,
    AuditDeny,
    Authorizer,
    Decision,
    DecisionCache,
    Deny,
    FleetAuthorizer,
    Request,
    log_id,
)
from meshd.errors import Forbidden
from meshd.ratelog import Throttle
from meshd.shm import AUTHZ_DENIED, F_AUTHZ_DENIED, ROW_OVERFLOW

if TYPE_CHECKING:
    from meshd.config import Config, ListenerConfig
    from meshd.fleet.select import Selector
    from meshd.worker.context import Context
    from meshd.worker.peer import Peer

log = logging.getLogger("meshd.authz")
PROVIDER_TIMEOUT = 5.0
MAX_PENDING = 1024  # distinct IDs asked about at once (more: "cannot tell")

Headers = Sequence[tuple[bytes, bytes]]


class Gate:
    def __init__(self, config: Config, provider: Any = None) -> None:
        """``provider``: an identity provider instance (``meshd.identity.api``) or None;
        it is asked only when its ``authorizes()`` says so."""
        self.authorizer = Authorizer(config.authorization, config.routes)
        self.provider = provider if provider is not None and _authorizes(provider) else None
        self.fail_open = bool(getattr(self.provider, "fail_open", False))
        self.cache = DecisionCache()
        self.throttle = Throttle(log)
        self._pending: dict[str, gevent.event.AsyncResult] = {}
        # Listeners the provider's answers apply to: inbound with mTLS.
        self._mtls = frozenset(lst.name for lst in config.listeners
                               if lst.direction == "inbound" and lst.mtls != "off")
        # Fleet authorization: inbound listeners serving a service that no policy of the
        # file names (the file wins per listener) -> that service's compiled part.
        self._served = {lst.name: lst.service for lst in config.listeners
                        if lst.direction == "inbound" and lst.service
                        and not self.authorizer.governs(lst.name)}
        self._fleet: dict[str, FleetAuthorizer] = {}
        # Listeners checked whatever the fleet says (the file's policies, the provider's
        # mTLS ones): ``covers`` asks this set and the fleet's dict, no call per request.
        self._covered = frozenset(
            lst.name for lst in config.listeners if self.authorizer.governs(lst.name)
            or (self.provider is not None and lst.name in self._mtls))

    def set_fleet(self, fleet: Selector | None) -> None:
        """The fleet policies of a newly loaded snapshot: each served service's
        ``Authorization`` part, compiled again only when it changed."""
        for name, service in self._served.items():
            policy = fleet.policies.get(service) if fleet is not None else None
            part = policy.authz if policy is not None else None
            old = self._fleet.get(name)
            if part is None:
                self._fleet.pop(name, None)
            elif old is None or not (old.part is part or old.part == part):
                self._fleet[name] = FleetAuthorizer(part)

    def covers(self, listener: ListenerConfig) -> bool:
        """Whether anything is checked on ``listener`` (else the caller skips the gate)."""
        name = listener.name
        return name in self._covered or name in self._fleet

    def http(self, ctx: Context, listener: ListenerConfig, peer: Peer, method: bytes,
             target: bytes, headers: Headers) -> None:
        """Check one request; raises ``Forbidden`` when it is refused."""
        name = listener.name
        route = (self.authorizer.route_for(name, method, target, headers)
                 if self.authorizer.scoped(name) else None)
        if not self._allowed(ctx, listener, route, peer, "http", (method, target, headers)):
            raise Forbidden()

    def tcp(self, ctx: Context, listener: ListenerConfig, peer: Peer) -> bool:
        """Check an opaque connection or a tunnel; False: close it unconnected."""
        return self._allowed(ctx, listener, None, peer, "tcp")

    def decide(self, listener: ListenerConfig, route: str | None, peer: Peer,
               request: Request | None = None) -> Decision:
        """The policies' decision (the file's, else the fleet's for the listener's
        service), then the provider's when they allow. ``request``: (method, target,
        headers) of an HTTP request, for fleet rules with matches."""
        fleet = self._fleet.get(listener.name)
        decision = (fleet.decide(peer.client_id, request) if fleet is not None
                    else self.authorizer.decide(listener.name, route, peer))
        if isinstance(decision, Deny):
            return decision
        if self.provider is not None and peer.client_id and listener.name in self._mtls:
            allowed = self._ask(listener, peer.client_id)
            if allowed is None:
                if not self.fail_open:
                    return Deny("the identity provider cannot tell (failing closed)")
            elif not allowed:
                return Deny("the identity provider denies it (intentions)")
        return decision

    def _allowed(self, ctx: Context, listener: ListenerConfig, route: str | None, peer: Peer,
                 protocol: str, request: Request | None = None) -> bool:
        decision = self.decide(listener, route, peer, request)
        if decision is ALLOW:
            return True
        enforce = isinstance(decision, Deny)
        mode = "enforce" if enforce else "audit"
        row = ctx.snapshot.row(listener.name, "")
        ctx.stripe.add(ROW_OVERFLOW if row is None else row,
                       F_AUTHZ_DENIED + AUTHZ_DENIED.index(f"{protocol}_{mode}"))
        assert isinstance(decision, (Deny, AuditDeny))
        name = listener.name
        self.throttle.log(logging.WARNING if enforce else logging.INFO,
                          f"{name}: authz {mode} {protocol}",
                          "%s: %s %s from client_id=%s%s: %s", name,
                          "denied" if enforce else "audit: would deny", protocol,
                          log_id(peer.client_id), f" route={route}" if route else "",
                          decision.reason)
        return not enforce

    def _ask(self, listener: ListenerConfig, client_id: str) -> bool | None:
        """The provider's answer about ``client_id`` (None: it cannot tell), cached."""
        found, answer = self.cache.get(client_id)
        if found:
            return answer
        pending = self._pending.get(client_id)
        if pending is not None:  # another greenlet is asking: wait for its answer
            try:
                result: bool | None = pending.get(timeout=PROVIDER_TIMEOUT)
            except gevent.Timeout:
                return None
            return result
        if len(self._pending) >= MAX_PENDING:
            return None
        pending = self._pending[client_id] = gevent.event.AsyncResult()
        provider = self.provider
        assert provider is not None
        answer = None
        timer = gevent.Timeout(PROVIDER_TIMEOUT)
        timer.start()
        try:
            answer = bool(provider.authorize(client_id))
        except (Exception, gevent.Timeout) as e:  # a plugin may raise anything
            if isinstance(e, gevent.Timeout) and e is not timer:
                raise  # someone else's deadline (the request's): not the provider's answer
            self.throttle.warning(f"{listener.name}: authz provider error",
                                  "%s: the identity provider could not authorize "
                                  "client_id=%s: %s: %s", listener.name, log_id(client_id),
                                  type(e).__name__, str(e)[:200])
        finally:
            timer.close()
            self.cache.put(client_id, answer)
            del self._pending[client_id]
            pending.set(answer)
        return answer


def _authorizes(provider: Any) -> bool:
    try:
        return bool(provider.authorizes())
    except Exception as e:  # a plugin's bug: fail closed (asked, and "cannot tell")
        log.error("the identity provider's authorizes() raised %s: %s; every authenticated "
                  "peer of an mTLS listener is refused unless it fails open",
                  type(e).__name__, e)
        return True


class BrokenProvider:
    """Stands in for a provider the worker could not construct: it authorizes (its
    ``authorize`` may be on), and cannot tell -- so peers are refused, never let through
    unchecked."""

    fail_open = False

    def __init__(self, why: str) -> None:
        self.why = why

    def authorizes(self) -> bool:
        return True

    def authorize(self, client_id: str) -> bool:
        raise RuntimeError(self.why)


def load_provider(config: Config) -> Any:
    """The worker's own instance of the ``[identity]`` provider when it may authorize
    (None without [identity], or when its class never does): constructed as the control
    process's is, never watched."""
    ident = config.identity
    if ident is None:
        return None
    from meshd.identity import registry
    from meshd.identity.api import Provider, Settings
    try:
        cls, _info = registry.load(ident.provider)
        if getattr(cls, "authorizes", Provider.authorizes) is Provider.authorizes:
            return None  # the base class's: never authorizes
        return cls(ident.options, Settings(trust_domain=ident.trust_domain,
                                           instance=config.instance,
                                           state_dir=config.state_dir))
    except Exception as e:  # validated in a child before; here only by a broken install
        log.error("identity provider %r cannot be constructed in the worker: %s: %s; "
                  "peers of mTLS listeners are refused", ident.provider, type(e).__name__, e)
        return BrokenProvider(f"provider {ident.provider!r} not constructed: {e}")
