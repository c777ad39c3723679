"""Admin ``/status``: the state of this meshd at a glance, as JSON, for the dashboard
(``meshd.control.dashboard``) and ``meshd check --live`` (``meshd.cli.check_live``).

What ``/stats`` (traffic figures) and ``/endpoints`` (each endpoint) do not say:

- ``workers``: serving now, desired, restarts;
- ``reloads``: totals, and ``failed_since_start``: reloads that failed after this
  generation started (a reload that succeeds starts a new control process, so a non-zero
  count means the last reload failed and the file's config is not the one running);
- ``rows``: the shared-memory tables' capacity and use, and how many pairs or endpoints
  found no row (``meshd_shm_rows_exhausted_total``);
- ``discovery``: per source, services watched, synced, the names still owed a first
  answer and those whose watch fails now (at most NAMES of each, with totals);
- ``services``: per service, its balancer and policy, and the endpoints by health state;
- ``identity``: the workload certificate's validity (with ``[identity]``), else null;
- ``recent_errors``: ``meshd.control.recent_errors``'s ring, newest first.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import meshd
from meshd.balance.ejection import Health
from meshd.config import DEFAULT_SERVICE
from meshd.metrics import serving_workers
from meshd.shm import (
    OFF_DESIRED,
    OFF_RELOAD_FAILURES,
    OFF_RELOADS,
    OFF_RESTARTS,
    OFF_ROWS_EXHAUSTED,
)

if TYPE_CHECKING:
    from meshd.control.process import Control

NAMES = 10   # service names listed per source and kind; the rest are counted


def status(c: Control) -> dict[str, Any]:
    region = c.region
    failures = region.get_u64(OFF_RELOAD_FAILURES)
    return {
        "version": meshd.__version__,
        "generation": c.ctx.generation,
        "started_at": round(region.started_at, 3),
        "uptime_s": round(time.time() - region.started_at, 3),
        "workers": {"serving": serving_workers(region), "desired": region.get_u32(OFF_DESIRED),
                    "restarts_total": region.get_u64(OFF_RESTARTS)},
        "reloads": {"success_total": region.get_u64(OFF_RELOADS),
                    "failure_total": failures,
                    "failed_since_start": failures - c.recent_errors.reload_base},
        "rows": {
            "metric": {"capacity": region.rows, "in_use": region.rows_used},
            "endpoint": {"capacity": region.endpoint_rows, "in_use": region.endpoint_rows_used},
            "exhausted_total": region.get_u64(OFF_ROWS_EXHAUSTED),
        },
        "discovery": _discovery(c),
        "services": _services(c),
        "identity": _identity(c),
        "recent_errors": c.recent_errors.entries(),
    }


def _discovery(c: Control) -> dict[str, Any]:
    d = c.discovery
    out: dict[str, dict[str, Any]] = {
        src.name: {"plugin": src.plugin, "error": d.source_errors.get(src.name), "services": 0,
                   "synced": 0, "stale": 0, "pending": [], "pending_total": 0, "failing": [],
                   "failing_total": 0}
        for src in c.config.discovery}
    for name, w in sorted(d.watches.items()):
        for src, st in w.sources.items():
            s = out.get(src)
            if s is None:
                continue
            s["services"] += 1
            if st.synced:
                s["synced"] += 1
            elif st.stale:
                s["stale"] += 1
            else:
                s["pending_total"] += 1
                if len(s["pending"]) < NAMES:
                    s["pending"].append(name)
            if st.error is not None:
                s["failing_total"] += 1
                if len(s["failing"]) < NAMES:
                    s["failing"].append({"service": name, "error": st.error})
    return out


def _services(c: Control) -> dict[str, Any]:
    d = c.discovery
    rows = d.endpoint_rows.rows
    states = d.health.states
    out = {}
    for name, w in sorted(d.watches.items()):
        svc = c.config.services.get(name, DEFAULT_SERVICE)
        by_state = dict.fromkeys((h.name.lower() for h in Health), 0)
        endpoints = w.merged()
        for e in endpoints:
            row = rows.get(str(e))
            h = states.get(row) if row is not None else None
            by_state[(h.state if h is not None else Health.HEALTHY).name.lower()] += 1
        out[name] = {"balancer": svc.balancer, "failure_accrual": svc.failure_accrual,
                     "retries": svc.retries, "timeout_s": svc.timeout,
                     "endpoints": len(endpoints), **by_state, "exists": w.exists,
                     "on_demand": w.on_demand,
                     "sources": {src: _source_state(st) for src, st in w.sources.items()}}
    return out


def _source_state(st: Any) -> str:
    """One source's state for one service: failing (its watch fails now), synced,
    stale (endpoints from the persisted state, no answer yet) or pending."""
    if st.error is not None:
        return "failing"
    return "synced" if st.synced else "stale" if st.stale else "pending"


def _identity(c: Control) -> dict[str, Any] | None:
    runner = c.identity
    if runner is None:
        return None
    cur = runner.current
    if cur is None:
        return {"local_id": None, "not_after": None, "expires_in_s": None, "lifetime_s": None,
                "error": runner.error or getattr(runner.provider, "error", None)}
    d = runner.describe()
    return {"local_id": d["local_id"], "not_before": d["not_before"], "not_after": d["not_after"],
            "expires_in_s": round(cur.not_after - time.time(), 1),
            "lifetime_s": round(cur.not_after - cur.not_before, 1),
            "error": d["last_error"]}
