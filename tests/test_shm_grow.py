"""Shared memory grows on reload: the sizing rule, the copy between layouts, the control
process publishing its usage and saying loudly when rows run out, and real meshd
processes growing the region under load without losing a count or a request."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd import config as config_mod
from meshd import rowkeys, shm
from meshd.control.health import EndpointRows
from meshd.control.rows import RowTable
from meshd.discovery.api import Endpoint
from meshd.errors import ShmError
from meshd.master.arbiter import Arbiter, Child
from meshd.shm import (
    F_REQUESTS,
    F_TCP_OPEN,
    FIELDS,
    KIND_CONTROL,
    KIND_WORKER,
    OFF_GENERATION,
    OFF_RELOADS,
    OFF_RESTARTS,
    OFF_ROWS_EXHAUSTED,
    OFF_SLOTS_USED,
    STATE_SERVING,
    Region,
    copy_region,
    copy_slot,
    grown_rows,
    region_size,
)
from meshd.snapshot import read as read_snapshot
from meshd.snapshot import snapshot_path
from meshd.testing.harness import KeepAliveLoad, http_get, wait_for

SLOTS = 4

# -- the sizing rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "configured", "used", "expected"), [
    (16, 16, 4, 16),       # little used: stays
    (16, 16, 12, 16),      # exactly 3/4: not yet
    (16, 16, 13, 32),      # past 3/4: doubled until under half
    (16, 16, 24, 64),      # refused pairs count too: 24 < 64 / 2
    (16, 8, 4, 16),        # the config asks for less: never shrinks
    (16, 40, 4, 40),       # the config asks for more: that much
    (16, 40, 30, 80),      # ... and doubled from there while usage is not under half
    (shm.MAX_ROWS, shm.MAX_ROWS, shm.MAX_ROWS, shm.MAX_ROWS),   # capped
])
def test_grown_rows(capacity: int, configured: int, used: int, expected: int) -> None:
    assert grown_rows(capacity, configured, used) == expected


# -- copying between layouts ---------------------------------------------------------------------

@pytest.fixture
def small(tmp_path: Path) -> Iterator[Region]:
    r = Region.create(str(tmp_path / "meshd-grow.shm"), SLOTS, 8, 16)
    yield r
    r.close()


def _fill(region: Region) -> None:
    """Distinct values in every counter of slots 0 and 2, endpoints, health and header."""
    for slot in (0, 2):
        region.claim_slot(slot, 1, KIND_WORKER if slot else KIND_CONTROL)
        region.set_pid(slot, 1000 + slot)
        stripe = region.stripe(slot)
        for row in range(region.rows):
            for field in range(FIELDS):
                stripe.add(row, field, 1 + slot * 100_000 + row * 1000 + field)
        eps = region.ep_stripe(slot)
        for row in range(region.endpoint_rows):
            for _ in range(row + slot + 1):
                eps.started(row)
                eps.finished(row, 0.001 * (row + 1), time.monotonic(), failure=row % 3 == 0)
            eps.started(row)      # one in flight
    for row in range(region.endpoint_rows):
        region.set_health(row, (1.0, float(row), 2.0, 3.0, 4.0, 5.0))
    region.set_u64(OFF_GENERATION, 7)
    region.add_u64(OFF_RELOADS, 6)
    region.add_u64(OFF_RESTARTS, 5)
    region.add_u64(OFF_ROWS_EXHAUSTED, 4)
    region.publish_usage(rows=8, endpoint_rows=19)


def test_copy_region_keeps_every_row_where_it_was(small: Region) -> None:
    _fill(small)
    final = small.path
    big = Region.create(final, SLOTS, 32, 64, publish=False)
    try:
        assert big.path != final and os.path.dirname(big.path) == os.path.dirname(final)
        copy_region(small, big)
        for offset in (OFF_GENERATION, OFF_RELOADS, OFF_RESTARTS, OFF_ROWS_EXHAUSTED):
            assert big.get_u64(offset) == small.get_u64(offset)
        assert big.get_u32(OFF_SLOTS_USED) == 3
        assert (big.rows_used, big.endpoint_rows_used) == (8, 19)
        assert big.started_at == small.started_at
        for slot in range(SLOTS):
            assert big.read_slot(slot) == small.read_slot(slot)
            for row in range(small.rows):
                assert small.row_totals(row) == big.row_totals(row)
                for field in range(FIELDS):
                    assert big.read_field(slot, row, field) == small.read_field(slot, row, field)
            for row in range(small.endpoint_rows):
                assert big.ep_read(slot, row) == small.ep_read(slot, row)
            for row in range(small.endpoint_rows, big.endpoint_rows):
                assert big.ep_read(slot, row) == (0, 0.0, 0.0, 0, 0)
        for row in range(small.rows, big.rows):
            assert big.row_totals(row) == [0] * FIELDS
        for row in range(small.endpoint_rows):
            assert big.health(row) == small.health(row)
        # Published: readers by name now find the grown region.
        big.publish(final)
        reader = Region.attach(final)
        try:
            assert (reader.rows, reader.endpoint_rows) == (32, 64)
            assert os.path.getsize(final) == region_size(SLOTS, 32, 64)
            assert reader.row_totals(5) == small.row_totals(5)
        finally:
            reader.close()
    finally:
        big.close()


def test_copy_slot_folds_a_drained_stripe_in(small: Region) -> None:
    """The old generation's process in slot 2 keeps counting after the copy; the new one
    in slot 3 counts in the grown region. After the reap nothing is lost or doubled."""
    _fill(small)
    big = Region.create(small.path, SLOTS, 32, 64, publish=False)
    try:
        copy_region(small, big)
        old = small.stripe(2)
        old.add(5, F_REQUESTS, 7)
        old.add(5, F_TCP_OPEN, 1)
        small.ep_stripe(2).finished(3, 0.01, time.monotonic(), failure=True)
        big.claim_slot(3, 2, KIND_WORKER)
        big.stripe(3).add(20, F_REQUESTS, 11)       # a row only the grown region has
        before = big.row_totals(5)[F_REQUESTS]
        copy_slot(small, big, 2)                     # the master's sync while it drains
        assert big.row_totals(5)[F_REQUESTS] == before + 7
        assert big.read_slot(2) == small.read_slot(2)
        small.free_slot(2)                           # reaped: gauges zeroed, counts kept
        copy_slot(small, big, 2)
        assert big.read_field(2, 5, F_REQUESTS) == small.read_field(2, 5, F_REQUESTS)
        assert big.read_field(2, 5, F_TCP_OPEN) == 0
        assert big.ep_read(2, 3) == small.ep_read(2, 3)
        assert big.ep_read(2, 3)[0] == 0               # in-flight zeroed
        assert big.read_slot(2).pid == 0
        assert big.row_totals(5)[F_REQUESTS] == small.row_totals(5)[F_REQUESTS]
        assert big.read_field(3, 20, F_REQUESTS) == 11  # the new writer's slot untouched
        # Back the other way (a grown generation that failed to boot): common rows only.
        copy_slot(big, small, 3)
        assert small.read_field(3, 5, F_REQUESTS) == big.read_field(3, 5, F_REQUESTS)
    finally:
        big.close()
        os.unlink(big.path)


def test_copy_region_refuses_a_smaller_region(small: Region, tmp_path: Path) -> None:
    smaller = Region.create(str(tmp_path / "other.shm"), SLOTS, 4, 16)
    try:
        with pytest.raises(ShmError, match="cannot hold a copy"):
            copy_region(small, smaller)
    finally:
        smaller.close()


def test_unpublished_regions_never_clobber_each_other(small: Region) -> None:
    a = Region.create(small.path, SLOTS, 16, 16, publish=False)
    b = Region.create(small.path, SLOTS, 32, 16, publish=False)
    try:
        assert len({a.path, b.path, small.path}) == 3
        a.stripe(0).add(3, F_REQUESTS, 9)
        assert a.read_field(0, 3, F_REQUESTS) == 9
    finally:
        for r in (a, b):
            r.close()
            os.unlink(r.path)


# -- the control process publishes usage and is loud when full -----------------------------------

def test_row_table_publishes_usage_and_warns(small: Region, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshd.control")
    table = RowTable(small, {"out": {"": 2}})
    assert small.rows_used == 3
    for i in range(4):
        table.ensure("out", f"s{i}")
    assert small.rows_used == 7
    assert "will grow at the next reload" in caplog.text   # 7 of 8 > 3/4
    table.ensure("out", "s4")
    table.ensure("out", "s5")          # no row left
    table.ensure("out", "s5")          # counted once
    assert small.get_u64(OFF_ROWS_EXHAUSTED) == 1
    assert small.rows_used == 9        # what the region needs: 8 assigned + 1 refused
    assert 'counted under service="_overflow"' in caplog.text
    assert grown_rows(small.rows, 8, small.rows_used) == 32


def test_endpoint_rows_count_and_log_exhaustion(small: Region,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshd.control")
    rows = EndpointRows(small, None)
    eps = [Endpoint(f"10.0.0.{i}", 80) for i in range(20)]
    rows.ensure(eps[:12])
    assert small.endpoint_rows_used == 12
    assert "will grow" not in caplog.text
    rows.ensure(eps[:13])
    assert "13 of 16 endpoint rows in use; the region will grow" in caplog.text
    rows.ensure(eps)
    rows.ensure(eps)                   # the same endpoints again: counted once
    assert small.get_u64(OFF_ROWS_EXHAUSTED) == 4
    assert small.endpoint_rows_used == 20
    assert caplog.text.count("no balancer row for endpoint") == 4
    assert len(rows.rows) == 16


# -- real processes ------------------------------------------------------------------------------

def _get(m, service: str) -> int:
    return http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": service}, timeout=10)[0]


def _region_rows(m) -> tuple[int, int, int]:
    with m.region() as r:
        return r.rows, r.endpoint_rows, r.get_u64(OFF_GENERATION)


def _only_generation(m, generation: int) -> bool:
    slots = m.slots()
    return bool(slots) and all(s.generation == generation for s in slots) and sum(
        s.state == STATE_SERVING and s.kind == KIND_WORKER for s in slots) == 2


def _small_mesh(mesh, web: str, endpoints_file: Path | None = None, rows: int = 16):
    text, ports = mesh.config({"web": [web]})
    text = text.replace("workers = 2\n", f"workers = 2\nmetric_rows = {rows}\nendpoint_rows = 16\n", 1)
    if endpoints_file is not None:
        text = text.replace('plugin = "static"\n',
                            f'plugin = "static"\nfile = "{endpoints_file}"\ninterval = "100ms"\n', 1)
    return mesh.start(text, ports), text


def _services(port: int) -> dict[str, str]:
    """20 services, each on its own loopback address of the one backend (distinct
    endpoints, so they need endpoint rows too)."""
    return {f"svc{i:02d}": f"127.0.0.{i + 2}:{port}" for i in range(20)}


def test_region_grows_on_hup_under_load_without_losing_a_count(mesh, backends, tmp_path):
    a = backends("a", host="0.0.0.0")
    endpoints_file = tmp_path / "endpoints.toml"
    endpoints_file.write_text("")
    m, _ = _small_mesh(mesh, f"127.0.0.1:{a.port}", endpoints_file)
    assert _region_rows(m)[:2] == (16, 16)
    for _ in range(25):
        assert _get(m, "web") == 200
    # Twenty more services appear in the watched file; clients ask for them (on demand).
    services = _services(a.port)
    tmp = tmp_path / "endpoints.tmp"
    tmp.write_text("".join(f'{name} = ["{addr}"]\n' for name, addr in services.items()))
    os.rename(tmp, endpoints_file)
    for name in services:
        assert _get(m, name) == 200, name
    wait_for(lambda: m.metric("meshd_shm_rows_exhausted_total") > 0, what="rows exhausted")
    with m.region() as r:
        wait_for(lambda: r.rows_used > 12 and r.endpoint_rows_used > 12, what="usage published")
    overflow_before = m.metric("request_total", 'service="_overflow"')
    assert overflow_before > 0          # the region is full: loudly so
    assert "will grow at the next reload" in m.log()
    assert "shared memory full" in m.log()
    web_before = m.metric("request_total", 'service="web"')
    assert web_before >= 25

    load = KeepAliveLoad("127.0.0.1", m.ports["outbound"], 16, "/", {"Host": "web"}).start()
    try:
        wait_for(lambda: load.ok >= 50, timeout=30, what="the load running")
        m.signal(signal.SIGHUP)
        wait_for(lambda: _region_rows(m) == (64, 64, 2), timeout=30, what="the grown region")
        wait_for(lambda: _only_generation(m, 2), timeout=30, what="generation 1 drained")
        ok = load.ok
        wait_for(lambda: load.ok >= ok + 50, timeout=30, what="generation 2 serving the load")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50
    assert os.path.getsize(m.shm_path) == region_size(shm.slot_count_for(64), 64, 64)
    assert [p for p in os.listdir(os.path.dirname(m.shm_path))
            if p.startswith(os.path.basename(m.shm_path) + ".")] == []   # no temp file left
    assert "shared memory grows for the next generation: metric rows 16 -> 64" in m.log()

    # Every count from before the HUP and during it, once: the old generation's final
    # stripes were folded into the grown region when its processes were reaped.
    expected = web_before + load.ok
    wait_for(lambda: m.metric("request_total", 'service="web"') == expected, timeout=10,
             what=f"web requests == {expected}")
    assert _stat_shm_requests(m, "web") == expected

    # The new services now have rows of their own; nothing more goes to _overflow.
    before = {name: m.metric("request_total", f'service="{name}"') for name in services}
    for name in services:
        for _ in range(3):
            assert _get(m, name) == 200, name
    for name in services:
        wait_for(lambda name=name: m.metric("request_total", f'service="{name}"') == before[name] + 3,
                 timeout=10, what=f"{name} counted under its own service")
    assert m.metric("request_total", 'service="_overflow"') == overflow_before
    # The services' authority rows (meshd.rowkeys: asked for on demand, after the growth,
    # and refused quietly when the region is full) are left out.
    cfg = config_mod.load(str(m.config_path))
    rows = read_snapshot(snapshot_path(cfg.shm_dir, cfg.instance, m.pid, 2)).rows
    authority_rows = sum(1 for by_key in rows.values() for k in by_key if rowkeys.parts(k).authority)
    with m.region() as r:
        assert r.rows_used - authority_rows <= 32 and r.endpoint_rows_used <= 32   # under half now
    assert m.metric("meshd_config_reloads_total", 'result="success"') == 1


def _stat_shm_requests(m, service: str) -> int:
    out = subprocess.run([sys.executable, "-m", "meshd", "stat", "--shm", str(m.config_path),
                          "-o", "json"], capture_output=True, text=True, timeout=30, check=True)
    rows = json.loads(out.stdout)["rows"]
    return sum(r["requests_total"] for r in rows if r["service"] == service)


def test_hup_raising_metric_rows_is_accepted_and_grows(mesh, backends):
    a = backends("a")
    m, text = _small_mesh(mesh, a.address)
    for _ in range(10):
        assert _get(m, "web") == 200
    before = m.metric("request_total", 'service="web"')
    m.config_path.write_text(text.replace("metric_rows = 16", "metric_rows = 40"))
    m.signal(signal.SIGHUP)
    wait_for(lambda: _region_rows(m) == (40, 16, 2), timeout=30, what="40 metric rows")
    wait_for(lambda: _only_generation(m, 2), timeout=30, what="generation 1 drained")
    assert m.metric("request_total", 'service="web"') == before
    assert _get(m, "web") == 200
    wait_for(lambda: m.metric("request_total", 'service="web"') == before + 1, what="counted")
    assert m.metric("meshd_config_reloads_total", 'result="failure"') == 0
    # Asking for fewer rows again is no error either: the region keeps its size.
    m.config_path.write_text(text)
    m.signal(signal.SIGHUP)
    wait_for(lambda: _region_rows(m) == (40, 16, 3), timeout=30, what="generation 3")
    wait_for(lambda: "a region never shrinks" in m.log(), what="the info log")
    assert m.metric("meshd_config_reloads_total", 'result="failure"') == 0


# -- the master's bookkeeping: one region per generation, folded on reap -------------------------

def _sleeper() -> int:
    """A stand-in child process the arbiter can signal and reap."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(60)
        finally:
            os._exit(0)
    return pid


