"""Linkerd's label set on a real meshd's /metrics, read with prometheus_client's parser:
every family parses with HELP and TYPE, histogram buckets are cumulative, and the labels
are the documented ones (authority, target_addr, grpc_status, classification; route_*
families with dst, route and rt_route). gRPC through meshd with grpcio on both sides: a
non-zero grpc-status is a failure in the metrics and in failure accrual (the endpoint is
ejected); a trailers-only UNAVAILABLE is retried where its route allows retries; two
[[route]] tables count apart. The Host is the client's to choose: authorities past the
per-listener cap count under authority="_other" and in meshd_label_overflow_total. The
Grafana dashboard under deploy/grafana only names metrics a live meshd exports.

One meshd serves the module (its tests read counters as deltas or lower bounds)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import MeshFactory
from prometheus_client.parser import text_string_to_metric_families

from meshd import rowkeys
from meshd.config import load
from meshd.snapshot import read as read_snapshot
from meshd.snapshot import snapshot_path
from meshd.testing.harness import Backend, Meshd, http_get, wait_for

SERVICE = "meshd.test.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/ServerStream"
_raw = {"request_deserializer": None, "response_serializer": None}
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "meshd.json"


class Flaky:
    """Answers each request's first call UNAVAILABLE (trailers-only: nothing sent before
    the status), its second one OK."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.lock = threading.Lock()

    def _first(self, request: bytes) -> bool:
        with self.lock:
            first = request not in self.seen
            self.seen.add(request)
            return first

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self._first(request):
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return request

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if self._first(request):
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        yield request


class Broken:
    """INTERNAL for every call: trailers-only (unary) or after a message (streaming, the
    status in the trailers)."""

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.INTERNAL, "broken")

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"partial"
        context.abort(grpc.StatusCode.INTERNAL, "broken mid-stream")


class Healthy:
    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield request


def grpc_server(servicer: Flaky | Broken | Healthy) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.unary, **_raw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(servicer.stream, **_raw),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


EXTRA = """
[service.grpcbad]
failure_accrual = 3
balancer = "round_robin"  # calls alternate: the broken endpoint gets its share

[[route]]
name = "unary"
host = "echo"
path_prefix = "/meshd.test.Echo/Unary"
retryable = true          # gRPC calls are POSTs: retried only where the route says so
retries = 1

[[route]]
name = "stream"
host = "echo"
path_prefix = "/meshd.test.Echo/ServerStream"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Meshd, dict[str, str]]]:
    servers = []
    try:
        flaky, flaky_port = grpc_server(Flaky())
        broken, broken_port = grpc_server(Broken())
        healthy, healthy_port = grpc_server(Healthy())
        servers += [flaky, broken, healthy]
        web = Backend("web").start()
        factory = MeshFactory(tmp_path_factory.mktemp("families"))
        addrs = {"echo": f"127.0.0.1:{flaky_port}", "broken": f"127.0.0.1:{broken_port}",
                 "healthy": f"127.0.0.1:{healthy_port}", "web": web.address}
        m = factory.run({"web": [web.address], "echo": [addrs["echo"]],
                         "grpcbad": [addrs["broken"], addrs["healthy"]]},
                        workers=1, extra=EXTRA)
        yield m, addrs
        for started in factory.started:
            started.stop()
        web.stop()
    finally:
        for s in servers:
            s.stop(0)


def channel(m: Meshd, authority: str) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",  # type: ignore[attr-defined]
                                 options=[("grpc.default_authority", authority)])


def scrape(m: Meshd) -> str:
    host, _, port = (m.admin or "").rpartition(":")
    status, _, body = http_get(host, int(port), "/metrics")
    assert status == 200
    return body.decode()


def samples(m: Meshd, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (parsed)."""
    total = 0.0
    for family in text_string_to_metric_families(scrape(m)):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k, "") == v for k, v in labels.items()):
                total += s.value
    return total


# -- gRPC: classification, failure accrual, retries, per-route counters --------------------

