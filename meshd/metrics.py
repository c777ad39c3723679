"""Reading the shared-memory counters: Prometheus text and the figures of `meshd stat`.

Pure functions over a ``Region`` (read-only is enough) and the row map of a snapshot;
the control process serves them, and the CLI could call them on an attached region.
Names follow Linkerd's so dashboards carry over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import meshd
from meshd import rowkeys
from meshd.balance.ejection import Health
from meshd.config import Config
from meshd.discovery.api import Endpoint
from meshd.shm import (
    AUTHZ_DENIED,
    DETECT_RESULTS,
    EP_FAILURES,
    EP_SUCCESSES,
    F_AUTHZ_DENIED,
    F_BUDGET_EXHAUSTED,
    F_CLASS,
    F_DETECT,
    F_FAILURES,
    F_GRPC,
    F_IDLE_REAPED,
    F_LABEL_OVERFLOW,
    F_LATENCY,
    F_LATENCY_SUM_US,
    F_PING_TIMEOUT,
    F_READ_BYTES,
    F_REFUSED_RETRY,
    F_REQUESTS,
    F_RETRIES,
    F_STATUS,
    F_TCP_CLOSE_TOTAL,
    F_TCP_OPEN,
    F_TCP_OPEN_TOTAL,
    F_TLS_IN,
    F_TLS_OUT,
    F_TRACE,
    F_WRITE_BYTES,
    GRPC_CODES,
    KIND_WORKER,
    LABEL_OVERFLOW,
    LATENCY_BUCKETS_MS,
    OFF_RELOAD_FAILURES,
    OFF_RELOADS,
    OFF_RESTARTS,
    OFF_ROWS_EXHAUSTED,
    OFF_SLOTS_USED,
    ROW_OVERFLOW,
    ROW_UNKNOWN,
    STATE_SERVING,
    STATUS_CLASSES,
    STATUS_CODES,
    TLS_RESULTS,
    TRACE_COUNTS,
    Region,
)


@dataclass(frozen=True, slots=True)
class RowKey:
    direction: str
    listener: str
    service: str
    tls: str = ""      # "true" | "false" | "mixed"; "" when not labelled (no [identity])
    peer_id: str = ""  # client_id (inbound) or server_id (outbound)
    authority: str = ""  # the row's authority ("" : authority="_other", see meshd.rowkeys)
    route: str = ""    # a route's row: its name (route_* families only)
    dst: str = ""      # a route row: the route's host, or a fleet route's service (Linkerd's dst)


def row_keys(cfg: Config, rows: Mapping[str, Mapping[str, int]]) -> dict[int, RowKey]:
    """Row -> labels, for every row the snapshot assigned plus the two reserved rows.
    With ``[identity]``, each row also says tls and the peer's identity (``meshd.rowkeys``)."""
    directions = {lst.name: lst.direction for lst in cfg.listeners}
    hosts = {r.name: r.host for r in cfg.routes}
    labelled = cfg.identity is not None
    keys = {
        ROW_UNKNOWN: RowKey("outbound", "", "_unknown"),
        ROW_OVERFLOW: RowKey("", "", "_overflow"),
    }
    for listener, by_key in rows.items():
        for row_key, row in by_key.items():
            p = rowkeys.parts(row_key)
            keys[row] = RowKey(directions.get(listener, ""), listener, p.service,
                               p.tls if labelled else "", p.peer_id, p.authority, p.route,
                               p.dst or hosts.get(p.route, ""))
    return keys


def _pairs(key: RowKey) -> list[tuple[str, str]]:
    pairs = [("direction", key.direction), ("listener", key.listener), ("service", key.service)]
    if key.tls:
        pairs += [("tls", key.tls),
                  ("client_id" if key.direction == "inbound" else "server_id", key.peer_id)]
    return pairs


def _labels(key: RowKey, **extra: str) -> str:
    """The labels of the per-connection families (tcp_*): no authority, no route."""
    return _render([*_pairs(key), *extra.items()])


