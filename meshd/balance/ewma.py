"""Peak-EWMA latency estimate: the cost that the P2C balancer minimizes.

The algorithm is Finagle's ``PeakEwma`` load metric (finagle-core
``loadbalancer/PeakEwma.scala``), which tower's ``load/peak_ewma.rs`` ports and
linkerd2-proxy's balancer uses:

- The estimate is an exponentially weighted moving average of round-trip times over an
  unevenly spaced series: a sample that arrives ``dt`` after the previous one gets weight
  ``1 - exp(-dt / tau)`` (Eckner, "Algorithms for unevenly spaced time series").
- Peak rule: a sample above the current estimate replaces it at once, so one slow answer
  makes an endpoint expensive immediately, while recovery is gradual.
- Between samples the estimate decays towards zero with time constant ``tau`` (half-life
  ``tau * ln 2``): an endpoint the balancer avoids becomes cheap again and gets tried.
- Cost = estimate x (in-flight + 1): the work queued in front of one more request.
- An endpoint with no sample yet costs ``default_rtt`` (Linkerd2: 30 ms).

One difference from Finagle and tower, which need a lock for it: there, reading the cost
stores the decayed value. Here reading never writes, so that a state can be read by every
worker while only its owner writes it. ``observe`` applies the decay that those reads
would have applied (it compares the sample with the estimate decayed to ``now``).

State: ``EwmaState(rtt, stamp)``, two floats in seconds, ready for a shared-memory row
(``struct.pack("<dd", *state)``). ``rtt == 0.0`` (a zeroed row) means no sample yet; an
observed state always has ``rtt > 0``. ``stamp`` is the time of the last sample on the
same clock as ``now`` (CLOCK_MONOTONIC is system-wide, so workers can share it).

Across workers each worker writes its own stripe; a reader calls ``combine``, which takes
the highest estimate at ``now`` (the peak rule applied across workers: a slow answer seen
by any worker makes the endpoint expensive for all of them; stripes that see no traffic
decay to zero and stop mattering). In-flight counts are gauges that a reader sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

DECAY = 10.0          # tau, seconds (Linkerd2 and Finagle: 10 s)
DEFAULT_RTT = 0.030   # seconds, the cost of an endpoint with no sample (Linkerd2: 30 ms)
MIN_RTT = 1e-6        # a sample is at least 1 us, so an observed state never reads as empty


def decay(value: float, elapsed: float, tau: float = DECAY) -> float:
    """``value`` after ``elapsed`` seconds of exponential decay towards zero with time
    constant ``tau`` (it halves every ``tau * ln 2`` seconds). Negative ``elapsed``
    (clock skew between two writers) counts as zero."""
    if tau <= 0:
        raise ValueError("tau must be positive")
    if elapsed <= 0:
        return value
    return value * math.exp(-elapsed / tau)


class EwmaState(NamedTuple):
    """A peak-EWMA estimate: ``rtt`` seconds as of ``stamp``. Immutable; ``observe``
    returns the next state."""

    rtt: float = 0.0
    stamp: float = 0.0

    @property
    def observed(self) -> bool:
        return self.rtt > 0.0

    def estimate(self, now: float, tau: float = DECAY,
                 default_rtt: float = DEFAULT_RTT) -> float:
        """The estimate at ``now``: decayed since the last sample, or ``default_rtt``."""
        if not self.observed:
            return default_rtt
        return decay(self.rtt, now - self.stamp, tau)

    def observe(self, rtt: float, now: float, tau: float = DECAY) -> EwmaState:
        """The state after a response that took ``rtt`` seconds, completed at ``now``."""
        return EwmaState(*observed(self.rtt, self.stamp, rtt, now, tau))


def observed(state_rtt: float, stamp: float, rtt: float, now: float,
             tau: float = DECAY) -> tuple[float, float]:
    """``EwmaState(state_rtt, stamp).observe(rtt, now, tau)`` as a plain (rtt, stamp)
    pair, ``decay`` inlined: a shared-memory stripe records every response with this,
    no state object in between."""
    if tau <= 0:
        raise ValueError("tau must be positive")
    sample = rtt if rtt > MIN_RTT else MIN_RTT
    if not state_rtt > 0.0:   # not observed yet
        return sample, now
    elapsed = now - stamp
    w = math.exp(-elapsed / tau) if elapsed > 0 else 1.0
    current = state_rtt * w
    if sample > current:  # peak rule: the worse figure wins at once
        return sample, (now if now > stamp else stamp)
    return current + sample * (1.0 - w), (now if now > stamp else stamp)


UNOBSERVED = EwmaState(0.0, 0.0)


def seed(default_rtt: float, now: float) -> EwmaState:
    """A new endpoint's state as tower seeds it: ``default_rtt`` as if observed at
    ``now``, so that it decays and an endpoint nobody has tried yet becomes cheap enough
    to be tried. Leaving the state ``UNOBSERVED`` instead keeps the default constant."""
    return EwmaState(max(default_rtt, MIN_RTT), now)


def cost(state: EwmaState, inflight: int, now: float, default_rtt: float = DEFAULT_RTT,
         tau: float = DECAY) -> float:
    """Estimated seconds of work in front of one more request: estimate x (in-flight + 1)."""
    return state.estimate(now, tau, default_rtt) * (max(inflight, 0) + 1)


def combine(states: Iterable[EwmaState], now: float, tau: float = DECAY) -> EwmaState:
    """One state for readers from several writers' states (one per worker stripe): the
    highest estimate at ``now``. ``UNOBSERVED`` when no writer has a sample.

    Why the maximum: it is the peak rule across workers. An average would let one worker's
    fast, frequent samples hide another worker's timeouts; the most recent stripe alone
    would flap between workers. The maximum is never above what one process seeing all
    the traffic would hold just after the worst recent sample, and a stripe that stops
    receiving samples decays towards zero with the same ``tau``, so a stale peak fades
    exactly as it would in one process."""
    best = _peak(states, now, tau)
    return UNOBSERVED if best < 0.0 else EwmaState(max(best, MIN_RTT), now)


def peak_cost(states: Iterable[tuple[float, float]], inflight: int, now: float,
              default_rtt: float = DEFAULT_RTT, tau: float = DECAY) -> float:
    """``cost(combine(states, now, tau), inflight, now, default_rtt, tau)`` on plain
    ``(rtt, stamp)`` pairs (one per worker stripe), in one pass: the balancer's hot path
    calls this, with no state objects in between."""
    best = _peak(states, now, tau)
    estimate = default_rtt if best < 0.0 else max(best, MIN_RTT)
    return estimate * (max(inflight, 0) + 1)


def _peak(states: Iterable[tuple[float, float]], now: float, tau: float) -> float:
    """The highest of the observed states' estimates at ``now`` (``decay`` inlined: this
    runs for every candidate of every pick); -1.0 when none is observed."""
    if tau <= 0:
        raise ValueError("tau must be positive")
    best = -1.0
    for rtt, stamp in states:
        if rtt > 0.0:
            elapsed = now - stamp
            value = rtt * math.exp(-elapsed / tau) if elapsed > 0 else rtt
            if value > best:
                best = value
    return best


def total_inflight(counts: Iterable[int]) -> int:
    """In-flight requests to an endpoint from every worker's gauge (never negative)."""
    return max(sum(counts), 0)