def test_grpc_status_is_a_failure_in_metrics_and_ejects_the_endpoint(world) -> None:
    m, addrs = world
    with channel(m, "grpcbad") as ch:
        unary, stream = ch.unary_unary(UNARY), ch.unary_stream(STREAM)
        with pytest.raises(grpc.RpcError) as err:   # a failure only the trailers tell
            for _ in range(20):
                list(stream(b"s", timeout=5))       # the healthy endpoint answers OK
        assert err.value.code() == grpc.StatusCode.INTERNAL
        codes = []
        for i in range(30):  # bounded: the broken endpoint is ejected after 3 failures
            try:
                unary(b"u%d" % i, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        assert grpc.StatusCode.OK in codes and grpc.StatusCode.INTERNAL in codes
    base = {"direction": "outbound", "listener": "outbound", "service": "grpcbad"}
    wait_for(lambda: samples(m, "response_total", **base, grpc_status="13",
                             classification="failure") >= codes.count(grpc.StatusCode.INTERNAL) + 1,
             10, what="gRPC failures counted")
    assert samples(m, "response_total", **base, grpc_status="0", status_code="200",
                   classification="success") >= codes.count(grpc.StatusCode.OK)
    # gRPC answers are HTTP 200s: none counted without its grpc_status
    assert samples(m, "response_total", **base, status_code="200", grpc_status="") == 0
    broken = {"service": "grpcbad", "target_addr": addrs["broken"]}
    assert samples(m, "meshd_endpoint_attempts_total", **broken, classification="failure") >= 3
    wait_for(lambda: samples(m, "meshd_endpoint_ejections_total", **broken) >= 1, 10,
             what="the broken endpoint ejected by failure accrual")
    assert samples(m, "meshd_endpoint_ejections_total", service="grpcbad",
                   target_addr=addrs["healthy"]) == 0


def test_unavailable_trailers_only_is_retried_where_the_route_allows(world) -> None:
    m, _ = world
    route = {"direction": "outbound", "listener": "outbound", "dst": "echo"}
    before_unary = samples(m, "route_request_total", **route, route="unary", rt_route="unary")
    before_retries = samples(m, "retry_total", service="echo")
    with channel(m, "echo") as ch:
        unary, stream = ch.unary_unary(UNARY), ch.unary_stream(STREAM)
        for i in range(5):  # route "unary": retryable, one retry: the second call answers
            assert unary(b"retry-me-%d" % i, timeout=5) == b"retry-me-%d" % i
        with pytest.raises(grpc.RpcError) as err:  # route "stream": not retryable
            list(stream(b"no-retry", timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert list(stream(b"no-retry", timeout=5)) == [b"no-retry"]  # its second call
    assert samples(m, "retry_total", service="echo") == before_retries + 5
    assert samples(m, "route_request_total", **route, route="unary") == before_unary + 5
    # one response per request, after the retry: OK
    assert samples(m, "route_response_total", **route, route="unary", grpc_status="0",
                   classification="success") >= 5
    assert samples(m, "route_response_total", **route, route="unary", grpc_status="14") == 0
    assert samples(m, "route_response_total", **route, route="stream", grpc_status="14",
                   classification="failure") == 1
    assert samples(m, "route_response_total", **route, route="stream", grpc_status="0") == 1
    assert samples(m, "route_response_latency_ms_count", **route, route="stream") == 2
    assert samples(m, "response_total", service="echo", grpc_status="14") == 1


# -- the Host is the client's: authorities are capped per listener ------------------------

def test_authorities_past_the_cap_count_under_other(world) -> None:
    m, _ = world
    port = m.ports["outbound"]  # type: ignore[attr-defined]
    names = [f"web:{i}" for i in range(1, rowkeys.MAX_AUTHORITY_ROWS + 21)]
    web = {"direction": "outbound", "listener": "outbound", "service": "web"}
    sent = 0

    cfg = load(str(m.config_path))
    snapshot_file = snapshot_path(cfg.shm_dir, cfg.instance, m.pid, 1)

    def own() -> set[str]:
        """The authorities with rows of their own on the listener (other tests' too)."""
        rows = read_snapshot(snapshot_file).rows.get("outbound", {})
        return {a for a in (rowkeys.parts(k).authority for k in rows) if a}

    def own_rows() -> int:
        return len(own())

    def one_round() -> bool:
        nonlocal sent
        for name in names:
            assert http_get("127.0.0.1", port, "/", {"Host": name})[0] == 200
            sent += 1
        return own_rows() >= rowkeys.MAX_AUTHORITY_ROWS
    wait_for(one_round, 60, interval=0.2, what="authority rows up to the cap")
    assert own_rows() == rowkeys.MAX_AUTHORITY_ROWS  # never more
    m.wait_snapshot_loaded(m.published_seq())        # the worker knows the cap is reached
    overflow = samples(m, "meshd_label_overflow_total", listener="outbound", label="authority")
    have = own()
    without = [name for name in names if name not in have]
    assert len(without) >= 20
    for name in names:
        assert http_get("127.0.0.1", port, "/", {"Host": name})[0] == 200
        sent += 1
    assert samples(m, "meshd_label_overflow_total", listener="outbound",
                   label="authority") == overflow + len(without)
    assert samples(m, "request_total", **web) == sent   # every request counted once
    assert samples(m, "request_total", **web, authority="_other") >= len(without)
    # a malformed or oversized Host never gets a row: it counts under _other
    for bad in ("WEB:1\\x", "web:" + "9" * 300):
        http_get("127.0.0.1", port, "/", {"Host": bad})
    assert own_rows() == rowkeys.MAX_AUTHORITY_ROWS


# -- the exposition as a Prometheus client reads it ---------------------------------------

REQUEST_LABELS = {"direction", "listener", "service", "authority"}
RESPONSE_LABELS = REQUEST_LABELS | {"status_code", "classification"}
ROUTE_LABELS = {"direction", "listener", "dst", "route", "rt_route"}


def test_every_family_parses_with_help_type_and_documented_labels(world) -> None:
    m, _ = world
    port = m.ports["outbound"]  # type: ignore[attr-defined]
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[0] == 200
    with channel(m, "echo") as ch:
        ch.unary_unary(UNARY)(b"parse-me", timeout=5)
    text = scrape(m)
    helps = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert helps == set(types)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families  # the parser raises on anything out of format
    for f in families.values():
        assert f.documentation, f.name
        assert f.type in ("counter", "gauge", "histogram", "untyped")
        assert f.type != "untyped", f"{f.name}: no TYPE"
    for name in ("request", "response", "route_request", "route_response", "tcp_open",
                 "retry", "meshd_label_overflow", "meshd_endpoint_attempts",
                 "meshd_endpoint_ejections"):
        assert families[name].type == "counter", name  # the parser drops _total
    for name in ("response_latency_ms", "route_response_latency_ms"):
        assert families[name].type == "histogram"
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for s in families[name].samples:
            if s.name.endswith("_bucket"):
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                series.setdefault(key, []).append((float(s.labels["le"]), s.value))
        assert series, name
        for buckets in series.values():
            assert [b for b, _ in buckets] == sorted(b for b, _ in buckets)
            counts = [n for _, n in buckets]
            assert counts == sorted(counts), f"{name}: buckets not cumulative"
            assert buckets[-1][0] == float("inf")
    for s in families["request"].samples:
        extra = {"tls", "server_id", "client_id"} | ({"target_addr"}
                                                     if s.labels["direction"] == "inbound" else set())
        assert REQUEST_LABELS <= set(s.labels) <= REQUEST_LABELS | extra, s
    for s in families["response"].samples:
        assert RESPONSE_LABELS <= set(s.labels) <= RESPONSE_LABELS | {
            "grpc_status", "target_addr", "tls", "server_id", "client_id"}, s
        assert s.labels["classification"] in ("success", "failure")
        if "grpc_status" in s.labels:
            assert s.labels["status_code"] == "200"
            assert (s.labels["classification"] == "success") == (s.labels["grpc_status"] == "0")
    for s in families["route_request"].samples:
        assert set(s.labels) == ROUTE_LABELS and s.labels["route"] == s.labels["rt_route"]
    assert {s.labels["route"] for s in families["route_request"].samples} >= {"unary"}


# -- the Grafana dashboard ------------------------------------------------------------------

_PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "max", "min", "avg",
    "count", "topk", "bottomk", "clamp_min", "clamp_max", "le", "offset", "bool", "vector",
    "label_replace", "abs", "delta", "deriv", "time", "scalar", "sort_desc", "sort",
}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    """Every metric name the panels' PromQL (and the templating queries) refer to."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    names: set[str] = set()
    for v in dashboard.get("templating", {}).get("list", ()):
        if v.get("type") == "query":  # label_values(metric{...}, label)
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            found = re.fullmatch(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*).*\)", query)
            assert found, query
            names.add(found[1])
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)        # label matchers
        expr = re.sub(r"\[[^\]]*\]", "", expr)       # ranges
        expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping
        expr = re.sub(r'"[^"]*"', "", expr)
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
            if word not in _PROMQL_WORDS and not word.startswith("$"):
                names.add(word)
    return names


def test_the_dashboard_names_only_metrics_meshd_exports(world) -> None:
    m, _ = world
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    names = dashboard_metric_names(dashboard)
    assert {"request_total", "response_total", "response_latency_ms_bucket",
            "route_response_total", "retry_total", "meshd_endpoint_ejections_total",
            "tcp_open_connections"} <= names
    exported: set[str] = set()
    for f in text_string_to_metric_families(scrape(m)):
        exported.add(f.name)
        if f.type == "counter":
            exported.add(f.name + "_total")
        if f.type == "histogram":
            exported |= {f.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    assert names - exported == set(), "the dashboard names metrics meshd does not export"


# -- routes are capped per listener too -----------------------------------------------------

def test_routes_past_the_cap_count_under_overflow(mesh, backends) -> None:
    b = backends("web")
    n = rowkeys.MAX_ROUTE_ROWS + 2
    routes = "".join(f'[[route]]\nname = "r{i}"\nhost = "web"\npath_prefix = "/r{i}/"\n\n'
                     for i in range(n))
    m = mesh.run({"web": [b.address]}, workers=1, extra=routes)
    port = m.ports["outbound"]
    for i in (0, n - 2, n - 1):  # the first route, and two past the cap
        assert http_get("127.0.0.1", port, f"/r{i}/x", {"Host": "web"})[0] == 200
    assert http_get("127.0.0.1", port, "/none", {"Host": "web"})[0] == 200  # no route
    route = {"direction": "outbound", "listener": "outbound", "dst": "web"}
    assert samples(m, "route_request_total", **route, route="r0") == 1
    assert samples(m, "route_request_total", **route, route=f"r{n - 2}") == 0  # past the cap
    # the overflow row is the listener's, not one route's: no dst
    over = {"direction": "outbound", "listener": "outbound", "dst": "", "route": "_overflow"}
    assert samples(m, "route_request_total", **over) == 2
    assert samples(m, "route_response_total", **over, status_code="200",
                   classification="success") == 2
    assert samples(m, "meshd_label_overflow_total", listener="outbound", label="route") == 2
    assert samples(m, "request_total", service="web") == 4  # each counted once by service
    assert "routes have metric rows; the others count under" in m.log()


def test_row_keys_of_authorities_and_routes() -> None:
    base = rowkeys.key("web", True, "spiffe://td/sa/a")
    k = rowkeys.with_authority(base, "web:8080")
    assert rowkeys.parts(k) == ("web", "true", "spiffe://td/sa/a", "web:8080", "", "")
    assert rowkeys.split(k) == rowkeys.split(base)
    assert rowkeys.parts(rowkeys.with_authority("web", "web")) == ("web", "false", "", "web", "", "")
    assert rowkeys.parts(rowkeys.route_key("r1")) == ("", "false", "", "", "r1", "")
    for raw, name in ((b"Web:8080", "web:8080"), (b"[::1]:80", "[::1]:80"), (b"10.0.0.1", "10.0.0.1"),
                      (b"_other", ""), (b"a b", ""), (b"web:123456", ""), (b"x" * 256, ""),
                      (b"", ""), (None, ""), (b"web\x1fx", ""), (b"w\xe9b", "")):
        assert rowkeys.authority_of(raw) == name, raw


def test_the_control_gives_authority_rows_only_to_known_keys_and_up_to_the_cap(tmp_path) -> None:
    import logging

    from meshd.control.rows import RowTable
    from meshd.ratelog import Throttle
    from meshd.shm import Region

    region = Region.create(str(tmp_path / "rows.shm"), 2, 512)
    try:
        table = RowTable(region, {"out": {"": 2, "web": 3}})
        quiet = Throttle(logging.getLogger("test"))
        assert not table.authority("out", "nope", "nope", quiet)      # no such row: no service
        assert not table.authority("in", "web", "web", quiet)         # no such listener
        assert not table.authority("out", "web", "Web", quiet)        # not as a row names it
        assert not table.authority("out", rowkeys.route_key("r"), "web", quiet)
        assert table.authority("out", "web", "web", quiet)
        assert not table.authority("out", "web", "web", quiet)        # has one
        assert not table.authority("out", rowkeys.with_authority("web", "web"), "x", quiet)
        for i in range(rowkeys.MAX_AUTHORITY_ROWS + 5):
            table.authority("out", "web", f"web:{i}", quiet)
        assert sum(1 for k in table.rows["out"] if rowkeys.parts(k).authority) == \
            rowkeys.MAX_AUTHORITY_ROWS
    finally:
        region.close()
