"""meshd.metrics: Prometheus text from a region and a row map, and the `meshd stat` figures."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd import shm
from meshd.config import parse
from meshd.metrics import RowKey, StatWindow, quantile, render_prometheus, row_keys
from meshd.shm import (
    F_LATENCY,
    F_READ_BYTES,
    F_REQUESTS,
    F_TCP_CLOSE_TOTAL,
    F_TCP_OPEN,
    F_TCP_OPEN_TOTAL,
    F_WRITE_BYTES,
    FIELDS,
    LATENCY_BUCKETS_MS,
    Region,
)

CONFIG = parse({"listener": [
    {"name": "out", "listen": "127.0.0.1:4140"},
    {"name": "in", "listen": "127.0.0.1:4143", "direction": "inbound",
     "forward": "127.0.0.1:8080"},
]})
ODD = 'we"b\\x\ny'  # a service name with every character label values must escape
ROWS = {"out": {"web": 2, ODD: 3, "idle": 5}, "in": {"web": 4}}
WEB = 'direction="outbound",listener="out",service="web"'
OTHER = 'authority="_other"'  # a row without an authority of its own (meshd.rowkeys)

# -- a small Prometheus text-format reader -------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL},)*{_LABEL})\}})? (-?[0-9]+(?:\.[0-9]+)?|\+Inf)")
_COMMENT = re.compile(rf"# (?:HELP {_NAME} .+|TYPE {_NAME} (?:counter|gauge|histogram))")


def parse_text(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition; fails on any line out of format."""
    assert text.endswith("\n")
    declared: set[str] = set()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert _COMMENT.fullmatch(line), line
            if line.startswith("# TYPE"):
                declared.add(line.split()[2])
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name = match[1]
        assert re.sub("_(bucket|sum|count)$", "", name) in declared, f"{name}: no TYPE before it"
        labels = frozenset(
            (k, v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\"))
            for k, v in re.findall(_LABEL, match[2] or ""))
        key = (name, labels)
        assert key not in samples, f"duplicate series: {line}"
        samples[key] = float(match[len(match.groups())])
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def region(tmp_path: Path) -> Iterator[Region]:
    r = Region.create(str(tmp_path / "metrics.shm"), 4, 8)
    yield r
    r.close()


def traffic(region: Region) -> None:
    """Two workers' worth of traffic on row 2 (out/web), a little on the others."""
    w0, w1 = region.stripe(0), region.stripe(1)
    w0.add(2, F_REQUESTS, 3)
    w1.add(2, F_REQUESTS, 2)
    w0.record_response(2, 200, 0.0025, failure=False)   # 3 ms bucket
    w1.record_response(2, 200, 0.0005, failure=False)   # 1 ms bucket
    w1.record_response(2, 503, 0.120, failure=True)     # 200 ms bucket
    w0.record_response(2, 418, 0.0040, failure=False)   # 4xx, 4 ms bucket
    w1.record_response(2, 599, 61.0, failure=True)      # 5xx, +Inf
    w0.add(3, F_REQUESTS)
    w0.add(4, F_TCP_OPEN_TOTAL, 3)
    w1.add(4, F_TCP_OPEN_TOTAL, 1)
    w0.add(4, F_TCP_CLOSE_TOTAL, 2)
    w0.add(4, F_TCP_OPEN, 1)
    w1.add(4, F_TCP_OPEN, 1)
    w0.add(4, F_READ_BYTES, 1000)
    w1.add(4, F_WRITE_BYTES, 250)


# -- Prometheus text -----------------------------------------------------------------------

def test_row_keys() -> None:
    keys = row_keys(CONFIG, ROWS)
    assert keys == {
        shm.ROW_UNKNOWN: RowKey("outbound", "", "_unknown"),
        shm.ROW_OVERFLOW: RowKey("", "", "_overflow"),
        2: RowKey("outbound", "out", "web"),
        3: RowKey("outbound", "out", ODD),
        4: RowKey("inbound", "in", "web"),
        5: RowKey("outbound", "out", "idle"),
    }


def test_requests_and_responses(region: Region) -> None:
    traffic(region)
    lines = render_prometheus(region, row_keys(CONFIG, ROWS)).splitlines()
    for expected in (
        f"request_total{{{WEB},{OTHER}}} 5",
        f'response_total{{{WEB},status_code="200",classification="success",{OTHER}}} 2',
        f'response_total{{{WEB},status_code="503",classification="failure",{OTHER}}} 1',
        f'response_total{{{WEB},status_code="4xx",classification="success",{OTHER}}} 1',
        f'response_total{{{WEB},status_code="5xx",classification="failure",{OTHER}}} 1',
    ):
        assert expected in lines
    assert [line for line in lines if line.startswith("request_total{")] == [
        f"request_total{{{WEB},{OTHER}}} 5",
        f'request_total{{direction="outbound",listener="out",service="we\\"b\\\\x\\ny",{OTHER}}} 1',
    ]  # rows without traffic (idle, the reserved ones) have no series


def test_latency_histogram(region: Region) -> None:
    traffic(region)
    text = render_prometheus(region, row_keys(CONFIG, ROWS))
    lines = text.splitlines()
    buckets = [line for line in lines if line.startswith(f"response_latency_ms_bucket{{{WEB},")]
    expected_counts = {1: 1, 2: 1, 3: 2, 4: 3, 100: 3, 200: 4, 50000: 4}
    assert len(buckets) == len(LATENCY_BUCKETS_MS) + 1
    for bound, count in expected_counts.items():
        assert f'response_latency_ms_bucket{{{WEB},{OTHER},le="{bound}"}} {count}' in lines
    assert buckets[-1] == f'response_latency_ms_bucket{{{WEB},{OTHER},le="+Inf"}} 5'
    counts = [int(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts)  # cumulative
    assert f"response_latency_ms_count{{{WEB},{OTHER}}} 5" in lines
    # 2.5+0.5+120+4+61000 ms
    assert f"response_latency_ms_sum{{{WEB},{OTHER}}} 61127.000" in lines
    assert 'response_latency_ms_count{direction="inbound"' not in text


def test_tcp_lines(region: Region) -> None:
    traffic(region)
    lines = render_prometheus(region, row_keys(CONFIG, ROWS)).splitlines()
    inbound = 'direction="inbound",listener="in",service="web"'
    for expected in (
        f"tcp_open_total{{{inbound}}} 4",
        f"tcp_close_total{{{inbound}}} 2",
        f"tcp_open_connections{{{inbound}}} 2",
        f"tcp_read_bytes_total{{{inbound}}} 1000",
        f"tcp_write_bytes_total{{{inbound}}} 250",
        "# TYPE tcp_open_connections gauge",
        "# TYPE tcp_open_total counter",
    ):
        assert expected in lines
    assert not [line for line in lines if line.startswith("tcp_") and WEB in line]


def test_open_connections_gauge_shows_zero_once_a_row_has_connections(region: Region) -> None:
    region.stripe(0).add(4, F_TCP_OPEN_TOTAL)
    region.stripe(0).add(4, F_TCP_CLOSE_TOTAL)
    lines = render_prometheus(region, row_keys(CONFIG, ROWS)).splitlines()
    assert 'tcp_open_connections{direction="inbound",listener="in",service="web"} 0' in lines


def test_meshd_lines(region: Region) -> None:
    region.claim_slot(0, generation=1, kind=shm.KIND_WORKER)
    region.heartbeat(0, shm.STATE_SERVING)
    region.claim_slot(1, generation=1, kind=shm.KIND_WORKER)  # still booting
    region.claim_slot(2, generation=1, kind=shm.KIND_CONTROL)
    region.heartbeat(2, shm.STATE_SERVING)
    region.set_u64(shm.OFF_RESTARTS, 2)
    region.set_u64(shm.OFF_RELOADS, 3)
    region.set_u64(shm.OFF_RELOAD_FAILURES, 1)
    region.set_u64(shm.OFF_ROWS_EXHAUSTED, 4)
    lines = render_prometheus(region, row_keys(CONFIG, ROWS)).splitlines()
    for expected in (
        "meshd_workers 1",
        "meshd_worker_restarts_total 2",
        'meshd_config_reloads_total{result="success"} 3',
        'meshd_config_reloads_total{result="failure"} 1',
        "meshd_shm_rows_exhausted_total 4",
        f"process_start_time_seconds {region.started_at:.3f}",
    ):
        assert expected in lines


def test_text_parses_and_escapes_label_values(region: Region) -> None:
    traffic(region)
    samples = parse_text(render_prometheus(region, row_keys(CONFIG, ROWS)))
    assert value(samples, "request_total", direction="outbound", listener="out", service=ODD,
                 authority="_other") == 1
    assert value(samples, "request_total", direction="outbound", listener="out",
                 service="web", authority="_other") == 5
    assert value(samples, "response_latency_ms_bucket", direction="outbound", listener="out",
                 service="web", authority="_other", le="+Inf") == 5
    assert value(samples, "meshd_config_reloads_total", result="failure") == 0


def test_empty_region_still_parses(region: Region) -> None:
    samples = parse_text(render_prometheus(region, row_keys(CONFIG, {})))
    assert {name for name, _ in samples} == {
        "meshd_build_info", "meshd_workers", "meshd_worker_restarts_total", "meshd_config_reloads_total",
        "meshd_shm_rows_exhausted_total", "process_start_time_seconds"}


@pytest.mark.parametrize("line", [
    'request_total{service="a"b"} 1',       # unescaped quote
    "request_total{service=a} 1",           # unquoted value
    "request_total 1 2",                    # trailing garbage
    "# TYPE request_total countr",
])
def test_the_reader_rejects_bad_lines(line: str) -> None:
    with pytest.raises(AssertionError):
        parse_text(f"# TYPE request_total counter\n{line}\n")


# -- stat window and quantiles -------------------------------------------------------------

def histogram(**counts: int) -> list[int]:
    """A row with latency counts by bucket bound: histogram(le_2=8, le_inf=1)."""
    fields = [0] * FIELDS
    for name, n in counts.items():
        bound = name.removeprefix("le_")
        index = len(LATENCY_BUCKETS_MS) if bound == "inf" else LATENCY_BUCKETS_MS.index(int(bound))
        fields[F_LATENCY + index] = n
    return fields


@pytest.mark.parametrize(("fields", "q", "expected"), [
    (histogram(le_1=4, le_2=4), 0.50, 1.0),       # rank 4 ends the first bucket
    (histogram(le_1=4, le_2=4), 0.95, 1.9),       # 1 + (7.6 - 4) / 4
    (histogram(le_1=4, le_2=4), 0.99, 1.98),
    (histogram(le_2=8, le_5=2), 0.50, 1.625),     # 1 + 5 / 8
    (histogram(le_2=8, le_5=2), 0.95, 4.75),      # empty buckets skipped: 4 + 1.5 / 2
    (histogram(le_10=1), 0.50, 7.5),              # 5 + 5 * 0.5
    (histogram(le_1=1, le_inf=1), 0.99, 50000.0),  # +Inf: the highest finite bound
    (histogram(), 0.50, None),
])
def test_quantile(fields: list[int], q: float, expected: float | None) -> None:
    assert quantile(fields, q) == expected


def test_stat_window(region: Region) -> None:
    keys = row_keys(CONFIG, ROWS)
    window = StatWindow(window=10.0)
    w = region.stripe(0)
    window.take(region, [2, 3], now=100.0)

    w.add(2, F_REQUESTS, 10)
    for _ in range(8):
        w.record_response(2, 200, 0.0015, failure=False)
    for _ in range(2):
        w.record_response(2, 503, 0.0045, failure=True)
    window.take(region, [2, 3], now=105.0)
    [web] = window.figures(keys)  # row 3 has no requests: no figures
    assert web == {
        "direction": "outbound", "listener": "out", "service": "web",
        "requests_total": 10, "success_rate": 0.8, "rps": 2.0,
        "latency_ms_p50": 1.625, "latency_ms_p95": 4.75, "latency_ms_p99": 4.95,
        "window_s": 5.0,
    }

    w.add(2, F_REQUESTS, 5)
    for _ in range(5):
        w.record_response(2, 200, 0.0015, failure=False)
    window.take(region, [2, 3], now=112.0)  # 105 is not yet 10 s old: 100 stays the base
    [web] = window.figures(keys)
    assert (web["requests_total"], web["rps"], web["window_s"]) == (15, 15 / 12, 12.0)
    assert web["success_rate"] == pytest.approx(13 / 15)

    window.take(region, [2, 3], now=116.0)  # now 105 is: the window starts there
    [web] = window.figures(keys)
    assert [s.at for s in window.samples] == [105.0, 112.0, 116.0]
    assert (web["requests_total"], web["rps"], web["window_s"]) == (15, 5 / 11, 11.0)
    assert web["success_rate"] == 1.0
    assert web["latency_ms_p99"] == pytest.approx(1.99)


def test_stat_window_with_one_sample(region: Region) -> None:
    region.stripe(0).add(2, F_REQUESTS, 4)
    region.stripe(0).record_response(2, 502, 0.001, failure=True)
    window = StatWindow()
    assert window.figures(row_keys(CONFIG, ROWS)) == []
    window.take(region, [2], now=1.0)
    [web] = window.figures(row_keys(CONFIG, ROWS))
    assert (web["rps"], web["window_s"], web["success_rate"]) == (0.0, 0.0, 0.0)
    assert web["latency_ms_p50"] == 0.5
