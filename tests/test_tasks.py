"""The reused greenlets of meshd.worker.tasks: reuse, cancellation of the right task only."""

from __future__ import annotations

import gc
import weakref

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


def test_a_cancel_after_the_task_ended_is_a_no_op() -> None:
    pool = TaskPool()
    ran: list[str] = []
    t1 = pool.spawn(ran.append, "first")
    gevent.sleep(0)
    assert t1.ended
    t1.cancel(Stop())
    t2 = pool.spawn(ran.append, "second")
    gevent.sleep(0.01)
    assert t2.runner is t1.runner and t2.ended and ran == ["first", "second"]


def test_a_cancel_in_flight_never_reaches_the_next_task_on_the_same_greenlet(
        caplog: pytest.LogCaptureFixture) -> None:
    """The cancel of the first task is queued while it runs; before it is delivered the
    first task ends and its greenlet takes a second, longer one: the second runs to its
    end (the delivery finds its task gone)."""
    pool = TaskPool()
    gate = gevent.event.Event()
    second: list[str] = []
    tasks: list[object] = []

    def long() -> None:
        gevent.sleep(0.05)
        second.append("done")

    t1 = pool.spawn(gate.wait)
    gevent.sleep(0)
    gate.set()          # the task wakes at the next loop iteration...
    t1.cancel(Stop())   # ...the cancel is queued behind that wakeup...
    gate.rawlink(lambda _: tasks.append(pool.spawn(long)))  # ...and so is the next task
    gevent.sleep(0.1)
    (t2,) = tasks
    assert t1.ended and t2.runner is t1.runner  # type: ignore[attr-defined]
    assert second == ["done"] and t2.ended  # type: ignore[attr-defined]
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


class _Held:
    """Stands for what a stream's frames hold (sockets, buffers, exchanges)."""


def test_a_cancelled_task_leaves_nothing_to_the_garbage_collector() -> None:
    """A task cancelled mid-way (a client gone): once it ended, what its frames held is
    freed by reference counting. The cancelling exception's traceback holds every frame
    of the task, one of which names the exception (a cycle, as ``call.py`` keeps the
    client's fault), and the idle greenlet kept its last task: the frames of up to
    ``keep`` cancelled streams stayed, then waited for a full collection (issue 20)."""
    pool = TaskPool(keep=4)
    refs: list[weakref.ref[_Held]] = []

    def job() -> None:
        held = _Held()
        refs.append(weakref.ref(held))
        try:
            gevent.sleep(10)
        except Stop as e:
            fault = e  # noqa: F841  a local naming the exception, as call.py's attempt has
            raise

    gc.collect()
    gc.disable()
    try:
        tasks = [pool.spawn(job) for _ in range(3)]
        gevent.sleep(0)
        for task in tasks:
            task.cancel(Stop())
        gevent.sleep(0.01)
        assert all(t.ended for t in tasks) and len(pool.idle) == 3
        assert len(refs) == 3 and [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
