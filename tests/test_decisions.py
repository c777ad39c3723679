"""Balancer decisions: the ring format (seqlocked records, a writer killed mid-run), the
admin /debug/decisions endpoint of a real meshd (P2C candidates and costs, retries and
their reasons, ejected endpoints, a worker killed and restarted) and `meshd endpoints
--why`."""

from __future__ import annotations

import http.client
import json
import mmap
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MeshFactory

from meshd import decisions as fmt
from meshd.cli import cli
from meshd.cli.endpoints import WHY_HEADER
from meshd.control.decisions import MAX_LIMIT, BadQuery, parse_query, timestamp
from meshd.testing.harness import Backend, Meshd, free_port, http_get, require_tool, wait_for
from meshd.worker.decisions import DecisionRing

SEEN = (fmt.MODE_P2C, 2, 0, 2, 0, b"10.0.0.1:80",
        b"10.0.0.1:80", 0.001, 0, 1.0, 0, b"10.0.0.2:80", 0.05, 3, 1.0, 0, b"", b"")


# -- the ring format ---------------------------------------------------------------------


def _ring(tmp_path: Path) -> DecisionRing:
    ring = DecisionRing.open(str(tmp_path), "t", 1, 0, os.getpid(), 1)
    assert ring is not None
    return ring


def _write(ring: DecisionRing, k: int) -> None:
    """Record number ``k``, its content derived from ``k`` (checked by ``_consistent``)."""
    ring.record(b"svc%d" % k, b"r", k % 200 + 1, bool(k & 1), 200 + k % 300, float(k),
                b"ok", b"e%d" % k, b"", SEEN)


def _consistent(rec: dict[str, Any]) -> bool:
    k = rec["seq"] // 2 - 1
    return (rec["service"] == f"svc{k}" and rec["latency"] == float(k)
            and rec["error"] == f"e{k}" and rec["status"] == 200 + k % 300
            and rec["attempt"] == k % 200 + 1 and rec["pick"] == "10.0.0.1:80")


def test_ring_keeps_the_newest_records_whole(tmp_path):
    ring = _ring(tmp_path)
    for k in range(fmt.CAPACITY + 44):
        _write(ring, k)
    got = fmt.read(ring.path)
    assert got is not None and got.written == fmt.CAPACITY + 44 and got.pid == os.getpid()
    assert [r["seq"] // 2 - 1 for r in got.records] == list(range(fmt.CAPACITY + 43, 43, -1))
    assert all(_consistent(r) for r in got.records)
    rec = got.records[0]
    assert (rec["a_address"], rec["b_address"], rec["b_inflight"]) == (
        "10.0.0.1:80", "10.0.0.2:80", 3)
    only = fmt.read(ring.path, service=b"svc100")
    assert only is not None and [r["service"] for r in only.records] == ["svc100"]


def test_a_record_left_half_written_is_skipped(tmp_path):
    ring = _ring(tmp_path)
    for k in range(5):
        _write(ring, k)
    ring.q[(fmt.HEADER_SIZE + 3 * fmt.RECORD_SIZE) >> 3] = 2 * 3 + 1   # record 3: odd seq
    got = fmt.read(ring.path)
    assert got is not None and [r["seq"] for r in got.records] == [10, 6, 4, 2]


def test_bounded_fields_are_cut(tmp_path):
    ring = _ring(tmp_path)
    ring.record(b"s" * 500, b"r" * 100, 1, False, 200, 0.001, b"ok", b"x" * 300, b"",
                SEEN[:5] + (b"a" * 200,) + SEEN[6:])
    rec = fmt.read(ring.path).records[0]  # type: ignore[union-attr]
    assert len(rec["service"]) == fmt.SERVICE_BYTES and len(rec["route"]) == fmt.ROUTE_BYTES
    assert len(rec["error"]) == fmt.ERROR_BYTES and len(rec["pick"]) == fmt.ADDRESS_BYTES


def test_not_a_ring_is_refused(tmp_path):
    bad = tmp_path / "x.dec"
    bad.write_bytes(b"\0" * fmt.FILE_SIZE)
    os.chmod(bad, 0o600)
    assert fmt.read(str(bad)) is None
    assert fmt.read(str(tmp_path / "missing.dec")) is None


def _writer(path: str, ready: Any) -> None:
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), fmt.FILE_SIZE)
    ring = DecisionRing(mm, path)
    ready.set()
    k = 0
    while True:
        _write(ring, k)
        k += 1


