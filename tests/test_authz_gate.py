"""The worker's authorization gate (meshd.worker.authorize.Gate) in-process, with the
peer injected and an identity provider class of the test's own standing in for Consul
intentions: the provider is asked after the policies allow, only about authenticated
peers of mTLS listeners, through the bounded cache (one call per ID at a time, errors
kept 1 s), failing closed unless the provider fails open; every denial is counted on
the listener's own row and logged through the throttle."""

from __future__ import annotations

import logging
import tomllib
from typing import Any

import gevent
import pytest

from meshd.authz import DecisionCache
from meshd.config import Config, parse
from meshd.errors import Forbidden
from meshd.ratelog import BURST
from meshd.shm import AUTHZ_DENIED, F_AUTHZ_DENIED
from meshd.worker import authorize
from meshd.worker.authorize import Gate, load_provider
from meshd.worker.peer import PLAINTEXT, Peer

WEB = Peer(tls=True, client_id="spiffe://cluster.local/ns/default/sa/web")
API = Peer(tls=True, client_id="spiffe://cluster.local/ns/default/sa/api")
LISTENER_ROW = 7


def config(policies: str = "", mtls: str = "permissive") -> Config:
    text = f"""
[identity]
provider = "files"
[[listener]]
name = "in"
listen = "127.0.0.1:1"
direction = "inbound"
forward = "127.0.0.1:2"
mtls = "{mtls}"
[[listener]]
name = "plain"
listen = "127.0.0.1:3"
direction = "inbound"
forward = "127.0.0.1:2"
mtls = "off"
[[route]]
name = "admin"
host = "app"
path_prefix = "/admin"
""" + policies
    return parse(tomllib.loads(text))


ALLOW_SA = '[[authorization]]\nlistener = "in"\nallow = ["spiffe://cluster.local/ns/default/sa/*"]\n'


class Intentions:
    """A provider with authorize(): answers from a dict, raises for unknown IDs."""

    fail_open = False

    def __init__(self, answers: dict[str, bool], delay: float = 0.0) -> None:
        self.answers = answers
        self.delay = delay
        self.asked: list[str] = []

    def authorizes(self) -> bool:
        return True

    def authorize(self, client_id: str) -> bool:
        self.asked.append(client_id)
        if self.delay:
            gevent.sleep(self.delay)
        if client_id not in self.answers:
            raise ConnectionError("agent unreachable")
        return self.answers[client_id]


class Stripe:
    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], int] = {}

    def add(self, row: int, field: int, n: int = 1) -> None:
        self.counts[(row, field)] = self.counts.get((row, field), 0) + n


class Snapshot:
    def row(self, listener: str, service: str) -> int | None:
        return LISTENER_ROW if service == "" else None


class Ctx:
    def __init__(self) -> None:
        self.stripe = Stripe()
        self.snapshot = Snapshot()


def denied(ctx: Ctx, kind: str) -> int:
    return ctx.stripe.counts.get((LISTENER_ROW, F_AUTHZ_DENIED + AUTHZ_DENIED.index(kind)), 0)


def lst(cfg: Config, name: str = "in") -> Any:
    return next(x for x in cfg.listeners if x.name == name)


def http(gate: Gate, ctx: Ctx, cfg: Config, peer: Peer, path: bytes = b"/",
         name: str = "in") -> bool:
    try:
        gate.http(ctx, lst(cfg, name), peer, b"GET", path, [])  # type: ignore[arg-type]
    except Forbidden:
        return False
    return True


def test_policy_then_provider_each_can_refuse() -> None:
    cfg = config(ALLOW_SA)
    provider = Intentions({WEB.client_id: True, API.client_id: False})
    gate, ctx = Gate(cfg, provider), Ctx()
    assert http(gate, ctx, cfg, WEB)
    assert not http(gate, ctx, cfg, API)  # the policy allows it, intentions do not
    assert not http(gate, ctx, cfg, Peer(True, "spiffe://cluster.local/ns/x/sa/web"))
    assert provider.asked == [WEB.client_id, API.client_id]  # not asked about the third
    assert denied(ctx, "http_enforce") == 2
    assert gate.tcp(ctx, lst(cfg), WEB)  # type: ignore[arg-type]
    assert not gate.tcp(ctx, lst(cfg), API)  # type: ignore[arg-type]
    assert denied(ctx, "tcp_enforce") == 1
    assert provider.asked == [WEB.client_id, API.client_id]  # cached


def test_provider_alone_covers_mtls_listeners_and_authenticated_peers_only() -> None:
    cfg = config()
    provider = Intentions({WEB.client_id: True, API.client_id: False})
    gate, ctx = Gate(cfg, provider), Ctx()
    assert gate.covers(lst(cfg)) and not gate.covers(lst(cfg, "plain"))
    assert http(gate, ctx, cfg, WEB)
    assert not http(gate, ctx, cfg, API)
    # a plaintext peer of a permissive listener: not subject to intentions
    assert http(gate, ctx, cfg, PLAINTEXT)
    assert provider.asked == [WEB.client_id, API.client_id]


