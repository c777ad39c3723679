"""Failure accrual: when an endpoint is ejected from balancing and how it comes back.

An explicit state machine per endpoint, over ``Health``::

    HEALTHY --N consecutive failures (and ejecting is allowed)--> EJECTED
    EJECTED --backoff deadline passed, probe granted to one worker--> PROBING
    PROBING --probe succeeded--> HEALTHY   (ejection count kept until a stable period)
    PROBING --probe failed--> EJECTED      (backoff doubled)
    PROBING --probe not answered by its deadline--> EJECTED (due now: grant again)
    HEALTHY --stable period without an ejection--> HEALTHY with the ejection count reset

The policy follows linkerd2-proxy's consecutive-failure accrual (default 7 failures,
backoff 1 s doubling to 60 s, one probe request to return) and Envoy's outlier detection
(``consecutive_5xx``, ``max_ejection_percent``); the jitter is gRPC's connection-backoff
jitter: the nominal backoff ``min(cap, base x 2^(k-1))`` for the k-th consecutive ejection,
times a uniform factor in ``[1 - jitter, 1 + jitter]`` (default +-20 %), then capped, so a
backoff lies in ``[0.8 x nominal, min(1.2 x nominal, cap)]``.

``EndpointHealth`` is a frozen value of six numbers (``as_row``/``from_row``) so that it
fits a shared-memory row with one writer (the control process). Transitions are pure
functions ``state -> state``. A probe is granted by ``grant_probe``, which names the
worker slot that may send it; since only the row's owner applies a transition, and a
grant is only possible from EJECTED (never from PROBING until the probe expires), two
workers can never both hold a probe. An owner that takes proposals from several callers
applies each only if the row still equals the state the proposal was computed from
(compare-and-set on the value).

``may_eject`` enforces the at-most-half rule before an ejection; the balancer's panic
mode (``p2c.eligible``) is the second line when endpoints disappear from discovery.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace


class Health(enum.IntEnum):
    HEALTHY = 0
    EJECTED = 1
    PROBING = 2


class Event(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    TICK = "tick"


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    failures: int = 7              # consecutive failures that eject
    base: float = 1.0              # seconds, first ejection's nominal backoff
    cap: float = 60.0              # seconds, longest backoff
    jitter: float = 0.2            # +- fraction of the nominal backoff
    probe_timeout: float = 10.0    # a granted probe not answered by then is granted again
    stable: float = 60.0           # healthy this long after a return: ejection count reset
    max_ejected_fraction: float = 0.5


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """One endpoint's accrual state. ``until``: when EJECTED, the end of the backoff;
    when PROBING, the probe's deadline. ``since``: when the state was entered (for
    PROBING, the grant time, which also identifies the grant). ``prober``: the worker
    slot holding the probe (PROBING only; -1 otherwise)."""

    state: Health = Health.HEALTHY
    failures: int = 0
    ejections: int = 0
    until: float = 0.0
    since: float = 0.0
    prober: int = -1

    def as_row(self) -> tuple[int, int, int, float, float, int]:
        return (int(self.state), self.failures, self.ejections, self.until, self.since,
                self.prober)

    @classmethod
    def from_row(cls, row: Sequence[float]) -> EndpointHealth:
        """The state from six stored numbers; a zeroed row is HEALTHY (the prober field
        only counts in PROBING, since slot 0 is a real worker slot)."""
        state, failures, ejections, until, since, prober = row
        health = Health(int(state))
        return cls(health, int(failures), int(ejections), float(until), float(since),
                   int(prober) if health is Health.PROBING else -1)

    @property
    def ejected(self) -> bool:
        """Out of balancing (a PROBING endpoint gets only its one probe)."""
        return self.state is not Health.HEALTHY


HEALTHY = EndpointHealth()


def backoff(ejections: int, policy: EjectionPolicy, rng: random.Random) -> float:
    """Seconds the ``ejections``-th consecutive ejection lasts (1-based), jittered."""
    nominal = min(policy.cap, policy.base * 2.0 ** min(max(ejections - 1, 0), 62))
    factor = rng.uniform(1.0 - policy.jitter, 1.0 + policy.jitter)
    return min(policy.cap, nominal * factor)


def _eject(h: EndpointHealth, now: float, policy: EjectionPolicy,
           rng: random.Random) -> EndpointHealth:
    k = h.ejections + 1
    return EndpointHealth(Health.EJECTED, 0, k, now + backoff(k, policy, rng), now, -1)


def _settle(h: EndpointHealth, now: float, policy: EjectionPolicy) -> EndpointHealth:
    if h.ejections and now - h.since >= policy.stable:
        return replace(h, ejections=0)
    return h


def on_success(h: EndpointHealth, now: float, policy: EjectionPolicy) -> EndpointHealth:
    if h.state is Health.HEALTHY:
        return _settle(replace(h, failures=0), now, policy) if h.failures or h.ejections else h
    if h.state is Health.PROBING:
        return EndpointHealth(Health.HEALTHY, 0, h.ejections, 0.0, now, -1)
    return h  # EJECTED: a late answer or panic-mode traffic does not end the backoff


def on_failure(h: EndpointHealth, now: float, policy: EjectionPolicy, rng: random.Random,
               may_eject: bool = True) -> EndpointHealth:
    """A failed request. ``may_eject``: the at-most-half rule allows one more ejection
    (``may_eject(states, i, policy)``); when it does not, failures keep accruing and the
    next failure asks again."""
    if h.state is Health.HEALTHY:
        failures = h.failures + 1
        if failures >= policy.failures and may_eject:
            return _eject(h, now, policy, rng)
        return replace(h, failures=failures)
    if h.state is Health.PROBING:
        return _eject(h, now, policy, rng)
    return h  # EJECTED: already out; failures of panic-mode traffic change nothing


def on_tick(h: EndpointHealth, now: float, policy: EjectionPolicy) -> EndpointHealth:
    """Time passing: an unanswered probe expires; a stable endpoint's count resets."""
    if h.state is Health.PROBING and now >= h.until:
        return EndpointHealth(Health.EJECTED, 0, h.ejections, now, now, -1)
    if h.state is Health.HEALTHY:
        return _settle(h, now, policy)
    return h