@pytest.fixture
def arbiter(tmp_path: Path) -> Iterator[Arbiter]:
    path = tmp_path / "meshd.toml"
    path.write_text(f'shm_dir = "{tmp_path}/shm"\nstate_dir = "{tmp_path}/state"\n'
                    f'instance = "grow"\nmetric_rows = 16\nendpoint_rows = 16\n'
                    '[[listener]]\nname = "out"\nlisten = "127.0.0.1:0"\n'
                    'direction = "outbound"\nprotocol = "http"\n')
    cfg = config_mod.load(str(path))
    os.makedirs(cfg.shm_dir)
    arb = Arbiter(cfg)
    arb.regions.create(1, 8, 16, 16)
    arb.regions.serve(1, ())
    arb.active_generation = 1
    yield arb
    for child in list(arb.children.values()):
        os.kill(child.pid, signal.SIGKILL)
    arb._reap()
    for region in arb.regions.open_regions:
        region.close()


def _child(arb: Arbiter, slot: int, generation: int) -> Child:
    region = arb.regions.current
    region.claim_slot(slot, generation, KIND_WORKER)
    pid = _sleeper()
    region.set_pid(slot, pid)
    child = Child(pid, slot, KIND_WORKER, generation, time.monotonic(), region)
    arb.children[pid] = child
    return child