def _request_labels(key: RowKey, **extra: str) -> str:
    """The labels of the per-request families: Linkerd's authority, and target_addr for
    inbound rows (the application's address, which meshd's service is there too)."""
    pairs = [*_pairs(key), *extra.items(), ("authority", key.authority or rowkeys.NO_AUTHORITY)]
    if key.direction == "inbound":
        pairs.append(("target_addr", key.service))
    return _render(pairs)


def _route_labels(key: RowKey, **extra: str) -> str:
    """The labels of the route_* families: Linkerd's dst and rt_route, and route."""
    return _render([("direction", key.direction), ("listener", key.listener),
                    ("dst", key.dst), ("route", key.route), ("rt_route", key.route),
                    *extra.items()])


def _render(pairs: Sequence[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def serving_workers(region: Region) -> int:
    return sum(1 for s in region.slots_in_use() if s.kind == KIND_WORKER and s.state == STATE_SERVING)


def _per_listener(totals: Mapping[int, Sequence[int]], keys: Mapping[int, RowKey], first: int,
                  n: int) -> list[tuple[str, list[int]]]:
    """Fields ``first .. first+n`` summed per listener, for listeners where any is non-zero
    (per-listener counters live on a listener's own row, service "", and outbound
    handshakes on request rows: both are summed alike)."""
    summed: dict[str, list[int]] = {}
    for row, t in totals.items():
        counts = t[first:first + n]
        if any(counts):
            seen = summed.get(keys[row].listener, [0] * n)
            summed[keys[row].listener] = [a + b for a, b in zip(seen, counts, strict=True)]
    return list(summed.items())


def _trace_families(trace: Sequence[int], family: Callable[[str, str, str], None],
                    out: list[str]) -> None:
    """[tracing]'s span counters (worker-wide, on ROW_UNKNOWN)."""
    family("meshd_trace_spans_exported_total", "counter",
           "Spans of [tracing] the OTLP collector accepted.")
    out.append(f"meshd_trace_spans_exported_total {trace[F_TRACE]}")
    family("meshd_trace_spans_dropped_total", "counter",
           "Sampled spans not exported: queue_full (the worker's span queue was full: the "
           "exporter behind or backing off), export_failed (the collector refused or did "
           "not answer their batch).")
    for i, reason in ((1, "queue_full"), (2, "export_failed")):
        out.append(f'meshd_trace_spans_dropped_total{{reason="{reason}"}} {trace[F_TRACE + i]}')
def _responses(t: Sequence[int]) -> list[tuple[dict[str, str], int]]:
    """A row's responses by (status_code, classification, grpc_status): Linkerd's
    classification is failure for a 5xx or a gRPC status other than 0."""
    out: list[tuple[dict[str, str], int]] = []
    for i, code in enumerate(STATUS_CODES):
        n = t[F_STATUS + i]
        if n:
            out.append(({"status_code": str(code),
                         "classification": "failure" if code >= 500 else "success"}, n))
    for i, name in enumerate(STATUS_CLASSES):
        n = t[F_CLASS + i]
        if n:
            out.append(({"status_code": name,
                         "classification": "failure" if name == "5xx" else "success"}, n))
    for i in range(GRPC_CODES + 1):
        n = t[F_GRPC + i]
        if n:
            out.append(({"status_code": "200",
                         "classification": "success" if i == 0 else "failure",
                         "grpc_status": str(i) if i < GRPC_CODES else "other"}, n))
    return out


_HISTOGRAM = len(LATENCY_BUCKETS_MS) + 1


class _Families:
    """Samples of the per-row families, summed by their rendered labels: rows that a
    family does not tell apart (an authority's rows in tcp_*) add up to one series."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.latency: dict[str, dict[str, list[int]]] = {}

    def add(self, name: str, labels: str, n: int) -> None:
        series = self.counts.setdefault(name, {})
        series[labels] = series.get(labels, 0) + n

    def observe(self, name: str, labels: str, t: Sequence[int]) -> None:
        series = self.latency.setdefault(name, {})
        seen = series.get(labels)
        counts = [*t[F_LATENCY:F_LATENCY + _HISTOGRAM], t[F_LATENCY_SUM_US]]
        series[labels] = counts if seen is None else [a + b for a, b in zip(seen, counts, strict=True)]

    def lines(self, name: str) -> list[str]:
        return [f"{name}{labels} {n}" for labels, n in self.counts.get(name, {}).items()]

    def histogram(self, name: str) -> list[str]:
        out = []
        for labels, counts in self.latency.get(name, {}).items():
            inner = labels[1:-1]
            acc = 0
            for i, bound in enumerate(LATENCY_BUCKETS_MS):
                acc += counts[i]
                out.append(f'{name}_bucket{{{inner},le="{bound}"}} {acc}')
            total = acc + counts[_HISTOGRAM - 1]
            out.append(f'{name}_bucket{{{inner},le="+Inf"}} {total}')
            out.append(f"{name}_sum{labels} {counts[_HISTOGRAM] / 1000:.3f}")
            out.append(f"{name}_count{labels} {total}")
        return out


_TCP_FAMILIES = (
    ("tcp_open_total", F_TCP_OPEN_TOTAL, "counter", "Connections accepted or opened."),
    ("tcp_close_total", F_TCP_CLOSE_TOTAL, "counter", "Connections closed."),
    ("tcp_open_connections", F_TCP_OPEN, "gauge", "Connections open now."),
    ("tcp_read_bytes_total", F_READ_BYTES, "counter", "Bytes read from clients (opaque TCP)."),
    ("tcp_write_bytes_total", F_WRITE_BYTES, "counter", "Bytes written to clients (opaque TCP)."),
)
# Upstream connection events (meshd.shm UPSTREAM_EVENTS), on the row of the request
# that met them or last used the connection; labelled like the tcp_* families.
_UPSTREAM_FAMILIES = (
    ("meshd_upstream_ping_timeouts_total", F_PING_TIMEOUT,
     "HTTP/2 connections to a peer meshd taken out of use: no answer to a PING within "
     "the service's ping_timeout while streams waited."),
    ("meshd_upstream_refused_retries_total", F_REFUSED_RETRY,
     "Requests sent again because an HTTP/2 peer refused their stream (REFUSED_STREAM, "
     "or beyond the last stream id of its GOAWAY: never processed)."),
    ("meshd_upstream_idle_closed_total", F_IDLE_REAPED,
     "Idle upstream connections (HTTP/1.1 and HTTP/2) closed after the service's "
     "idle_timeout."),
)
_RETRY_FAMILIES = (
    ("retry_total", F_RETRIES, "Requests sent again to another endpoint."),
    ("retry_budget_exhausted_total", F_BUDGET_EXHAUSTED, "Retries the retry budget refused."),
)


def _collect(totals: Mapping[int, Sequence[int]], keys: Mapping[int, RowKey]) -> _Families:
    f = _Families()
    for row, t in totals.items():
        key = keys[row]
        if key.route:
            if t[F_REQUESTS]:
                f.add("route_request_total", _route_labels(key), t[F_REQUESTS])
            for extra, n in _responses(t):
                f.add("route_response_total", _route_labels(key, **extra), n)
            if any(t[F_LATENCY:F_LATENCY + _HISTOGRAM]):
                f.observe("route_response_latency_ms", _route_labels(key), t)
            continue
        if t[F_REQUESTS]:
            f.add("request_total", _request_labels(key), t[F_REQUESTS])
        for extra, n in _responses(t):
            f.add("response_total", _request_labels(key, **extra), n)
        if any(t[F_LATENCY:F_LATENCY + _HISTOGRAM]):
            f.observe("response_latency_ms", _request_labels(key), t)
        for name, field, _help in _RETRY_FAMILIES:
            if t[field]:
                f.add(name, _request_labels(key), t[field])
        for name, field, kind, _help in _TCP_FAMILIES:
            if t[field] or (kind == "gauge" and t[F_TCP_OPEN_TOTAL]):
                f.add(name, _labels(key), t[field])
        for name, field, _help in _UPSTREAM_FAMILIES:
            if t[field]:
                f.add(name, _labels(key), t[field])
    return f


def render_prometheus(region: Region, keys: Mapping[int, RowKey],
                      build: Sequence[tuple[str, str]] = (), tracing: bool = False) -> str:
    """The /metrics text. ``build``: the labels of ``meshd_build_info`` beside meshd's
    version (``meshd.control.build_info``: reading them imports ssl and
    importlib.metadata, which this sans-IO module must not). ``tracing``: [tracing] is
    on (its counters are shown, zeros too)."""
    totals = {row: region.row_totals(row) for row in sorted(keys)}
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    f = _collect(totals, keys)
    family("request_total", "counter", "Requests received, by destination.")
    out += f.lines("request_total")
    family("response_total", "counter",
           "Responses sent, by status code, gRPC status and classification.")
    out += f.lines("response_total")
    family("response_latency_ms", "histogram", "Time to the response, in milliseconds.")
    out += f.histogram("response_latency_ms")
    family("route_request_total", "counter", "Requests that matched a route ([[route]] or a config source's).")
    out += f.lines("route_request_total")
    family("route_response_total", "counter",
           "Responses to requests that matched a route, by status and classification.")
    out += f.lines("route_response_total")
    family("route_response_latency_ms", "histogram",
           "Time to the response of requests that matched a route, in milliseconds.")
    out += f.histogram("route_response_latency_ms")
    for name, _field, kind, help_text in _TCP_FAMILIES:
        family(name, kind, help_text)
        out += f.lines(name)
    for name, _field, help_text in _RETRY_FAMILIES:
        family(name, "counter", help_text)
        out += f.lines(name)
    for name, _field, help_text in _UPSTREAM_FAMILIES:
        family(name, "counter", help_text)
        out += f.lines(name)
    family("meshd_label_overflow_total", "counter",
           "Requests counted under a fixed label value because the listener's cap of rows "
           "was reached: authority=\"_other\" (label=\"authority\") or "
           "route=\"_overflow\" (label=\"route\").")
    for listener, by_label in _per_listener(totals, keys, F_LABEL_OVERFLOW, len(LABEL_OVERFLOW)):
        for label, n in zip(LABEL_OVERFLOW, by_label, strict=True):
            out.append(f'meshd_label_overflow_total{{listener="{_escape(listener)}",'
                       f'label="{label}"}} {n}')
    family("meshd_protocol_detect_total", "counter",
           "Connections of protocol = \"auto\" listeners, by what detection found "
           "(skipped: an opaque port, not detected; tunnel_refused: a meshd tunnel to a port "
           "not in tunnel_ports, closed unconnected).")
    for listener, by_result in _per_listener(totals, keys, F_DETECT, len(DETECT_RESULTS)):
        for result, n in zip(DETECT_RESULTS, by_result, strict=True):
            out.append(f'meshd_protocol_detect_total{{listener="{_escape(listener)}",'
                       f'result="{result}"}} {n}')
    family("meshd_tls_handshake_total", "counter",
           "TLS handshakes, by listener, direction and result (inbound: mTLS from peer "
           "meshds and [listener.tls]; plaintext_refused / plaintext_permitted: plaintext "
           "connections to an mTLS listener; outbound: mTLS to meshed endpoints).")
    for direction, first in (("inbound", F_TLS_IN), ("outbound", F_TLS_OUT)):
        for listener, by_result in _per_listener(totals, keys, first, len(TLS_RESULTS)):
            for result, n in zip(TLS_RESULTS, by_result, strict=True):
                if n:
                    out.append(f'meshd_tls_handshake_total{{listener="{_escape(listener)}",'
                               f'direction="{direction}",result="{result}"}} {n}')
    family("meshd_authz_denied_total", "counter",
           "Requests (protocol=\"http\") and connections (\"tcp\": opaque, tunnels) an "
           "[[authorization]] policy or the identity provider refused (mode=\"enforce\": "
           "answered 403 or closed; \"audit\": let through).")
    for listener, by_kind in _per_listener(totals, keys, F_AUTHZ_DENIED, len(AUTHZ_DENIED)):
        for kind, n in zip(AUTHZ_DENIED, by_kind, strict=True):
            protocol, mode = kind.split("_")
            out.append(f'meshd_authz_denied_total{{listener="{_escape(listener)}",'
                       f'mode="{mode}",protocol="{protocol}"}} {n}')
    if tracing:
        _trace_families(totals.get(ROW_UNKNOWN, [0] * (F_TRACE + len(TRACE_COUNTS))), family, out)
    family("meshd_build_info", "gauge",
           "Always 1; its labels name the versions this meshd runs with.")
    labels = (("version", meshd.__version__), *build)
    out.append("meshd_build_info{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
               + "} 1")
    family("meshd_workers", "gauge", "Worker processes serving now.")
    out.append(f"meshd_workers {serving_workers(region)}")
    family("meshd_worker_restarts_total", "counter", "Workers replaced after dying or hanging.")
    out.append(f"meshd_worker_restarts_total {region.get_u64(OFF_RESTARTS)}")
    family("meshd_config_reloads_total", "counter", "Config reloads (HUP), by result.")
    out.append(f'meshd_config_reloads_total{{result="success"}} {region.get_u64(OFF_RELOADS)}')
    out.append(f'meshd_config_reloads_total{{result="failure"}} {region.get_u64(OFF_RELOAD_FAILURES)}')
    family("meshd_shm_rows_exhausted_total", "counter",
           "Listener/service pairs and endpoints that found no free row in shared memory.")
    out.append(f"meshd_shm_rows_exhausted_total {region.get_u64(OFF_ROWS_EXHAUSTED)}")
    family("process_start_time_seconds", "gauge", "When the master started (unix time).")
    out.append(f"process_start_time_seconds {region.started_at:.3f}")
    return "\n".join(out) + "\n"


# Endpoint labels (from discovery: the kubernetes plugin gives them from EndpointSlices)
# shown as Linkerd's dst_* labels on the per-endpoint families: one value per endpoint,
# so no series more than the endpoints have (bounded by the endpoint rows).
DST_LABELS = (("namespace", "dst_namespace"), ("pod", "dst_pod"))
MAX_DST_LABEL = 253    # characters of a dst_* value (a Kubernetes name's own bound)


def render_endpoints(region: Region, services: Mapping[str, Sequence[str | Endpoint]],
                     endpoint_rows: Mapping[str, int]) -> list[str]:
    """Per-endpoint families (Linkerd's ``target_addr`` on outbound traffic): attempts by
    outcome as failure accrual counts them, ejections, and whether ejected now, for each
    watched service's endpoints (``services``: name -> endpoints, or their "host:port"s)
    that have a row; with ``dst_namespace`` / ``dst_pod`` where discovery gives an
    endpoint those labels (``DST_LABELS``)."""
    slots = list(range(region.get_u32(OFF_SLOTS_USED)))
    view = region.endpoint_view()
    attempts: list[str] = []
    ejections: list[str] = []
    ejected: list[str] = []
    for service, endpoints in services.items():
        for ep in endpoints:
            address = str(ep)
            row = endpoint_rows.get(address)
            if row is None:
                continue
            labels = f'service="{_escape(service)}",target_addr="{_escape(address)}"'
            if isinstance(ep, Endpoint) and ep.labels:
                labels += _dst_labels(ep.labels)
            ok = view.field_sum(row, EP_SUCCESSES, slots)
            bad = view.field_sum(row, EP_FAILURES, slots)
            attempts.append(f'meshd_endpoint_attempts_total{{{labels},classification="success"}} {ok}')
            attempts.append(f'meshd_endpoint_attempts_total{{{labels},classification="failure"}} {bad}')
            health = view.health(row)
            if health is None:
                continue
            ejections.append(f"meshd_endpoint_ejections_total{{{labels}}} {health.ejections}")
            ejected.append(f"meshd_endpoint_ejected{{{labels}}} "
                           f"{int(health.state is not Health.HEALTHY)}")
    return [
        "# HELP meshd_endpoint_attempts_total Attempts sent to an endpoint, by outcome as "
        "failure accrual counts it (the service's failure_on).",
        "# TYPE meshd_endpoint_attempts_total counter", *attempts,
        "# HELP meshd_endpoint_ejections_total Times failure accrual ejected an endpoint.",
        "# TYPE meshd_endpoint_ejections_total counter", *ejections,
        "# HELP meshd_endpoint_ejected 1 while an endpoint is ejected or probed after an "
        "ejection.",
        "# TYPE meshd_endpoint_ejected gauge", *ejected,
    ]


def _dst_labels(labels: Sequence[tuple[str, str]]) -> str:
    have = dict(labels)
    return "".join(f',{name}="{_escape(have[key][:MAX_DST_LABEL])}"'
                   for key, name in DST_LABELS if have.get(key))


# -- stat: rates and quantiles over a sliding window ------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    totals: dict[int, list[int]]


class StatWindow:
    """Keeps a sample of every row per second; figures come from the oldest sample within
    ``window`` seconds and the newest one."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.samples: list[Sample] = []

    def take(self, region: Region, rows: list[int], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append(Sample(now, {r: region.row_totals(r) for r in rows}))
        while len(self.samples) > 2 and now - self.samples[1].at >= self.window:
            self.samples.pop(0)

    def figures(self, keys: Mapping[int, RowKey]) -> list[dict[str, object]]:
        if not self.samples:
            return []
        new = self.samples[-1]
        old = self.samples[0]
        span = max(new.at - old.at, 1e-9)
        # An authority's rows add up to their service's line; route rows are not shown.
        grouped: dict[RowKey, tuple[list[int], list[int] | None]] = {}
        for row, t in sorted(new.totals.items()):
            key = keys.get(row)
            if key is None or key.route or not t[F_REQUESTS]:
                continue
            key = RowKey(key.direction, key.listener, key.service, key.tls, key.peer_id)
            o = old.totals.get(row) if len(self.samples) > 1 else None
            seen = grouped.get(key)
            if seen is None:
                grouped[key] = (list(t), None if o is None else list(o))
            else:
                t0, o0 = seen
                grouped[key] = ([a + b for a, b in zip(t0, t, strict=True)],
                                o0 if o is None or o0 is None
                                else [a + b for a, b in zip(o0, o, strict=True)])
        result: list[dict[str, object]] = []
        for key, (t, o) in grouped.items():
            d = [a - b for a, b in zip(t, o, strict=True)] if o else t
            responses = sum(d[F_LATENCY:F_LATENCY + len(LATENCY_BUCKETS_MS) + 1])
            failures = d[F_FAILURES]
            result.append({
                "direction": key.direction,
                "listener": key.listener,
                "service": key.service,
                **({"tls": key.tls, "peer_id": key.peer_id} if key.tls else {}),
                "requests_total": t[F_REQUESTS],
                "success_rate": None if not responses else (responses - failures) / responses,
                "rps": d[F_REQUESTS] / span if o else 0.0,
                "latency_ms_p50": quantile(d, 0.50),
                "latency_ms_p95": quantile(d, 0.95),
                "latency_ms_p99": quantile(d, 0.99),
                "window_s": round(span, 3) if o else 0.0,
            })
        return result


def quantile(fields: list[int], q: float) -> float | None:
    """Quantile from the latency histogram, linear within the bucket (as Prometheus does)."""
    counts = fields[F_LATENCY:F_LATENCY + len(LATENCY_BUCKETS_MS) + 1]
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    acc = 0
    lower = 0.0
    for i, n in enumerate(counts):
        upper = float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else float(LATENCY_BUCKETS_MS[-1])
        if acc + n >= rank and n:
            return round(lower + (upper - lower) * (rank - acc) / n, 3)
        acc += n
        lower = upper
    return float(LATENCY_BUCKETS_MS[-1])

