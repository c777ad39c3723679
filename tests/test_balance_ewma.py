"""Peak-EWMA math with plain values and a fake clock; the balance package is sans-IO."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import meshd.balance
from meshd.balance import ewma
from meshd.balance.ewma import DECAY, DEFAULT_RTT, UNOBSERVED, EwmaState

HALF_LIFE = DECAY * math.log(2)


def test_decay_halves_every_half_life() -> None:
    assert ewma.decay(0.1, HALF_LIFE) == pytest.approx(0.05)
    assert ewma.decay(0.1, 2 * HALF_LIFE) == pytest.approx(0.025)
    assert ewma.decay(0.1, DECAY) == pytest.approx(0.1 / math.e)


def test_decay_of_no_time_or_negative_time_is_none() -> None:
    assert ewma.decay(0.1, 0.0) == 0.1
    assert ewma.decay(0.1, -5.0) == 0.1


def test_decay_needs_a_positive_tau() -> None:
    with pytest.raises(ValueError):
        ewma.decay(1.0, 1.0, tau=0.0)


def test_a_new_endpoint_costs_the_default_rtt() -> None:
    assert not UNOBSERVED.observed
    assert ewma.cost(UNOBSERVED, 0, now=1000.0) == DEFAULT_RTT
    assert ewma.cost(UNOBSERVED, 2, now=1000.0) == pytest.approx(3 * DEFAULT_RTT)
    # a zeroed shared-memory row is the same thing
    assert EwmaState(*(0.0, 0.0)) == UNOBSERVED


def test_a_seeded_default_decays_so_an_untried_endpoint_gets_tried() -> None:
    s = ewma.seed(DEFAULT_RTT, now=100.0)
    assert s.estimate(100.0) == pytest.approx(DEFAULT_RTT)
    assert s.estimate(100.0 + HALF_LIFE) == pytest.approx(DEFAULT_RTT / 2)


def test_first_sample_is_the_estimate() -> None:
    s = UNOBSERVED.observe(0.004, now=10.0)
    assert s == EwmaState(0.004, 10.0)


def test_peak_rule_a_higher_sample_replaces_the_average_at_once() -> None:
    s = EwmaState(0.010, 10.0)
    s = s.observe(0.500, now=10.001)
    assert s.rtt == 0.500
    assert ewma.cost(s, 0, now=10.001) == pytest.approx(0.5)


def test_a_lower_sample_pulls_the_estimate_down_by_elapsed_time() -> None:
    s = EwmaState(0.100, 0.0)
    after = s.observe(0.0, now=HALF_LIFE)          # decayed half, then blended with 0
    assert after.rtt == pytest.approx(0.050, rel=1e-3)
    blended = s.observe(0.040, now=HALF_LIFE)      # 0.1 * 0.5 + 0.04 * 0.5
    assert blended.rtt == pytest.approx(0.070)
    assert blended.stamp == HALF_LIFE


def test_samples_close_together_move_the_estimate_little() -> None:
    s = EwmaState(0.100, 0.0).observe(0.010, now=0.010)
    assert 0.0999 < s.rtt < 0.1


def test_a_steady_endpoint_converges_to_its_latency() -> None:
    s = UNOBSERVED.observe(0.200, now=0.0)  # one slow start
    now = 0.0
    for _ in range(10_000):                  # 100 s of 10 ms answers, one every 10 ms
        now += 0.01
        s = s.observe(0.010, now)
    assert s.estimate(now) == pytest.approx(0.010, rel=0.01)


def test_cost_is_estimate_times_inflight_plus_one() -> None:
    s = EwmaState(0.020, 5.0)
    assert ewma.cost(s, 0, 5.0) == pytest.approx(0.020)
    assert ewma.cost(s, 4, 5.0) == pytest.approx(0.100)
    assert ewma.cost(s, 4, 5.0 + HALF_LIFE) == pytest.approx(0.050)
    assert ewma.cost(s, -3, 5.0) == pytest.approx(0.020)  # a torn gauge is not a bonus


def test_combine_takes_the_highest_estimate_now() -> None:
    slow_but_old = EwmaState(0.400, 0.0)
    fast_recent = EwmaState(0.010, 2 * DECAY)
    now = 2 * DECAY
    c = ewma.combine([slow_but_old, UNOBSERVED, fast_recent], now)
    assert c.estimate(now) == pytest.approx(0.400 * math.exp(-2))
    # long after, the stale peak has faded below the fresh figure
    later = 6 * DECAY
    fast_later = EwmaState(0.010, later)
    c = ewma.combine([slow_but_old, fast_later], later)
    assert c.estimate(later) == pytest.approx(0.010)


def test_combine_of_nothing_observed_is_unobserved() -> None:
    assert ewma.combine([], 5.0) == UNOBSERVED
    assert ewma.combine([UNOBSERVED, UNOBSERVED], 5.0) == UNOBSERVED


def test_total_inflight_sums_and_never_goes_negative() -> None:
    assert ewma.total_inflight([1, 2, 3]) == 6
    assert ewma.total_inflight([-1, 0]) == 0


@given(st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 1.0)), min_size=1,
                max_size=50))
def test_estimate_stays_within_the_samples(samples: list[tuple[float, float]]) -> None:
    """Never above the largest sample, never negative, and always observed."""
    s = UNOBSERVED
    now = 0.0
    for rtt, gap in samples:
        now += gap
        s = s.observe(rtt, now)
        assert s.observed
        assert 0.0 < s.estimate(now) <= max(max(r for r, _ in samples), ewma.MIN_RTT) + 1e-12


@given(st.floats(1e-6, 10.0), st.floats(0.0, 100.0), st.floats(0.0, 100.0))
def test_a_sample_above_the_current_estimate_becomes_it(rtt: float, stamp: float,
                                                        gap: float) -> None:
    s = EwmaState(rtt / 2, stamp)
    assert s.observe(rtt, stamp + gap).estimate(stamp + gap) == pytest.approx(rtt)


# -- the package is sans-IO ---------------------------------------------------------------

ALLOWED_IMPORTS = {"__future__", "math", "random", "hashlib", "bisect", "enum", "typing",
                   "dataclasses", "collections", "meshd"}
MODULES = sorted(Path(meshd.balance.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_balance_modules_import_no_io_and_no_clock(path: Path) -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, f"{path.name} imports {imported - ALLOWED_IMPORTS}"
    meshd_imports = {n.module for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.ImportFrom) and n.module
                     and n.module.startswith("meshd")}
    assert meshd_imports <= {"meshd.errors", "meshd.balance"} | {
        f"meshd.balance.{p.stem}" for p in MODULES}


def test_importing_the_package_loads_no_io_module() -> None:
    """(``time`` is loaded by the interpreter itself; the source check above covers it.)"""
    code = ("import sys; import meshd.balance.ewma, meshd.balance.p2c, "
            "meshd.balance.ejection, meshd.balance.budget, meshd.balance.retry, "
            "meshd.balance.window; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'gevent', 'socket', 'ssl', 'select', 'selectors', 'asyncio'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""
