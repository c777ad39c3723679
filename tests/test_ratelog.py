"""meshd.ratelog: a burst per key per interval, the rest counted and reported once."""

import logging

from meshd.ratelog import MAX_KEYS, Throttle, flush_all


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _throttle(caplog, burst=3, interval=10.0):
    caplog.set_level(logging.INFO, logger="meshd.test.ratelog")
    clock = Clock()
    return Throttle(logging.getLogger("meshd.test.ratelog"), burst, interval, clock), clock


def test_a_burst_passes_then_lines_are_counted_and_reported_once(caplog):
    throttle, clock = _throttle(caplog)
    passed = [throttle.info("in: malformed", "line %d", i) for i in range(50)]
    assert passed == [True] * 3 + [False] * 47
    assert [r.getMessage() for r in caplog.records] == ["line 0", "line 1", "line 2"]
    clock.now += 10.0
    assert throttle.info("in: malformed", "line %d", 50)
    assert [r.getMessage() for r in caplog.records][3:] == [
        "in: malformed: 47 more similar lines suppressed in the last 10s", "line 50"]


def test_keys_are_throttled_apart(caplog):
    throttle, _ = _throttle(caplog, burst=1)
    assert throttle.warning("a", "a1") and throttle.warning("b", "b1")
    assert not throttle.warning("a", "a2")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]


def test_a_quiet_interval_reports_nothing_suppressed(caplog):
    throttle, clock = _throttle(caplog, burst=2)
    throttle.info("k", "one")
    clock.now += 60
    throttle.info("k", "two")
    assert [r.getMessage() for r in caplog.records] == ["one", "two"]


def test_keys_are_bounded(caplog):
    throttle, _ = _throttle(caplog, burst=1)
    for i in range(MAX_KEYS + 50):
        throttle.info(f"k{i}", "x")
    assert len(throttle._windows) == MAX_KEYS
    assert throttle.info("k0", "again")  # forgotten, so a fresh window


def test_a_burst_followed_by_silence_is_reported_by_flush(caplog):
    """No line after the burst: the heartbeat's flush reports its count once the interval
    is over, at the level of the suppressed lines, and only once."""
    throttle, clock = _throttle(caplog, burst=2)
    for i in range(9):
        throttle.warning("in: refused", "refused %d", i)
    assert throttle.flush() == 0          # the interval is not over yet
    clock.now += 10.0
    assert flush_all() >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused 0", "refused 1",
                        "in: refused: 7 more similar lines suppressed in the last 10s"]
    assert caplog.records[-1].levelno == logging.WARNING
    clock.now += 30.0
    assert throttle.flush() == 0          # reported once
    assert throttle.warning("in: refused", "refused again")
