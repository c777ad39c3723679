"""The failure-accrual state machine with plain values and a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.balance import ejection as ej
from meshd.balance.ejection import HEALTHY, EjectionPolicy, EndpointHealth, Event, Health

P = EjectionPolicy()
NO_JITTER = EjectionPolicy(jitter=0.0)


def fail(h: EndpointHealth, times: int, now: float, policy: EjectionPolicy = P,
         rng: random.Random | None = None) -> EndpointHealth:
    rng = rng or random.Random(0)
    for _ in range(times):
        h = ej.on_failure(h, now, policy, rng)
    return h


def eject(now: float, policy: EjectionPolicy = NO_JITTER, h: EndpointHealth = HEALTHY,
          rng: random.Random | None = None) -> EndpointHealth:
    h = fail(h, policy.failures, now, policy, rng)
    assert h.state is Health.EJECTED
    return h


def test_six_consecutive_failures_do_not_eject_seven_do() -> None:
    h = fail(HEALTHY, 6, now=1.0)
    assert h.state is Health.HEALTHY and h.failures == 6 and not h.ejected
    h = fail(h, 1, now=1.0)
    assert h.state is Health.EJECTED and h.ejected
    assert h.ejections == 1 and h.failures == 0


def test_a_success_resets_the_count() -> None:
    h = fail(HEALTHY, 6, now=1.0)
    h = ej.on_success(h, 1.0, P)
    assert h == HEALTHY
    assert fail(h, 6, now=1.0).state is Health.HEALTHY


def test_first_backoff_is_one_second_and_no_probe_before_it() -> None:
    h = eject(10.0)
    assert h.until == pytest.approx(11.0)
    assert ej.grant_probe(h, 10.99, prober=3, policy=NO_JITTER) is None
    g = ej.grant_probe(h, 11.0, prober=3, policy=NO_JITTER)
    assert g is not None and g.state is Health.PROBING and g.prober == 3
    assert ej.holds_probe(g, 3) and not ej.holds_probe(g, 4)
    assert g.ejected  # nobody else balances onto it meanwhile


def test_only_one_probe_is_granted() -> None:
    h = eject(0.0)
    g = ej.grant_probe(h, 5.0, prober=1, policy=NO_JITTER)
    assert g is not None
    assert ej.grant_probe(g, 5.0, prober=2, policy=NO_JITTER) is None
    assert ej.grant_probe(g, 5.0 + NO_JITTER.probe_timeout - 0.01, 2, NO_JITTER) is None
    # a grant is a pure function of the state it came from: the owner can compare-and-set
    assert ej.grant_probe(h, 5.0, prober=1, policy=NO_JITTER) == g


def test_an_unanswered_probe_expires_and_may_be_granted_again() -> None:
    g = ej.grant_probe(eject(0.0), 2.0, prober=1, policy=NO_JITTER)
    assert g is not None
    assert ej.on_tick(g, 2.0 + NO_JITTER.probe_timeout - 1, NO_JITTER) == g
    expired = ej.on_tick(g, 2.0 + NO_JITTER.probe_timeout, NO_JITTER)
    assert expired.state is Health.EJECTED and expired.prober == -1
    assert expired.ejections == g.ejections  # not a failure: no doubling
    again = ej.grant_probe(expired, 2.0 + NO_JITTER.probe_timeout, 2, NO_JITTER)
    assert again is not None and again.prober == 2


def test_probe_success_returns_the_endpoint() -> None:
    g = ej.grant_probe(eject(0.0), 1.0, prober=0, policy=NO_JITTER)
    assert g is not None
    h = ej.on_success(g, 1.2, NO_JITTER)
    assert h.state is Health.HEALTHY and not h.ejected and h.failures == 0
    assert h.ejections == 1  # remembered until it has been stable for a while


def test_probe_failure_ejects_again_with_a_doubled_backoff() -> None:
    now = 0.0
    h = eject(now)
    expected = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    for k, nominal in enumerate(expected, start=1):
        assert h.ejections == k
        assert h.until - now == pytest.approx(nominal)
        now = h.until
        g = ej.grant_probe(h, now, prober=0, policy=NO_JITTER)
        assert g is not None
        h = ej.on_failure(g, now, NO_JITTER, random.Random(0))
        assert h.state is Health.EJECTED


def test_ejection_count_resets_after_a_stable_period() -> None:
    g = ej.grant_probe(eject(0.0), 1.0, prober=0, policy=NO_JITTER)
    assert g is not None
    back = ej.on_success(g, 1.0, NO_JITTER)
    assert ej.on_tick(back, 1.0 + NO_JITTER.stable - 1, NO_JITTER).ejections == 1
    assert ej.on_tick(back, 1.0 + NO_JITTER.stable, NO_JITTER).ejections == 0
    # a quick relapse instead keeps doubling
    relapse = eject(2.0, h=back)
    assert relapse.ejections == 2 and relapse.until == pytest.approx(4.0)


def test_ejected_endpoint_ignores_outcomes_until_probed() -> None:
    h = eject(0.0)
    assert ej.on_success(h, 0.5, P) == h
    assert ej.on_failure(h, 0.5, P, random.Random(0)) == h
    assert ej.on_tick(h, 0.5, P) == h


@given(st.integers(1, 40), st.integers(0, 2**32))
def test_backoff_jitter_bounds(k: int, seed: int) -> None:
    rng = random.Random(seed)
    nominal = min(60.0, 2.0 ** (k - 1))
    b = ej.backoff(k, P, rng)
    assert 0.8 * nominal - 1e-9 <= b <= min(1.2 * nominal, 60.0) + 1e-9


def test_backoff_jitter_spreads() -> None:
    rng = random.Random(7)
    values = {round(ej.backoff(3, P, rng), 3) for _ in range(50)}
    assert len(values) > 40
    assert ej.backoff(10_000, P, rng) <= 60.0


def test_never_more_than_half_ejected() -> None:
    states = [HEALTHY] * 4
    rng = random.Random(0)
    now = 0.0
    for i in range(4):
        for _ in range(P.failures):
            states[i] = ej.on_failure(states[i], now, P, rng, ej.may_eject(states, i, P))
    assert ej.ejected_count(states) == 2
    assert [s.state for s in states] == [Health.EJECTED] * 2 + [Health.HEALTHY] * 2
    assert states[2].failures == P.failures  # refused, still counting
    assert not ej.may_eject([HEALTHY, HEALTHY, eject(0.0)], 0, P)  # 2 of 3 would be > half


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(list(Event))), max_size=200),
       st.integers(2, 7))
def test_at_most_half_holds_under_any_sequence(events: list[tuple[int, Event]],
                                               n: int) -> None:
    states = [HEALTHY] * n
    rng = random.Random(1)
    now = 0.0
    for index, event in events:
        i = index % n
        now += 0.3
        if event is Event.FAILURE:
            states[i] = ej.on_failure(states[i], now, P, rng, ej.may_eject(states, i, P))
        else:
            states[i] = ej.step(states[i], event, now, P, rng)
        granted = ej.grant_probe(states[i], now, prober=0, policy=P)
        if granted is not None:
            states[i] = granted
        assert ej.ejected_count(states) <= 0.5 * n
        assert sum(1 for s in states if s.state is Health.PROBING and s.prober >= 0) \
            == sum(1 for s in states if s.state is Health.PROBING)


def test_step_follows_the_table() -> None:
    rng = random.Random(0)
    h = HEALTHY
    for _ in range(P.failures):
        h = ej.step(h, Event.FAILURE, 0.0, P, rng)
    assert h.state is Health.EJECTED
    assert ej.step(h, Event.SUCCESS, 0.1, P, rng) == h  # (EJECTED, SUCCESS) not listed


def test_row_round_trip() -> None:
    g = ej.grant_probe(eject(3.0), 4.0, prober=5, policy=NO_JITTER)
    assert g is not None
    row = g.as_row()
    assert all(isinstance(x, int | float) for x in row)
    assert EndpointHealth.from_row([float(x) for x in row]) == g
    assert EndpointHealth.from_row([0.0] * 6) == HEALTHY  # a zeroed row
