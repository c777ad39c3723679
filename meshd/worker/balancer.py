"""Choosing an endpoint in a worker, from the state every worker shares.

P2C over peak-EWMA (``meshd.balance``): two endpoints drawn at random, the cheaper wins,
cost = the highest decayed RTT estimate any live worker holds x (in-flight requests of
all live workers + 1), divided by the endpoint's weight. Ejected endpoints are skipped
unless more than half of a service's are out (panic: use all). A PROBING endpoint is
sent exactly one request, by the worker the control process granted the probe to.
``round_robin`` services use smooth weighted round robin with the same ejection rule;
``consistent_hash`` ones a hash ring (``meshd.balance.p2c.ConsistentHash``) over the
request's key (its client address or a header), skipping ejected endpoints, and P2C for
a request without the key.

Limits: with ``max_pending``, an endpoint whose in-flight requests (all workers) reached
it is not chosen; when every endpoint is full, ``EndpointsBusy`` (503) at once.
``max_connections`` is checked by the pool when it would open a connection, against
the upstream connections all workers have in use (``EP_CONNS`` gauges).

Failure accrual: each worker keeps its run of consecutive failures per endpoint in
its stripe (``EP_RUN``); when the runs of all live workers add up to
``failure_accrual``, the worker that sees it stops choosing the endpoint at once
(for up to LOCAL_TRIP), before the control process's next tick ejects it for all.

Reads go through the region's ``EndpointView`` (``meshd.shm``: each field has one
writer; a health row that is not HEALTHY is copied under its seqlock). The cost and the
probe rule are the sans-IO cores' own (``ewma.peak_cost``: ``ewma.cost`` over
``ewma.combine`` of the stripes; ``ejection.holds_probe``). Endpoints without a row (the region is full) cost
the default RTT and are never ejected.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence

from meshd import decisions
from meshd.balance import ewma, p2c
from meshd.balance.ejection import Health, holds_probe
from meshd.balance.ewma import DECAY, DEFAULT_RTT
from meshd.config import DEFAULT_SERVICE, ServiceConfig
from meshd.discovery.api import Endpoint
from meshd.errors import EndpointsBusy, NoEndpoints
from meshd.shm import EP_CONNS, EP_INFLIGHT, EP_RUN, KIND_WORKER, EndpointView, Region

LIVE_REFRESH = 1.0
LOCAL_TRIP = 2.0   # a worker's own trip of failure accrual holds this long at most
_HEALTHY, _PROBING = float(Health.HEALTHY), float(Health.PROBING)
_NO_CANDIDATES = decisions.NO_CANDIDATE * 2


class _ServiceState:
    __slots__ = ("endpoints", "rows", "weights", "rr", "_ring", "names", "all_rows",
                 "usable", "states")

    def __init__(self, endpoints: Sequence[Endpoint], rows: tuple[int, ...],
                 view: EndpointView) -> None:
        self.endpoints = endpoints
        self.rows = rows
        self.all_rows = all(r >= 0 for r in rows)   # else some show "no_row" in decisions
        self.weights = tuple(float(e.weight) for e in endpoints)
        # What a pick needs when every endpoint is healthy, once per endpoint set: the
        # indexes P2C draws from (weight > 0), and where the rows' states are.
        self.usable = tuple(i for i, w in enumerate(self.weights) if w > 0)
        self.states = view.state_positions([r for r in rows if r >= 0])
        self.rr = p2c.RoundRobin()
        self._ring: p2c.ConsistentHash | None = None
        # The endpoints' addresses as the decisions ring stores them, encoded once per
        # endpoint set (read on every pick: an attribute, not a property).
        self.names = tuple(str(e).encode("utf-8", "replace") for e in endpoints)

    @property
    def ring(self) -> p2c.ConsistentHash:
        if self._ring is None:
            self._ring = p2c.ConsistentHash([str(e) for e in self.endpoints], self.weights)
        return self._ring


class SharedBalancer:
    def __init__(self, region: Region, slot: int, tau: float = DECAY,
                 default_rtt: float = DEFAULT_RTT, rng: random.Random | None = None) -> None:
        self.region = region
        self.slot = slot
        self.tau = tau
        self.default_rtt = default_rtt
        self.rng = rng or random.Random()
        self.view = region.endpoint_view()
        self.stripe = region.ep_stripe(slot)
        self.stripe.tau, self.stripe.default_rtt = tau, default_rtt
        self._live: list[int] = []
        self._live_at = -LIVE_REFRESH
        self._services: dict[str, _ServiceState] = {}
        self._probed: dict[int, float] = {}   # row -> the grant ("since") I answered
        self._tripped: dict[int, float] = {}  # row -> when the shared run reached failure_accrual
        # service -> (its endpoint tuple, start -> the run of endpoints of one split)
        self._subs: dict[str, tuple[Sequence[Endpoint] | None, dict[int, tuple[Endpoint, ...]]]] = {}
        # What the last pick saw, as the tail of a decisions record (meshd.decisions):
        # read by the attempt right after ``pick`` returns, before any greenlet switch.
        self.last: tuple[object, ...] = ()

    def live_slots(self, now: float) -> list[int]:
        if now - self._live_at >= LIVE_REFRESH:
            self._live = [s.index for s in self.region.slots_in_use() if s.kind == KIND_WORKER]
            if self.slot not in self._live:
                self._live.append(self.slot)
            self._live_at = now
        return self._live

    def _state(self, service: str, endpoints: Sequence[Endpoint],
               endpoint_rows: Mapping[str, int]) -> _ServiceState:
        st = self._services.get(service)
        if st is None or st.endpoints is not endpoints:
            rows = tuple(endpoint_rows.get(str(e), -1) for e in endpoints)
            now = time.monotonic()
            for r in rows:
                if r >= 0:
                    self.stripe.seed(r, now)
            old = st
            st = self._services[service] = _ServiceState(endpoints, rows, self.view)
            if old is not None and old.rows == rows and tuple(old.endpoints) == tuple(endpoints):
                # The same endpoints in a new snapshot (the control process publishes one
                # for many reasons): round robin goes on where it was, not from the first.
                st.rr = old.rr
        return st

    def started(self, row: int) -> None:
        if row >= 0:
            self.stripe.started(row)

    def finished(self, row: int, rtt: float | None, failed: bool,
                 svc: ServiceConfig | None) -> None:
        """A request of service ``svc`` to the endpoint of ``row`` ended (``rtt``: time to
        its response head); a failure counts toward that service's failure_accrual."""
        if row < 0:
            return
        now = time.monotonic()
        self.stripe.finished(row, rtt, now, failed)
        if failed:
            accrual = (svc or DEFAULT_SERVICE).failure_accrual or 1 << 30
            if row not in self._tripped and self.shared_run(row, now) >= accrual:
                self._tripped[row] = now
        elif self._tripped:
            self._tripped.pop(row, None)

    def shared_run(self, row: int, now: float) -> int:
        """Consecutive failures of the endpoint of ``row``, summed over every live
        worker's own run: failure_accrual trips on the failures all workers saw."""
        return self._sum(row, EP_RUN, self.live_slots(now))

    def inflight(self, row: int, live: list[int]) -> int:
        """In-flight requests to the endpoint of ``row`` over all live workers."""
        return self._sum(row, EP_INFLIGHT, live)

    def connections(self, row: int) -> int:
        """Upstream connections in use to the endpoint of ``row`` over all live workers."""
        return self._sum(row, EP_CONNS, self.live_slots(time.monotonic()))

    def _sum(self, row: int, field: int, live: list[int]) -> int:
        """One endpoint field summed over the stripes of ``live`` workers."""
        return self.view.field_sum(row, field, live)

    def connection_delta(self, row: int, delta: int) -> None:
        if row >= 0:
            self.stripe.connections(row, delta)

    def pick(self, service: str, endpoints: Sequence[Endpoint], endpoint_rows: Mapping[str, int],
             svc: ServiceConfig | None = None, splits: list[tuple[int, int, int]] | None = None,
             hash_key: bytes | None = None, exclude: Sequence[int] = ()) -> tuple[int, int]:
        """(index into endpoints, shm row or -1). With ``splits`` (share, start, end), a
        run of endpoints is drawn by share first, then balanced within. ``exclude``:
        indexes a retry should avoid (tried already) while another is eligible."""
        if not endpoints:
            raise NoEndpoints(f"no endpoints for service {service}")
        svc = svc or DEFAULT_SERVICE
        if splits:
            _share, start, end = _draw(splits, self.rng)
            parent, subs = self._subs.get(service, (None, {}))
            if parent is not endpoints:
                subs = {}
                self._subs[service] = (endpoints, subs)
            sub = subs.get(start)
            if sub is None:
                sub = subs[start] = tuple(endpoints[start:end])
            local = [i - start for i in exclude if start <= i < end]
            i, row = self._pick(f"{service}\0{start}", sub, endpoint_rows, svc, hash_key, local)
            return start + i, row
        return self._pick(service, endpoints, endpoint_rows, svc, hash_key, exclude)

    def _pick(self, service: str, endpoints: Sequence[Endpoint], endpoint_rows: Mapping[str, int],
              svc: ServiceConfig, hash_key: bytes | None,
              exclude: Sequence[int] = ()) -> tuple[int, int]:
        n = len(endpoints)
        tripped = self._tripped
        st = self._services.get(service)
        if st is None or st.endpoints is not endpoints:
            st = self._state(service, endpoints, endpoint_rows)
        rows = st.rows
        view = self.view
        ejected = None
        # Every row HEALTHY and no trip of this worker's own (nearly every pick): nothing
        # is ejected, and the scan below would only read the same states one by one.
        for i, r in (() if not tripped and view.all_healthy(st.states) else enumerate(rows)):
            if r < 0:
                continue
            state = view.state(r)
            if state == _HEALTHY:
                if not tripped or r not in tripped:
                    continue
                # This worker saw failure_accrual failures in a row: out at once, before
                # the control process's next tick ejects it for everyone (or, when the
                # at-most-half rule forbids that, until LOCAL_TRIP passes).
                if time.monotonic() - tripped[r] > LOCAL_TRIP:
                    del tripped[r]
                    continue
            else:  # the control process has taken over: runs start again after it
                tripped.pop(r, None)
                self.stripe.reset_run(r)
            if state == _PROBING:
                health = view.health(r)   # state, since and prober: one consistent copy
                if (health is not None and holds_probe(health, self.slot)
                        and self._probed.get(r) != health.since):
                    self._probed[r] = health.since
                    self.last = self._probe_seen(st, i)
                    return i, r   # the one probe request this worker was granted
            if ejected is None:
                ejected = [False] * n
            ejected[i] = True
        weights = st.weights
        balancer = svc.balancer
        if (ejected is None and not svc.max_pending and not exclude
                and balancer != "round_robin"
                and (balancer != "consistent_hash" or hash_key is None)):
            # P2C over an unchanged endpoint set, none ejected, no limit, nothing to
            # avoid: draw from the indexes computed with the set, build no candidate list.
            costed: list[tuple[int, float, int, float]] = []
            if len(st.usable) == 1:  # one endpoint to choose: nothing to cost
                i = st.usable[0]
                self.last = self._seen(st, decisions.MODE_SINGLE, i, None, costed)
                return i, rows[i]
            now = time.monotonic()
            live = self.live_slots(now)
            cost_row = self._cost

            def cost_of(k: int) -> float:
                c, inflight = cost_row(rows[k], live, now)
                costed.append((k, c, max(inflight, 0), weights[k]))
                return c
            i = p2c.pick_among(st.usable, weights, cost_of, self.rng)
            self.last = self._seen(st, decisions.MODE_P2C if costed else decisions.MODE_SINGLE,
                                   i, None, costed)
            return i, rows[i]
        now = time.monotonic()
        live = self.live_slots(now)
        if svc.max_pending:
            limit = svc.max_pending
            weights = tuple(0.0 if r >= 0 and self.inflight(r, live) >= limit else w
                            for w, r in zip(weights, rows, strict=True))
            if not any(weights):
                raise EndpointsBusy(f"every endpoint of {service} has {limit} requests in "
                                    "flight (max_pending)")
        cands = [p2c.Candidate(w, False if ejected is None else ejected[i])
                 for i, w in enumerate(weights)]
        if exclude:
            avoid = set(exclude)
            others = [c if i not in avoid else p2c.Candidate(0.0, c.ejected)
                      for i, c in enumerate(cands)]
            if any(c.weight > 0 and not c.ejected for c in others):
                cands = others
        costed = []
        if svc.balancer == "round_robin":
            i = st.rr.pick(cands)
            mode = decisions.MODE_ROUND_ROBIN
        elif svc.balancer == "consistent_hash" and hash_key is not None:
            i = st.ring.pick(hash_key, cands)
            mode = decisions.MODE_HASH
        else:
            def cost(k: int) -> float:
                c, inflight = self._cost(rows[k], live, now)
                costed.append((k, c, max(inflight, 0), cands[k].weight))
                return c
            i = p2c.pick(cands, cost, self.rng)
            mode = decisions.MODE_P2C if costed else decisions.MODE_SINGLE
        self.last = self._seen(st, mode, i, ejected, costed)
        return i, rows[i]

    def _seen(self, st: _ServiceState, mode: int, pick: int, ejected: list[bool] | None,
              costed: Sequence[tuple[int, float, int, float]]) -> tuple[object, ...]:
        """The balancer's fields of a decisions record (``meshd.decisions``): how it
        picked, the endpoints it skipped, the pick, and the two candidates it costed
        (index, cost, in-flight, weight), each with the state it had. On every pick:
        kept to a few tuple operations (P2C costs two endpoints or none)."""
        names = st.names
        n = len(names)
        if ejected is None and st.all_rows:   # every endpoint healthy: no state to read
            if len(costed) == 2:
                (ka, ca, fa, wa), (kb, cb, fb, wb) = costed
                return (mode, min(n, 0xFFFF), 0, 2, 0, names[pick], names[ka], ca, fa, wa, 0,
                        names[kb], cb, fb, wb, 0, b"", b"")
            return (mode, min(n, 0xFFFF), 0, 0, 0, names[pick], *_NO_CANDIDATES, b"", b"")
        if ejected is None:
            n_out, out1, out2 = 0, b"", b""
        else:
            out = [k for k, flag in enumerate(ejected) if flag]
            n_out = len(out)
            out1 = names[out[0]] if out else b""
            out2 = names[out[1]] if n_out > 1 else b""
        state = self._state_code
        if len(costed) == 2:
            (ka, ca, fa, wa), (kb, cb, fb, wb) = costed
            sa, sb = state(st, ka, ejected), state(st, kb, ejected)
            return (mode, min(n, 0xFFFF), min(n_out, 0xFFFF), 2, sa if pick == ka else sb,
                    names[pick], names[ka], ca, fa, wa, sa, names[kb], cb, fb, wb, sb, out1, out2)
        return (mode, min(n, 0xFFFF), min(n_out, 0xFFFF), 0, state(st, pick, ejected),
                names[pick], *_NO_CANDIDATES, out1, out2)

    def _probe_seen(self, st: _ServiceState, probe: int) -> tuple[object, ...]:
        """``_seen`` of a probe request: the scan stopped at the probe, so the other
        endpoints' states are read here (once per probe, not per pick)."""
        view = self.view
        ejected = [k != probe and r >= 0 and view.state(r) != _HEALTHY
                   for k, r in enumerate(st.rows)]
        return self._seen(st, decisions.MODE_PROBE, probe, ejected, ())

    def _state_code(self, st: _ServiceState, k: int, ejected: list[bool] | None) -> int:
        """An endpoint's state as this pick saw it (``decisions.STATES``)."""
        r = st.rows[k]
        if r < 0:
            return decisions.STATE_NO_ROW
        state = int(self.view.state(r))
        if state == Health.HEALTHY and ejected is not None and ejected[k]:
            return decisions.STATE_TRIPPED   # this worker's own failure accrual
        return state

    def _cost(self, row: int, live: list[int], now: float) -> tuple[float, int]:
        """The core's cost (``meshd.balance.ewma.peak_cost``, which is ``cost`` over
        ``combine``) of the endpoint of ``row``: the highest estimate any live worker
        holds x (their in-flight requests + 1); and those in-flight requests."""
        if row < 0:
            return self.default_rtt, 0
        states, inflight = self.view.ewma_states(row, live)
        return ewma.peak_cost(states, inflight, now, self.default_rtt, self.tau), inflight


def _draw(splits: list[tuple[int, int, int]], rng: random.Random) -> tuple[int, int, int]:
    total = sum(s[0] for s in splits)
    x = rng.uniform(0, total)
    for split in splits:
        x -= split[0]
        if x <= 0:
            return split
    return splits[-1]