def test_a_reader_racing_a_writer_killed_mid_run_sees_only_whole_records(tmp_path):
    """A writer in another process records as fast as it can while this process reads;
    then it is SIGKILLed wherever it was. Every record read, during and after, is whole:
    its content matches its sequence number."""
    path = _ring(tmp_path).path
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_writer, args=(path, ready), daemon=True)
    proc.start()
    try:
        assert ready.wait(10)
        reads = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and reads < 200:
            got = fmt.read(path)
            assert got is not None
            assert all(_consistent(r) for r in got.records), [
                r for r in got.records if not _consistent(r)][:1]
            reads += 1
        assert got.written > fmt.CAPACITY  # the ring wrapped while it was read
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    got = fmt.read(path)
    assert got is not None and len(got.records) >= fmt.CAPACITY - 1
    assert all(_consistent(r) for r in got.records)


def test_query_is_bounded_and_checked():
    assert parse_query("") == (None, 50)
    assert parse_query("service=web&limit=3") == ("web", 3)
    assert parse_query(f"limit={MAX_LIMIT}") == (None, MAX_LIMIT)
    for bad in ("limit=0", f"limit={MAX_LIMIT + 1}", "limit=abc", "limit=-1", "limit=1e3",
                "limit=99999999999999999999", "service=", "service=a&service=b", "who=1",
                "service=web&limit=1&x=2", "service=%ff", "service=" + "a" * 254,
                "service=a%0Ab", "novalue"):
        with pytest.raises(BadQuery):
            parse_query(bad)


# -- a real meshd ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Meshd, dict[str, Backend]]]:
    """One meshd (two workers) for the module: ``web`` over a fast and a slow endpoint
    with an ``api`` route; ``flaky`` over a failing endpoint and two good ones; ``five``,
    whose endpoints answer 503 (never ejected)."""
    names = ("fast", "slow", "bad", "good1", "good2", "f1", "f2")
    backends = {n: Backend(n).start() for n in names}
    factory = MeshFactory(tmp_path_factory.mktemp("decisions"))
    services = {"web": [backends["fast"].address, backends["slow"].address],
                "flaky": [backends[n].address for n in ("bad", "good1", "good2")],
                "five": [backends["f1"].address, backends["f2"].address],
                "dead": [f"127.0.0.1:{free_port()}", backends["f1"].address]}
    extra = ('[service.five]\nfailure_accrual = 0\n\n'
             '[[route]]\nname = "api"\nhost = "web"\npath_prefix = "/api/"\n')
    try:
        m = factory.run(services, extra=extra)
        yield m, backends
    finally:
        for m in factory.started:
            m.stop()
        for b in backends.values():
            b.stop()
        shutil.rmtree(factory.run_dir, ignore_errors=True)


