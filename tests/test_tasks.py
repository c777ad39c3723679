"""The reused greenlets of meshd.worker.tasks: reuse, cancellation of the right task only."""

from __future__ import annotations

import gevent
import gevent.event
import pytest

from meshd.worker.tasks import TaskPool


class Stop(gevent.GreenletExit):
    pass


def test_tasks_run_and_their_greenlets_are_reused() -> None:
    pool = TaskPool(keep=4)
    seen: list[object] = []
    for i in range(10):
        pool.spawn(lambda n: seen.append((n, gevent.getcurrent())), i)
        gevent.sleep(0)
    assert [n for n, _ in seen] == list(range(10))
    assert len({id(g) for _, g in seen}) == 1  # one greenlet ran all ten, one after another
    assert len(pool.idle) == 1


def test_idle_greenlets_are_bounded() -> None:
    pool = TaskPool(keep=3)
    gate = gevent.event.Event()
    tasks = [pool.spawn(gate.wait) for _ in range(8)]
    gevent.sleep(0)
    assert not pool.idle and not any(t.ended for t in tasks)
    gate.set()
    gevent.sleep(0.01)
    assert all(t.ended for t in tasks)
    assert len(pool.idle) == 3  # the other five greenlets ended


def test_cancel_interrupts_a_running_task() -> None:
    pool = TaskPool()
    reached: list[str] = []

    def job() -> None:
        try:
            gevent.sleep(10)
            reached.append("slept")
        finally:
            reached.append("cleanup")

    task = pool.spawn(job)
    gevent.sleep(0)
    task.cancel(Stop())
    gevent.sleep(0)
    assert task.ended and reached == ["cleanup"]


def test_a_task_cancelled_before_it_starts_does_not_run() -> None:
    pool = TaskPool()
    ran: list[int] = []
    task = pool.spawn(ran.append, 1)
    task.cancel(Stop())
    gevent.sleep(0)
    assert task.ended and ran == []


def test_a_late_cancel_never_reaches_the_next_task_on_the_same_greenlet() -> None:
    """The first task ends, the greenlet takes a second one; cancelling the first then
    (and a cancel already on its way when the first ended) leaves the second alone."""
    pool = TaskPool()
    first_done = gevent.event.Event()
    second: list[str] = []

    def first() -> None:
        first_done.set()

    def long() -> None:
        gevent.sleep(0.05)
        second.append("done")

    t1 = pool.spawn(first)
    first_done.wait()
    t1.cancel(Stop())          # t1 ended: a no-op
    t2 = pool.spawn(long)
    gevent.sleep(0)
    assert t2.runner is t1.runner
    t1.cancel(Stop())
    gevent.sleep(0.1)
    assert second == ["done"] and t2.ended


def test_a_cancel_in_flight_when_the_task_ends_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    pool = TaskPool()
    gate = gevent.event.Event()
    after: list[str] = []

    def job() -> None:
        gate.wait()

    t1 = pool.spawn(job)
    gevent.sleep(0)
    gate.set()          # wakes the task at the next loop iteration...
    t1.cancel(Stop())   # ...and the cancel is queued behind that wakeup
    gevent.sleep(0.01)
    assert t1.ended
    t2 = pool.spawn(after.append, "ran")
    gevent.sleep(0.01)
    assert after == ["ran"] and t2.ended
    assert "failed" not in caplog.text


def test_an_exception_in_a_task_is_logged_and_the_greenlet_kept(
        caplog: pytest.LogCaptureFixture) -> None:
    pool = TaskPool()

    def boom() -> None:
        raise ValueError("boom")

    task = pool.spawn(boom)
    gevent.sleep(0)
    assert task.ended and "boom" in caplog.text
    assert len(pool.idle) == 1
