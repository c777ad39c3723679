"""The balancer's fast pick (every endpoint healthy: ``p2c.pick_among`` over the indexes
computed once per endpoint set) picks what the general ``p2c.pick`` picks from the same
random numbers, and a health change after the set was cached is seen on the next pick."""

from __future__ import annotations

import os
import random
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.balance import p2c
from meshd.balance.ejection import Health
from meshd.config import ServiceConfig
from meshd.discovery.api import Endpoint
from meshd.shm import KIND_WORKER, Region
from meshd.worker.balancer import SharedBalancer

_DIR = tempfile.mkdtemp(prefix="meshd-p2c-fast-")
REGION = Region.create(os.path.join(_DIR, "r.shm"), 8, 8, endpoint_rows=64)
REGION.claim_slot(0, 1, KIND_WORKER)
REGION.set_pid(0, 1000)


@settings(max_examples=400, deadline=None)
@given(weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), min_size=1, max_size=60),
       costs=st.lists(st.floats(0.0, 10.0), min_size=60, max_size=60),
       seed=st.integers(0, 2**32))
def test_pick_among_is_pick_with_nothing_ejected(weights, costs, seed):
    cands = [p2c.Candidate(w, False) for w in weights]
    usable = tuple(i for i, w in enumerate(weights) if w > 0)
    slow, fast = random.Random(seed), random.Random(seed)
    for _ in range(5):
        if not usable:
            for fn in (lambda: p2c.pick(cands, costs.__getitem__, slow),
                       lambda: p2c.pick_among(usable, weights, costs.__getitem__, fast)):
                try:
                    fn()
                except p2c.NoEndpoints:
                    continue
                raise AssertionError("no usable endpoint must raise")
            return
        assert p2c.pick(cands, costs.__getitem__, slow) == p2c.pick_among(
            usable, weights, costs.__getitem__, fast)
    assert slow.getstate() == fast.getstate()   # the same random numbers were used


def test_draw2_is_sample_of_two():
    for n in (2, 3, 20, 21, 22, 50, 1000):
        a, b = random.Random(n), random.Random(n)
        for _ in range(200):
            ja, jb = p2c.draw2(b, n)
            assert a.sample(range(n), 2) == [ja, jb]


def test_a_row_ejected_after_the_set_was_cached_is_skipped_at_once():
    eps = tuple(Endpoint(f"10.9.0.{i}", 80) for i in range(4))
    rows = {str(e): 40 + i for i, e in enumerate(eps)}
    for r in rows.values():
        REGION.set_health(r, (0.0,) * 6)
    bal = SharedBalancer(REGION, 0, rng=random.Random(7))
    svc = ServiceConfig(name="fast")
    seen = {bal.pick("fast", eps, rows, svc)[0] for _ in range(200)}
    assert seen == {0, 1, 2, 3}
    REGION.set_health(40, (float(Health.EJECTED), 3.0, 1.0, 1e12, 0.0, -1.0))
    try:
        picks = [bal.pick("fast", eps, rows, svc) for _ in range(200)]
        assert {i for i, _ in picks} == {1, 2, 3}
        assert bal.last[2] == 1   # the decisions record counts it as ejected
    finally:
        REGION.set_health(40, (0.0,) * 6)
    assert 0 in {bal.pick("fast", eps, rows, svc)[0] for _ in range(200)}