def _grow_for_generation_2(arb: Arbiter) -> tuple[Region, Region]:
    old = arb.regions.current
    old.publish_usage(rows=14, endpoint_rows=3)
    arb.regions.begin(2, arb.cfg, arb.children.values())
    grown = arb.regions.current
    assert grown is not old and (grown.rows, grown.endpoint_rows) == (32, 16)
    arb.generation = 2
    arb.configs[2] = arb.cfg
    return old, grown


def _reap_all(arb: Arbiter, children: list[Child]) -> None:
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    arb._reap()


def test_master_folds_the_drained_generation_into_the_grown_region(arbiter: Arbiter) -> None:
    arb = arbiter
    old_worker = _child(arb, 1, 1)
    old_stripe = arb.regions.current.stripe(1)
    old_stripe.add(5, F_REQUESTS, 10)
    old, grown = _grow_for_generation_2(arb)
    path = arb.regions.path
    assert grown.path != path and os.path.samefile(old.path, path)
    new_worker = _child(arb, 2, 2)
    grown.stripe(2).add(5, F_REQUESTS, 3)
    grown.stripe(2).add(20, F_REQUESTS, 4)
    old_stripe.add(5, F_REQUESTS, 1)          # the old worker still serves
    arb.regions.sync(arb.children.values())
    assert grown.row_totals(5)[F_REQUESTS] == 14 and old.row_totals(5)[F_REQUESTS] == 14
    assert grown.read_slot(1).pid == old_worker.pid and old.read_slot(2).pid == new_worker.pid
    # Generation 2 serves: its region takes the name; the old one drains, then is reaped.
    arb.regions.serve(2, arb.children.values())
    arb.active_generation = 2
    assert grown.path == path
    old_stripe.add(5, F_REQUESTS, 100)        # its last requests
    _reap_all(arb, [old_worker])
    assert grown.row_totals(5)[F_REQUESTS] == 114
    assert grown.read_slot(1).pid == 0
    assert arb.regions.open_regions == (grown,) and arb.regions.generations == [2]
    reader = Region.attach(path)
    try:
        assert (reader.rows, reader.row_totals(5)[F_REQUESTS]) == (32, 114)
    finally:
        reader.close()


