"""P2C, smooth weighted round robin and the consistent-hash ring, with plain values."""

from __future__ import annotations

import functools
import heapq
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.balance import ewma, p2c
from meshd.balance.p2c import Candidate, ConsistentHash, RoundRobin
from meshd.errors import NoEndpoints

Latency = Callable[[int, float], float]


def cost_at(states: list[ewma.EwmaState], inflight: list[int], now: float, j: int) -> float:
    return ewma.cost(states[j], inflight[j], now)


def simulate(latency: Latency, weights: Sequence[float], seconds: float, rate: float,
             seed: int = 1) -> dict[int, Counter[int]]:
    """Open-loop load at ``rate`` req/s on a fake clock: each pick adds one in-flight
    request that completes ``latency(endpoint, now)`` later (with +-50 % jitter) and
    feeds the endpoint's peak-EWMA, seeded with the default RTT as tower seeds it.
    Returns the picks per endpoint in each whole second."""
    rng = random.Random(seed)
    jitter = random.Random(seed + 1)
    cands = [Candidate(w) for w in weights]
    states = [ewma.seed(ewma.DEFAULT_RTT, 0.0)] * len(weights)
    inflight = [0] * len(weights)
    pending: list[tuple[float, int, float]] = []  # (done at, endpoint, sent at)
    per_second: dict[int, Counter[int]] = {}
    for n in range(int(seconds * rate)):
        now = (n + 1) / rate
        while pending and pending[0][0] <= now:
            done, i, sent = heapq.heappop(pending)
            inflight[i] -= 1
            states[i] = states[i].observe(done - sent, done)
        i = p2c.pick(cands, functools.partial(cost_at, states, inflight, now), rng)
        per_second.setdefault(int(now), Counter())[i] += 1
        inflight[i] += 1
        heapq.heappush(pending, (now + latency(i, now) * jitter.uniform(0.5, 1.5), i, now))
    return per_second


def share(per_second: dict[int, Counter[int]], endpoint: int, start: int, stop: int) -> float:
    total: Counter[int] = Counter()
    for t in range(start, stop):
        total.update(per_second.get(t, Counter()))
    return total[endpoint] / sum(total.values())


def test_the_slow_endpoint_gets_under_ten_percent() -> None:
    """One endpoint of four answers in 50 ms, the others in 1 ms: of 10,000 requests
    (10 s at 1,000 req/s), the slow one gets under 10 %."""
    per_s = simulate(lambda i, now: 0.050 if i == 2 else 0.001, [1, 1, 1, 1], 10, 1000.0)
    assert sum(sum(c.values()) for c in per_s.values()) == 10_000
    assert share(per_s, 2, 0, 10) < 0.10


def test_the_slow_endpoint_wins_its_share_back_when_it_recovers() -> None:
    """Slow for 20 s, then as fast as the others. Recovery is bounded by the decay: the
    slow figure must fade to the others' (tau ln(50 ms / 1.5 ms), about 35 s, less the
    help of in-flight counts); at 1,000 req/s it has won back most of its share (a third)
    within 30 to 40 s."""
    per_s = simulate(lambda i, now: 0.050 if i == 2 and now < 20 else 0.001,
                     [1, 1, 1], 60, 1000.0)
    assert share(per_s, 2, 5, 20) < 0.05
    assert share(per_s, 2, 50, 60) > 0.12


def test_a_clearly_cheaper_endpoint_always_wins_its_pair() -> None:
    rng = random.Random(0)
    costs = [1.0, 5.0]
    assert {p2c.pick([Candidate()] * 2, costs.__getitem__, rng) for _ in range(100)} == {0}


def test_weights_two_to_one_give_about_two_to_one() -> None:
    per_s = simulate(lambda i, now: 0.010, [2, 2, 1, 1], 5, 4000.0)
    heavy = share(per_s, 0, 1, 5) + share(per_s, 1, 1, 5)
    light = share(per_s, 2, 1, 5) + share(per_s, 3, 1, 5)
    assert 1.6 < heavy / light < 2.6, (heavy, light)


def test_weight_zero_is_never_chosen_and_none_left_raises() -> None:
    rng = random.Random(0)
    cands = [Candidate(0), Candidate(1), Candidate(0)]
    assert {p2c.pick(cands, lambda j: 1.0, rng) for _ in range(50)} == {1}
    with pytest.raises(NoEndpoints):
        p2c.pick([Candidate(0), Candidate(0)], lambda j: 1.0, rng)
    with pytest.raises(NoEndpoints):
        p2c.pick([], lambda j: 1.0, rng)


def test_ejected_endpoints_are_skipped_up_to_half() -> None:
    rng = random.Random(0)
    cands = [Candidate(1, True), Candidate(1, True), Candidate(), Candidate()]
    assert not p2c.in_panic(cands)
    assert {p2c.pick(cands, lambda j: 1.0, rng) for _ in range(200)} == {2, 3}