def _get(port: int, path: str, host: str, n: int = 1, method: str = "GET") -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    try:
        for _ in range(n):
            conn.request(method, path, headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
    finally:
        conn.close()
    return statuses


def _decisions(m: Meshd, query: str) -> dict[str, Any]:
    status, _, body = http_get("127.0.0.1", m.ports["admin"], "/debug/decisions?" + query)  # type: ignore[attr-defined]
    assert status == 200, body
    return json.loads(body)


def test_p2c_candidates_and_costs_favour_the_fast_endpoint(setup):
    m, b = setup
    fast, slow = b["fast"].address, b["slow"].address
    http_get(b["slow"].host, b["slow"].port, "/_delay?ms=200")
    port = m.ports["outbound"]
    _get(port, "/api/x", "web", 40)
    data = _decisions(m, "service=web&limit=40")
    found = data["decisions"]
    assert len(found) == 40 and {w["slot"] for w in data["workers"]} and all(
        d["service"] == "web" and d["route"] == "api" for d in found)
    times = [d["time"] for d in found]
    assert times == sorted(times, reverse=True)   # newest first, across both workers
    for d in found:
        assert d["balancer"] == "p2c" and len(d["candidates"]) == 2, d
        assert {c["endpoint"] for c in d["candidates"]} == {fast, slow}
        # P2C sends to the cheaper one (two costs equal to the record's precision: either)
        picked = next(c for c in d["candidates"] if c["endpoint"] == d["pick"])
        other = next(c for c in d["candidates"] if c["endpoint"] != d["pick"])
        assert picked["cost_ms"] <= other["cost_ms"] * (1 + 1e-6) + 1e-3, d
        assert d["outcome"] == "ok" and d["status"] == 200 and d["attempt"] == 1
        assert d["worker"]["pid"] in m.worker_pids()
    # Once the slow endpoint was sampled, its cost shows it and the fast one wins.
    def slow_seen(d: dict[str, Any]) -> bool:
        costs = {c["endpoint"]: c for c in d["candidates"]}
        return costs[slow]["ewma_ms"] > 100 and costs[slow]["cost_ms"] > costs[fast]["cost_ms"]
    assert any(slow_seen(d) and d["pick"] == fast for d in found), found
    assert sum(d["pick"] == fast for d in found) > len(found) / 2


def test_a_retry_after_a_503_shows_with_its_reason(setup):
    m, _ = setup
    port = m.ports["outbound"]
    assert _get(port, "/status?code=503", "five") == [503]
    first, second = _decisions(m, "service=five&limit=2")["decisions"][::-1]
    assert (first["attempt"], first["status"], first["outcome"], first["retried"]) == (
        1, 503, "5xx", True)
    assert (second["attempt"], second["status"], second["retried"], second["no_retry"]) == (
        2, 503, False, "no_attempts_left")
    assert second["pick"] != first["pick"]  # the retry went to the other endpoint
    assert first["worker"] == second["worker"]
    # A POST is not idempotent: not retried, and the record says why.
    assert _get(port, "/status?code=503", "five", method="POST") == [503]
    post = _decisions(m, "service=five&limit=1")["decisions"][0]
    assert (post["attempt"], post["retried"], post["no_retry"]) == (1, False, "not_idempotent")


def test_a_retry_after_a_refused_connection_shows_with_the_error(setup):
    m, b = setup
    port = m.ports["outbound"]
    refused: list[dict[str, Any]] = []

    def seen() -> bool:
        assert _get(port, "/", "dead") == [200]   # a refused attempt is retried
        refused[:] = [d for d in _decisions(m, "service=dead&limit=20")["decisions"]
                      if d["outcome"] == "connect"]
        return bool(refused)
    wait_for(seen, timeout=20, what="a refused attempt")
    d = refused[0]
    assert d["retried"] and d["status"] is None and d["pick"] != b["f1"].address
    assert "refused" in d["error"].lower(), d


def test_an_ejected_endpoint_shows_as_such(setup):
    m, b = setup
    bad = b["bad"]
    http_get(bad.host, bad.port, "/_fail?code=503")
    port = m.ports["outbound"]

    def ejected() -> bool:
        _get(port, "/", "flaky", 10)
        _, _, raw = http_get("127.0.0.1", m.ports["admin"], "/endpoints")
        eps = json.loads(raw)["services"]["flaky"]["endpoints"]
        return any(e["address"] == bad.address and e["state"] == "ejected" for e in eps)
    wait_for(ejected, timeout=20, what="bad ejected")
    since = timestamp(time.time())
    _get(port, "/", "flaky", 4)
    found = _decisions(m, "service=flaky&limit=200")["decisions"]
    # Before: a 503 from bad, retried on another endpoint.
    assert any(d["pick"] == bad.address and d["status"] == 503 and d["retried"]
               for d in found), found
    # After: bad is skipped, P2C draws the two others (one might be a probe).
    after = [d for d in found if d["time"] > since and d["balancer"] == "p2c"]
    assert after, found[:10]
    for d in after:
        assert d["ejected"] == 1 and d["ejected_endpoints"] == [bad.address], d
        assert d["endpoints"] == 3 and d["pick"] != bad.address
        assert bad.address not in {c["endpoint"] for c in d["candidates"]}

    # About a second later the control process grants a probe: one request goes to bad.
    probes: list[dict[str, Any]] = []

    def probed() -> bool:
        _get(port, "/", "flaky", 5)
        probes[:] = [d for d in _decisions(m, "service=flaky&limit=50")["decisions"]
                     if d["balancer"] == "probe"]
        return bool(probes)
    wait_for(probed, timeout=20, what="a probe decision")
    probe = probes[0]
    assert (probe["pick"], probe["pick_state"], probe["candidates"]) == (
        bad.address, "probing", [])
    assert (probe["status"], probe["ejected"]) == (503, 0)
    http_get(bad.host, bad.port, "/_fail?code=0")


def test_an_http2_request_is_recorded_too(setup):
    """The attempt loop is the same for both client sides: an HTTP/2 request (curl, prior
    knowledge) leaves its decision like an HTTP/1.1 one."""
    m, b = setup
    out = subprocess.run(
        [require_tool("curl"), "-sS", "--http2-prior-knowledge", "-o", "/dev/null",
         "-w", "%{http_version} %{http_code}", "-H", "Host: five",
         f"http://127.0.0.1:{m.ports['outbound']}/status?code=204"],
        capture_output=True, text=True, timeout=30)
    assert out.stdout == "2 204", out
    d = _decisions(m, "service=five&limit=1")["decisions"][0]
    assert (d["status"], d["outcome"], d["attempt"], d["balancer"]) == (204, "ok", 1, "p2c")
    assert d["pick"] in (b["f1"].address, b["f2"].address)


def test_query_errors_and_unknown_service(setup):
    m, _ = setup
    admin = m.ports["admin"]
    assert _decisions(m, "service=nosuch")["decisions"] == []
    assert len(_decisions(m, "limit=1")["decisions"]) == 1
    for bad in ("limit=0", "limit=x", "bogus=1", "service=a&service=b"):
        status, _, body = http_get("127.0.0.1", admin, "/debug/decisions?" + bad)
        assert status == 400 and body.startswith(b"bad query: "), (bad, body)


def test_endpoints_why_prints_the_last_decisions(setup):
    m, b = setup
    _get(m.ports["outbound"], "/status?code=503", "five")
    result = CliRunner().invoke(cli, ["endpoints", "--admin", m.admin, "--why", "five",
                                      "--limit", "2"], prog_name="meshd")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == list(WHY_HEADER)
    assert len(rows) == 2
    assert "no_attempts_left" in rows[0] and "retried" in rows[1]
    assert b["f1"].address in result.stdout and b["f2"].address in result.stdout
    result = CliRunner().invoke(cli, ["endpoints", "--admin", m.admin, "--why"],
                                prog_name="meshd")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) > 2, result.output