def test_master_abandoning_a_grown_generation_keeps_the_old_region(arbiter: Arbiter) -> None:
    arb = arbiter
    arb.configs[1] = arb.cfg
    old_worker = _child(arb, 1, 1)
    old, grown = _grow_for_generation_2(arb)
    temp = grown.path
    new_worker = _child(arb, 2, 2)
    grown.stripe(2).add(5, F_REQUESTS, 3)
    arb._abandon_generation()                 # generation 2 failed to boot
    assert arb.regions.current is old and arb.generation == 1
    _reap_all(arb, [new_worker])
    assert old.row_totals(5)[F_REQUESTS] == 3  # what it served is kept (rows both have)
    assert not os.path.exists(temp)            # the grown file never got the name
    assert arb.regions.open_regions == (old,)
    assert os.path.samefile(old.path, arb.regions.path)
    assert old_worker.pid in arb.children


def test_master_exit_unlinks_its_regions(arbiter: Arbiter) -> None:
    arb = arbiter
    _, grown = _grow_for_generation_2(arb)    # still at its temporary name
    temp = grown.path
    arb.regions.unlink_all()
    assert not os.path.exists(temp) and not os.path.exists(arb.regions.path)


def test_master_exit_leaves_the_name_to_a_new_master(arbiter: Arbiter) -> None:
    arb = arbiter
    newer = Region.create(arb.regions.path, 8, 16, 16)   # a binary upgrade took the name
    try:
        arb.regions.unlink_all()
        assert os.path.samefile(newer.path, arb.regions.path)
    finally:
        newer.unlink()
        newer.close()