def test_a_provider_that_does_not_authorize_is_never_asked() -> None:
    class Quiet(Intentions):
        def authorizes(self) -> bool:
            return False
    cfg = config()
    provider = Quiet({})
    gate = Gate(cfg, provider)
    assert not gate.covers(lst(cfg))
    assert http(gate, Ctx(), cfg, API) and provider.asked == []


def test_errors_fail_closed_and_are_asked_again_after_a_second() -> None:
    cfg = config()
    provider = Intentions({})
    gate, ctx = Gate(cfg, provider), Ctx()
    now = [100.0]
    gate.cache = DecisionCache(clock=lambda: now[0])
    assert not http(gate, ctx, cfg, WEB)
    assert not http(gate, ctx, cfg, WEB)
    assert provider.asked == [WEB.client_id]  # the error is kept, briefly
    now[0] += 1.0
    provider.answers[WEB.client_id] = True
    assert http(gate, ctx, cfg, WEB)
    assert provider.asked == [WEB.client_id] * 2
    now[0] += 5.0
    assert http(gate, ctx, cfg, WEB)          # an answer is kept 10 s
    assert provider.asked == [WEB.client_id] * 2
    now[0] += 5.0
    assert http(gate, ctx, cfg, WEB)
    assert provider.asked == [WEB.client_id] * 3


def test_fail_open_provider_lets_errors_through() -> None:
    cfg = config()
    provider = Intentions({})
    provider.fail_open = True
    assert http(Gate(cfg, provider), Ctx(), cfg, WEB)


def test_a_slow_provider_is_cut_short_and_fails_closed(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(authorize, "PROVIDER_TIMEOUT", 0.05)
    cfg = config()
    provider = Intentions({WEB.client_id: True}, delay=5.0)
    with caplog.at_level(logging.WARNING, "meshd.authz"):
        assert not http(Gate(cfg, provider), Ctx(), cfg, WEB)
    assert "could not authorize client_id=spiffe://cluster.local/ns/default/sa/web: " \
           "Timeout" in caplog.text


def test_concurrent_misses_for_one_id_make_one_call() -> None:
    cfg = config()
    provider = Intentions({WEB.client_id: True, API.client_id: False}, delay=0.05)
    gate, ctx = Gate(cfg, provider), Ctx()
    jobs = [gevent.spawn(http, gate, ctx, cfg, peer) for peer in [WEB, API] * 10]
    gevent.joinall(jobs, timeout=10)
    assert [j.value for j in jobs] == [True, False] * 10
    assert sorted(provider.asked) == sorted([WEB.client_id, API.client_id])


def test_audit_counts_and_logs_and_lets_through(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(ALLOW_SA.replace("\nallow", '\nmode = "audit"\nallow'))
    gate, ctx = Gate(cfg, None), Ctx()
    with caplog.at_level(logging.INFO, "meshd.authz"):
        assert http(gate, ctx, cfg, PLAINTEXT)
        assert gate.tcp(ctx, lst(cfg), Peer(True, "spiffe://cluster.local/ns/x/sa/y"))  # type: ignore[arg-type]
        assert http(gate, ctx, cfg, WEB)
    assert denied(ctx, "http_audit") == 1 and denied(ctx, "tcp_audit") == 1
    assert denied(ctx, "http_enforce") == 0
    assert "in: audit: would deny tcp from client_id=spiffe://cluster.local/ns/x/sa/y" in caplog.text


def test_route_scoping_through_the_gate() -> None:
    cfg = config('[[authorization]]\nlistener = "in"\nroute = "admin"\n'
                 'allow = ["spiffe://cluster.local/ns/default/sa/web"]\n'
                 + ALLOW_SA.replace("sa/*", "sa/api"))
    gate, ctx = Gate(cfg, None), Ctx()
    assert http(gate, ctx, cfg, WEB, b"/admin/users")
    assert not http(gate, ctx, cfg, API, b"/admin/users")
    assert http(gate, ctx, cfg, API, b"/public")
    assert not http(gate, ctx, cfg, WEB, b"/public")
    # opaque TCP has no route: the listener's own policies judge it
    assert gate.tcp(ctx, lst(cfg), API) and not gate.tcp(ctx, lst(cfg), WEB)  # type: ignore[arg-type]


def test_log_lines_are_throttled_and_bound_the_client_id(caplog: pytest.LogCaptureFixture,
                                                         ) -> None:
    cfg = config(ALLOW_SA)
    gate, ctx = Gate(cfg, None), Ctx()
    long_id = "spiffe://cluster.local/" + "x" * 2000
    with caplog.at_level(logging.INFO, "meshd.authz"):
        for _ in range(BURST * 5):
            assert not http(gate, ctx, cfg, Peer(True, long_id))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == BURST
    assert all(len(line) < 600 for line in lines)
    assert denied(ctx, "http_enforce") == BURST * 5


def test_load_provider_without_identity_is_none() -> None:
    cfg = parse(tomllib.loads('[[listener]]\nname = "o"\nlisten = "127.0.0.1:1"\n'))
    assert load_provider(cfg) is None


def test_an_unconstructible_provider_fails_closed() -> None:
    gate, ctx = Gate(config(), authorize.BrokenProvider("boom")), Ctx()
    cfg = config()
    assert not http(gate, ctx, cfg, WEB)
    assert http(gate, ctx, cfg, PLAINTEXT)
