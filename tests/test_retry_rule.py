"""The worker's retry decision is the sans-IO core's (meshd.balance.retry.attempt_refusal):
``meshd.worker.call.may_retry`` asks it, then the deadline and the shared budget. The
property holds it to the rule the data path applied before it asked the core."""

from __future__ import annotations

import time
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from meshd.balance.retry import Refusal, attempt_refusal
from meshd.worker import call as call_module

KINDS = ("connect", "reset", "timeout", "5xx", "4xx", "")


def _old_rule(kind: str, failure_on: frozenset[str], attempts_left: bool, replay: bool,
              body_replayable: bool) -> bool:
    """meshd.worker.dispatch.may_retry before the core (budget and deadline aside)."""
    if not attempts_left or kind not in failure_on:
        return False
    if kind != "connect" and not (replay and body_replayable):
        return False
    return True


class _Budget:
    def __init__(self) -> None:
        self.asked = 0

    def try_retry(self, row: int, live: list[int], now: float) -> bool:
        self.asked += 1
        return True


@given(st.sampled_from(KINDS), st.frozensets(st.sampled_from(KINDS[:5])), st.booleans(),
       st.booleans(), st.booleans(), st.booleans())
def test_the_hot_path_decides_as_the_core(kind, failure_on, attempts_left, replay,
                                          body_replayable, expired):
    core = attempt_refusal(kind, failure_on, attempts_left, replay, body_replayable) is None
    assert core == _old_rule(kind, failure_on, attempts_left, replay, body_replayable)
    budget = _Budget()
    worker = SimpleNamespace(retries=budget,
                             balancer=SimpleNamespace(live_slots=lambda now: [0]))
    call = SimpleNamespace(policy=SimpleNamespace(failure_on=failure_on), replay=replay,
                           body_replayable=lambda: body_replayable, row=2,
                           deadline=time.monotonic() + (-1 if expired else 60))
    assert call_module.may_retry(worker, call, kind, attempts_left) == (core and not expired)  # type: ignore[arg-type]
    assert budget.asked == (1 if core and not expired else 0)  # spent only when it may


def test_refusal_reasons():
    every = frozenset(KINDS[:5])
    assert attempt_refusal("5xx", every, False, True, True) is Refusal.NO_ATTEMPTS_LEFT
    assert attempt_refusal("4xx", frozenset({"5xx"}), True, True, True) is Refusal.NOT_A_FAILURE
    assert attempt_refusal("connect", every, True, False, False) is None
    assert attempt_refusal("reset", every, True, False, True) is Refusal.NOT_IDEMPOTENT
    assert attempt_refusal("timeout", every, True, True, False) is Refusal.BODY_NOT_BUFFERED


def test_never_processed_attempts_go_again_whatever_the_method():
    """A stream an HTTP/2 peer refused, or a request whose first write failed, never
    reached the application: sent again for any method (replay False: a POST), as long
    as its body can be sent again; "unsent" counts as a connect failure, "refused" as
    no failure at all."""
    every = frozenset(KINDS[:5])
    for kind in ("refused", "unsent"):
        assert attempt_refusal(kind, every, True, False, True) is None
        assert attempt_refusal(kind, every, True, False, False) is Refusal.BODY_NOT_BUFFERED
        assert attempt_refusal(kind, every, False, False, True) is Refusal.NO_ATTEMPTS_LEFT
    assert attempt_refusal("refused", frozenset(), True, False, True) is None
    assert attempt_refusal("unsent", frozenset({"5xx"}), True, False, True) is Refusal.NOT_A_FAILURE
    assert not call_module.counts_as_failure("refused", every)
    assert call_module.counts_as_failure("unsent", frozenset({"connect"}))
    assert not call_module.counts_as_failure("unsent", frozenset({"reset"}))


def test_error_kinds():
    from meshd.errors import NotSent, PeerSilent, StreamRefused, UpstreamError, UpstreamTimeout
    assert call_module.error_kind(StreamRefused("x")) == "refused"
    assert call_module.error_kind(NotSent("x")) == "unsent"
    assert call_module.error_kind(UpstreamError("x")) == "reset"
    assert call_module.error_kind(UpstreamTimeout("x")) == "timeout"
    assert call_module.error_kind(PeerSilent("x")) == "timeout"
