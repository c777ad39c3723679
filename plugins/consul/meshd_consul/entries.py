"""Sans-IO parts of the plugin: Consul health entries -> ``Endpoint``s, and the
blocking-query loop's index rules and rate limiter. Plain values in, plain values out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from meshd.discovery import Endpoint

log = logging.getLogger("meshd.discovery.consul")

META_INBOUND_PORT = "meshd-inbound-port"
META_IDENTITY = "meshd-identity"

# Consul's aggregated status: the worst check wins ("maintenance" is reported as critical).
_RANK = {"passing": 0, "warning": 1, "critical": 2}


def aggregate_status(checks: Iterable[Mapping[str, Any]]) -> str:
    worst = "passing"
    for check in checks:
        status = check.get("Status", "critical")
        if _RANK.get(status, 2) > _RANK[worst]:
            worst = status if status in _RANK else "critical"
    return worst


def to_endpoint(entry: Mapping[str, Any], zone_meta: str) -> Endpoint | None:
    """One ``/v1/health/service`` entry as an Endpoint; None if it is critical.

    Weight: ``Weights.Passing``, or ``Weights.Warning`` while in warning (how Consul's
    own DNS weighs them); both default to 1 as in Consul.
    """
    node = entry.get("Node") or {}
    svc = entry.get("Service") or {}
    status = aggregate_status(entry.get("Checks") or ())
    if status == "critical":
        return None
    host = svc.get("Address") or node.get("Address") or ""
    port = svc.get("Port")
    if not host or not isinstance(port, int) or not 0 < port < 65536:
        log.warning("consul: ignoring instance %s of %s without a usable address",
                    svc.get("ID"), svc.get("Service"))
        return None
    weights = svc.get("Weights") or {}
    weight = weights.get("Warning" if status == "warning" else "Passing", 1)
    if not isinstance(weight, int) or weight < 0:
        weight = 1
    meta: Mapping[str, str] = svc.get("Meta") or {}
    node_meta: Mapping[str, str] = node.get("Meta") or {}
    zone = meta.get(zone_meta) or node_meta.get(zone_meta) or ""
    inbound = _port(meta.get(META_INBOUND_PORT))
    labels = sorted({("tag", t) for t in svc.get("Tags") or () if isinstance(t, str)}
                    | {(f"meta:{k}", v) for k, v in meta.items() if isinstance(v, str)})
    return Endpoint(
        host=host.strip("[]"), port=port, weight=weight, zone=str(zone),
        meshed=inbound > 0, inbound_port=inbound,
        identity=str(meta.get(META_IDENTITY, "")) if inbound else "",
        labels=tuple(labels),
    )


def to_endpoints(entries: Iterable[Mapping[str, Any]], zone_meta: str,
                 passing_only: bool) -> tuple[Endpoint, ...]:
    """The endpoint set, sorted so two answers with the same content compare equal."""
    out: dict[tuple[str, int], Endpoint] = {}
    for entry in entries:
        if passing_only and aggregate_status(entry.get("Checks") or ()) != "passing":
            continue  # the server filtered with ?passing already; this guards a lax one
        ep = to_endpoint(entry, zone_meta)
        if ep is not None:
            out.setdefault(ep.address, ep)
    return tuple(sorted(out.values(), key=lambda e: (e.host, e.port)))


def _port(value: object) -> int:
    if isinstance(value, str) and value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    if value is not None:
        log.warning("consul: service meta %s=%r is not a port; instance treated as not meshed",
                    META_INBOUND_PORT, value)
    return 0


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, by the rules of Consul's "Blocking Queries":
    an index lower than the previous one resets to 0 (a full, non-blocking read restarts
    the loop); otherwise it is at least 1, so the next request really blocks."""
    if returned < previous:
        return 0
    return max(returned, 1)


class TokenBucket:
    """Rate limit for the query loop: a burst of ``burst`` requests goes out at once, then
    one per ``interval`` (the docs recommend a token bucket with burst 2 over a plain sleep,
    which would delay every update in the happy case)."""

    def __init__(self, interval: float, burst: int = 2, now: float = 0.0) -> None:
        self.interval = interval
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def reserve(self, now: float) -> float:
        """Take a token; the seconds to wait before using it (0: go now)."""
        if self.interval <= 0:
            return 0.0
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) / self.interval)
        self.stamp = now
        self.tokens -= 1.0
        return max(0.0, -self.tokens * self.interval)
