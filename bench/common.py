"""Constants, the figures of one round and the error every part raises."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
TARGETS = ("direct", "nginx", "meshd-1w", "meshd-2w")
SCENARIOS = ("balancing", "slow-endpoint", "h2", "two-hop", "tcp", "idle")
CHOICES = (*TARGETS, "http1", *SCENARIOS)
BODY = "meshd bench: a fixed answer of about one hundred bytes from the nginx backend, padded to len\n"
AIM = 0.25  # meshd 2 workers vs nginx req/s, the aim
BALANCING_AIM = 0.10  # the balancing features may cost under 10 % (req/s and CPU per request)
SLOW_MS = 50  # the slow endpoint's added latency
CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}

# [service.bench] policies: the balancing features on (the defaults, spelled out) and the
# foundation's round robin.
POLICIES = {
    "p2c": 'balancer = "p2c"\nretries = 1\nfailure_accrual = 7\n',
    "rr": 'balancer = "round_robin"\nretries = 0\nfailure_accrual = 0\n',
}
BALANCING = ("meshd-p2c", "meshd-rr")  # A, B; the second is the baseline
SLOW_VARIANTS = ("nginx-rr", "nginx-lc", "meshd-p2c", "meshd-rr")  # the first is the baseline
H2_TARGETS = ("direct-h2", "nginx-h2", "meshd-h2")  # nginx-h2 is the baseline
H2_AIM = 0.20  # meshd (2 workers) vs nginx req/s over HTTP/2, the aim
# nginx ends an HTTP/2 connection after keepalive_requests (1,000) requests and h2load does
# not reconnect: the h2c servers allow many more
H2_KEEPALIVE = "    keepalive_requests 100000000;\n"
TCP_TARGETS = ("nginx-tcp", "meshd-tcp")  # nginx's stream proxy is the baseline
TCP_AIM = 0.8  # opaque TCP through meshd (2 workers) vs nginx stream req/s, issue 17's aim
IDLE_CONNECTIONS = 10_000  # the idle scenario's keep-alive client connections (one worker)
HOPS = ("direct", "one-hop", "two-hop", "two-hop-mtls")  # direct is the baseline
HOP_AIM_MS = 2.0  # two hops may add under 2 ms median at the fixed rate
# issue 14: two hops over mTLS add p50 < 1 ms, p99 < 5 ms; CPU per request within 1.2x
MTLS_AIM_P50_MS, MTLS_AIM_P99_MS, MTLS_AIM_CPU = 1.0, 5.0, 1.2


class BenchError(Exception):
    """A target could not be started or wrk failed: the run is void."""


@dataclass
class Round:
    rps: float
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_us_per_req: float | None  # None for the direct target (no proxy)
    non_2xx: int
    socket_errors: dict[str, int]
    # slow-endpoint only: requests each backend served during the round (after warm-up)
    backend_requests: dict[str, int] = field(default_factory=dict)

    @property
    def slow_share(self) -> float | None:
        total = sum(self.backend_requests.values())
        return self.backend_requests.get("slow", 0) / total if total else None
