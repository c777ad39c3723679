"""SharedBalancer: a failure counts toward the failure_accrual of the service the
request belonged to, not of whichever service the worker picked for last."""

from __future__ import annotations

from meshd.config import ServiceConfig
from meshd.discovery.api import Endpoint
from meshd.shm import Region
from meshd.worker.balancer import SharedBalancer


def test_failures_count_toward_their_own_services_accrual(tmp_path):
    region = Region.create(str(tmp_path / "r.shm"), 4, 8, endpoint_rows=16)
    region.claim_slot(0, 1, 1)
    bal = SharedBalancer(region, 0)
    strict = ServiceConfig(name="strict", failure_accrual=2)
    lenient = ServiceConfig(name="lenient", failure_accrual=100)
    a, b = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)
    rows = {str(a): 0, str(b): 1}
    # a strict request to a, then a lenient pick (the last pick) before a's failures end
    bal.pick("strict", (a,), rows, strict)
    bal.pick("lenient", (b,), rows, lenient)
    for _ in range(2):
        bal.started(0)
        bal.finished(0, None, True, strict)
    assert 0 in bal._tripped  # 2 failures reach strict's accrual of 2
    for _ in range(5):
        bal.started(1)
        bal.finished(1, None, True, lenient)
    assert 1 not in bal._tripped  # 5 of lenient's 100