def test_panic_mode_uses_every_endpoint_when_more_than_half_are_ejected() -> None:
    rng = random.Random(0)
    cands = [Candidate(1, True), Candidate(1, True), Candidate(1, True), Candidate()]
    assert p2c.in_panic(cands)
    assert {p2c.pick(cands, lambda j: 1.0, rng) for _ in range(200)} == {0, 1, 2, 3}
    # weight-0 endpoints count for nothing, ejected or not
    assert p2c.eligible([Candidate(0, True), Candidate(0, True), Candidate()]) == [2]


candidate_lists = st.lists(
    st.builds(Candidate, st.sampled_from([0.0, 0.5, 1.0, 3.0]), st.booleans()),
    min_size=1, max_size=12)


@given(candidate_lists, st.lists(st.floats(0.0, 10.0), min_size=12, max_size=12),
       st.integers(0, 2**32))
def test_p2c_never_picks_weight_zero_nor_ejected_outside_panic(
        cands: list[Candidate], costs: list[float], seed: int) -> None:
    rng = random.Random(seed)
    try:
        i = p2c.pick(cands, costs.__getitem__, rng)
    except NoEndpoints:
        assert all(c.weight == 0 for c in cands)
        return
    assert cands[i].weight > 0
    if not p2c.in_panic(cands):
        assert not cands[i].ejected


def test_smooth_weighted_round_robin_sequence() -> None:
    rr = RoundRobin()
    cands = [Candidate(5), Candidate(1), Candidate(1)]
    seq = "".join("abc"[rr.pick(cands)] for _ in range(14))
    assert seq == "aabacaa" * 2


def test_round_robin_equal_weights_rotate_and_skip_zero_and_ejected() -> None:
    rr = RoundRobin()
    cands = [Candidate(), Candidate(0), Candidate(), Candidate(1, True), Candidate()]
    assert [rr.pick(cands) for _ in range(6)] == [0, 2, 4, 0, 2, 4]


def test_round_robin_restarts_on_a_new_endpoint_set_and_raises_when_empty() -> None:
    rr = RoundRobin()
    rr.pick([Candidate(5), Candidate(1)])
    assert [rr.pick([Candidate(1)] * 3) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(NoEndpoints):
        rr.pick([Candidate(0)])


@given(st.lists(st.integers(0, 6), min_size=1, max_size=8))
def test_round_robin_shares_are_exact_over_one_cycle(weights: list[int]) -> None:
    rr = RoundRobin()
    cands = [Candidate(w) for w in weights]
    total = sum(weights)
    if total == 0:
        return
    counts = Counter(rr.pick(cands) for _ in range(total))
    assert counts == Counter({i: w for i, w in enumerate(weights) if w})


ADDRS = [f"10.0.0.{i}:8080" for i in range(10)]
KEYS = [f"user-{i}".encode() for i in range(10_000)]


def owners(ring: ConsistentHash, addrs: list[str]) -> list[str]:
    return [addrs[ring.pick(k)] for k in KEYS]


def test_consistent_hash_is_stable_and_spread() -> None:
    a = owners(ConsistentHash(ADDRS), ADDRS)
    assert a == owners(ConsistentHash(ADDRS), ADDRS)
    per = Counter(a)
    assert len(per) == 10
    assert all(500 < n < 1500 for n in per.values()), per


def test_adding_an_endpoint_moves_only_keys_to_it() -> None:
    before = owners(ConsistentHash(ADDRS), ADDRS)
    grown = [*ADDRS, "10.0.0.99:8080"]
    after = owners(ConsistentHash(grown), grown)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == "10.0.0.99:8080" for _, a in moved)
    assert 0.05 < len(moved) / len(KEYS) < 0.14  # about 1/11


def test_removing_an_endpoint_moves_only_its_keys() -> None:
    before = owners(ConsistentHash(ADDRS), ADDRS)
    shrunk = [a for a in ADDRS if a != "10.0.0.3:8080"]
    after = owners(ConsistentHash(shrunk), shrunk)
    for b, a in zip(before, after, strict=True):
        if b != "10.0.0.3:8080":
            assert a == b


def test_an_ejected_endpoints_keys_go_elsewhere_and_others_stay() -> None:
    ring = ConsistentHash(ADDRS)
    cands = [Candidate(1, i == 4) for i in range(10)]
    for k in KEYS[:2000]:
        plain = ring.pick(k)
        skipping = ring.pick(k, cands)
        assert skipping != 4
        if plain != 4:
            assert skipping == plain


def test_consistent_hash_weights_and_empty_ring() -> None:
    ring = ConsistentHash(["a:1", "b:1", "c:1"], weights=[2, 1, 0])
    per = Counter(ring.pick(k) for k in KEYS)
    assert 2 not in per
    assert 1.6 < per[0] / per[1] < 2.5, per
    with pytest.raises(NoEndpoints):
        ConsistentHash([]).pick(b"x")
    with pytest.raises(ValueError):
        ConsistentHash(["a:1"], weights=[1, 2])