def _rings(m: Meshd) -> list[Path]:
    cfg_dir = Path(m._shm_dir or "")
    return sorted(cfg_dir.glob("*.dec"))


def test_a_worker_killed_and_restarted(setup):
    """SIGKILL a worker under traffic: its ring goes with its slot, the new worker's
    comes, and the reader answers whole records throughout."""
    m, _ = setup
    port = m.ports["outbound"]
    victim, other = m.worker_pids()
    _get(port, "/", "web", 20)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(m.worker_pids()) == 2 and victim not in m.worker_pids(),
             timeout=20, what="a new worker")
    m.wait_ready()
    new = next(p for p in m.worker_pids() if p != other)

    def recorded_by_new() -> bool:
        _get(port, "/", "web", 10)
        return any(d["worker"]["pid"] == new
                   for d in _decisions(m, "service=web&limit=100")["decisions"])
    wait_for(recorded_by_new, timeout=20, what="the new worker's decisions")
    data = _decisions(m, f"limit={MAX_LIMIT}")
    assert victim not in {w["pid"] for w in data["workers"]}   # unlinked when reaped
    for d in data["decisions"]:
        assert d["worker"]["pid"] in (other, new) and d["service"] in ("web", "flaky", "five", "dead")
        assert d["pick"] and d["balancer"] in fmt.MODES and d["attempt"] >= 1
    assert len(_rings(m)) == 2


def test_a_retired_worker_takes_its_ring_along(setup):
    """TTOU: one worker fewer; its slot is not reused, and its ring goes when the master
    reaps it."""
    m, _ = setup
    m.signal(signal.SIGTTOU)
    wait_for(lambda: len(m.worker_pids()) == 1 and len(_rings(m)) == 1, timeout=30,
             what="one worker and one ring left")
    assert [w["pid"] for w in _decisions(m, "")["workers"]] == m.worker_pids()


def test_rings_are_removed_when_meshd_stops(setup):
    m, _ = setup
    assert _rings(m)
    m.stop()
    assert _rings(m) == []
