"""Balancer and resilience policy cores: which endpoint, whether to retry, when to eject.

Everything here is sans-IO and clock-free: plain values in, plain values out. Every
function that depends on time takes ``now`` (seconds, CLOCK_MONOTONIC in production, a
fake clock in tests); every random choice goes through an injected ``random.Random``. No
module imports sockets, gevent, ssl or time, so the same code runs in a worker, in the
control process and in a unit test.

- ``ewma``: peak-EWMA latency estimate (Finagle, tower/Linkerd2) as a two-float state
  that fits a shared-memory stripe, and how a reader combines several workers' stripes.
- ``p2c``: power of two choices over that cost, with weights and panic mode; the
  alternatives: smooth weighted round robin (nginx) and a consistent-hash ring (Ketama).
- ``ejection``: failure accrual as an explicit state machine (HEALTHY, EJECTED, PROBING)
  with jittered exponential backoff, a single probe, and the at-most-half rule.
- ``budget``: the retry budget (Finagle/Linkerd: a ratio of requests plus a floor per
  second over a window) as per-bucket counters that workers write and a reader sums;
  Envoy's jittered retry backoff.
- ``retry``: which requests may be retried at all (RFC 9110 idempotency, replayable
  body, nothing sent to the client yet).
- ``window``: how far cumulative counters moved over the last seconds, from samples of
  their totals (a worker's shared retry budget, the control process's recent success
  rate of an endpoint).

Where the state lives (which shared-memory row, which writer) is the caller's business;
each module says what its state is made of so that it can be stored as plain numbers.
"""