def grant_probe(h: EndpointHealth, now: float, prober: int,
                policy: EjectionPolicy) -> EndpointHealth | None:
    """The PROBING state granting worker slot ``prober`` one request, or None when no
    probe is due (still backing off, or a probe is already out)."""
    if h.state is Health.EJECTED and now >= h.until:
        return EndpointHealth(Health.PROBING, 0, h.ejections, now + policy.probe_timeout,
                              now, prober)
    return None


def holds_probe(h: EndpointHealth, worker: int) -> bool:
    """Worker ``worker`` may send the probe. It sends one request per grant, and
    remembers ``h.since`` (the grant's identity) so as not to send a second."""
    return h.state is Health.PROBING and h.prober == worker


Transition = Callable[[EndpointHealth, float, EjectionPolicy, random.Random], EndpointHealth]

# The table: (state, event) -> transition. A pair not listed leaves the state unchanged.
TRANSITIONS: dict[tuple[Health, Event], Transition] = {
    (Health.HEALTHY, Event.SUCCESS): lambda h, now, p, r: on_success(h, now, p),
    (Health.HEALTHY, Event.FAILURE): lambda h, now, p, r: on_failure(h, now, p, r),
    (Health.HEALTHY, Event.TICK): lambda h, now, p, r: on_tick(h, now, p),
    (Health.PROBING, Event.SUCCESS): lambda h, now, p, r: on_success(h, now, p),
    (Health.PROBING, Event.FAILURE): lambda h, now, p, r: on_failure(h, now, p, r),
    (Health.PROBING, Event.TICK): lambda h, now, p, r: on_tick(h, now, p),
}


def step(h: EndpointHealth, event: Event, now: float, policy: EjectionPolicy,
         rng: random.Random) -> EndpointHealth:
    """Apply one event through the table (ejecting is assumed allowed)."""
    transition = TRANSITIONS.get((h.state, event))
    return h if transition is None else transition(h, now, policy, rng)


def ejected_count(states: Sequence[EndpointHealth]) -> int:
    return sum(1 for h in states if h.ejected)


def may_eject(states: Sequence[EndpointHealth], index: int, policy: EjectionPolicy) -> bool:
    """Ejecting endpoint ``index`` keeps the service at or under ``max_ejected_fraction``
    ejected (of 3 endpoints, 1 may be out; of 4, 2)."""
    if states[index].ejected:
        return True
    return ejected_count(states) + 1 <= policy.max_ejected_fraction * len(states)
