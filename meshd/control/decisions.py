"""Admin ``/debug/decisions?service=S[&limit=N]``: the last balancer decisions of every
worker, merged, newest first, as JSON.

Each worker keeps its last ``meshd.decisions.CAPACITY`` attempts in its own ring file
(``meshd.decisions``); this reads the ring of every slot a worker may have used
(``OFF_SLOTS_USED``), keeps the whole records of the asked service, and answers them with
the worker's slot and pid. A ring whose worker died and was not reaped yet is still read
(its whole records are valid); one being replaced is read whole or not at all.

The same files carry one worker counter, the access log's dropped lines; /metrics reads
``meshd_access_log_dropped_total`` from the workers' stripes (``DroppedLines``).

The query string is client input: known keys only, each at most once, ``service`` a
name of at most MAX_SERVICE characters, ``limit`` an integer 1..MAX_LIMIT (default
DEFAULT_LIMIT). Anything else is answered 400 with the reason. A service no worker
sent anything to gives an empty list.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from meshd import decisions as fmt
from meshd.shm import F_WORKER, OFF_SLOTS_USED, ROW_UNKNOWN, WORKER_COUNTS

if TYPE_CHECKING:
    from meshd.control.process import Control

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_SERVICE = 253       # a DNS name's length
PARAMS = ("service", "limit")

Answer = tuple[str, str, bytes]


class BadQuery(ValueError):
    """The query string cannot be answered: the message says why (400)."""


def parse_query(qs: str) -> tuple[str | None, int]:
    """(service or None for all, limit) from a query string. Raises ``BadQuery``."""
    try:
        params = parse_qs(qs, keep_blank_values=True, strict_parsing=bool(qs),
                          max_num_fields=len(PARAMS), errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadQuery(f"malformed query string: {str(e)[:80]}") from None
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise BadQuery(f"unknown parameter {unknown[0][:40]!r} (known: {', '.join(PARAMS)})")
    for name, values in params.items():
        if len(values) > 1:
            raise BadQuery(f"{name} given {len(values)} times")
    service = params.get("service", [None])[0]
    if service is not None:
        if not service:
            raise BadQuery("service is empty")
        if len(service) > MAX_SERVICE or not service.isprintable():
            raise BadQuery(f"service must be a name of at most {MAX_SERVICE} printable "
                           "characters")
    limit = DEFAULT_LIMIT
    raw = params.get("limit", [None])[0]
    if raw is not None:
        if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
            raise BadQuery(f"limit must be an integer from 1 to {MAX_LIMIT}")
        limit = int(raw)
        if not 1 <= limit <= MAX_LIMIT:
            raise BadQuery(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return service, limit


def collect(shm_dir: str, instance: str, master_pid: int, slots: int,
            service: str | None, limit: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the newest ``limit`` decisions over every worker's ring, the rings read)."""
    key = None if service is None else service.encode("utf-8", "replace")
    merged: list[dict[str, Any]] = []
    rings = []
    for slot in range(slots):
        ring = fmt.read(fmt.ring_path(shm_dir, instance, master_pid, slot), service=key)
        if ring is None:
            continue
        rings.append({"slot": ring.slot, "pid": ring.pid, "generation": ring.generation,
                      "recorded": ring.written})
        for rec in ring.records:
            merged.append(describe(rec, ring.slot, ring.pid))
    merged.sort(key=lambda d: (d["_time"], d["_seq"]), reverse=True)
    out = merged[:limit]
    for d in out:
        del d["_time"], d["_seq"]
    return out, rings


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def timestamp(wall: float) -> str:
    ms = int(wall * 1000 + 0.5)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def describe(rec: dict[str, Any], slot: int, pid: int) -> dict[str, Any]:
    """One record as the API answers it."""
    candidates = []
    for c in ("a", "b")[:rec["candidates"]]:
        cost, inflight, weight = rec[f"{c}_cost"], rec[f"{c}_inflight"], rec[f"{c}_weight"]
        candidates.append({
            "endpoint": rec[f"{c}_address"],
            "state": fmt.state_name(rec[f"{c}_state"]),
            # what P2C compared: peak EWMA x (in-flight + 1) / weight
            "cost_ms": _ms(cost / weight) if weight > 0 else None,
            "ewma_ms": _ms(cost / (inflight + 1)),
            "in_flight": inflight,
            "weight": weight,
        })
    return {
        "time": timestamp(rec["time"]),
        "worker": {"slot": slot, "pid": pid},
        "service": rec["service"],
        "route": rec["route"],
        "attempt": rec["attempt"],
        "balancer": fmt.mode_name(rec["mode"]),
        "endpoints": rec["endpoints"],
        "ejected": rec["ejected"],
        "ejected_endpoints": [e for e in (rec["ejected_1"], rec["ejected_2"]) if e],
        "candidates": candidates,
        "pick": rec["pick"],
        "pick_state": fmt.state_name(rec["pick_state"]),
        "status": rec["status"] or None,
        "outcome": rec["outcome"],
        "error": rec["error"],
        "latency_ms": _ms(rec["latency"]),
        "retried": bool(rec["flags"] & fmt.FLAG_RETRIED),
        "no_retry": rec["no_retry"],
        "_time": rec["time"],
        "_seq": rec["seq"],
    }


class DroppedLines:
    """``meshd_access_log_dropped_total``: the access log lines every worker that ever
    ran under this master dropped, summed over the workers' stripes (field
    ``access_log_dropped`` of ROW_UNKNOWN), so the sum never goes back when a worker is
    replaced or a new control process serves. (The decision rings' headers still carry
    each live worker's count.)"""

    def prometheus(self, control: Control) -> list[str]:
        cfg = control.config
        if cfg.access_log is None:
            return []
        # The workers count drops in their stripes too (cumulative per slot): neither a
        # worker replaced nor a new control process takes anything away from that sum.
        n = control.region.row_totals(ROW_UNKNOWN)[F_WORKER + WORKER_COUNTS.index(
            "access_log_dropped")]
        return ["# HELP meshd_access_log_dropped_total Access log lines dropped because a "
                "worker's writer fell behind ([access_log] queue).",
                "# TYPE meshd_access_log_dropped_total counter",
                f"meshd_access_log_dropped_total {n}"]


def handle(control: Control, qs: str) -> Answer:
    try:
        service, limit = parse_query(qs)
    except BadQuery as e:
        return "400 Bad Request", "text/plain", f"bad query: {e}\n".encode()
    cfg = control.config
    slots = min(control.region.get_u32(OFF_SLOTS_USED), control.region.slots)
    found, rings = collect(cfg.shm_dir, cfg.instance, control.ctx.master_pid, slots,
                           service, limit)
    body = {"service": service, "limit": limit, "workers": rings, "decisions": found}
    return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"
