"""Counters never go backwards while the master lives (issue 20): the control process's
own counters survive a new control process (kill -9, a HUP's new generation), and a
binary upgrade (USR2) starts its new region from the old master's counters."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MeshFactory

from meshd import shm
from meshd.control.admin import MAX_CONNECTIONS
from meshd.control.counters import Counters
from meshd.shm import KIND_CONTROL, OFF_MASTER_PID, STATE_SERVING, Region, counter_key
from meshd.testing.harness import Backend, KeepAliveLoad, Meshd, http_get, wait_for

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chaos.scrape import counter_samples  # noqa: E402

WEB = {"Host": "web"}
ERRORS = ("meshd_discovery_errors_total", 'service="web",source="local"')
EVICTED = ("meshd_admin_connections_closed_total", 'reason="evicted"')


# -- the tables, in one process ---------------------------------------------------------------

@pytest.fixture
def region(tmp_path: Path) -> Region:
    return Region.create(str(tmp_path / "r.shm"), 8, 4)


def test_a_counter_is_summed_over_every_slots_table(region: Region) -> None:
    key = counter_key('meshd_discovery_errors_total{service="a",source="s"}')
    assert region.ctl_add(3, key, 2) and region.ctl_add(5, key)
    assert region.ctl_total(key) == 3
    assert region.ctl_total(counter_key("other")) == 0
    assert region.ctl_totals() == {key: 3}
    # keys with the top bit set (stored in a signed view) read back the same
    high = next(k for k in (counter_key(f"n{i}") for i in range(100)) if k >= 1 << 63)
    assert region.ctl_add(0, high, 5) and region.ctl_total(high) == 5
    assert region.ctl_totals()[high] == 5


def test_a_full_table_keeps_new_names_in_memory(region: Region) -> None:
    c = Counters()
    c.bind(region, 1)
    names = [f"x{i}" for i in range(shm.CTL_ENTRIES + 10)]
    for name in names:
        c.add(name)
    assert all(c.value(name) == 1 for name in names)
    assert 0 < len(c.local) < len(names)     # only names that found no room
    assert region.ctl_total(counter_key(names[0])) == 1


def test_tables_follow_a_grown_region(region: Region, tmp_path: Path) -> None:
    key = counter_key("k")
    region.ctl_add(2, key, 7)
    grown = Region.create(str(tmp_path / "g.shm"), 8, 16)
    shm.copy_region(region, grown)
    assert grown.ctl_total(key) == 7


def test_carry_slots_copies_counts_and_zeroes_gauges(region: Region, tmp_path: Path) -> None:
    stripe = region.stripe(1)
    stripe.add(2, shm.F_REQUESTS, 5)
    stripe.add(2, shm.F_TCP_OPEN, 3)
    region.ctl_add(1, counter_key("k"), 4)
    region.publish_usage(rows=3)   # what its control process assigned
    new = Region.create(str(tmp_path / "n.shm"), 8, 8)
    shm.carry_slots(region, new, 2)
    assert new.row_totals(2)[shm.F_REQUESTS] == 5
    assert new.row_totals(2)[shm.F_TCP_OPEN] == 0
    assert new.ctl_total(counter_key("k")) == 4
    stripe.add(2, shm.F_REQUESTS, 1)          # the old process counts on: copied again
    shm.carry_slots(region, new, 2)
    assert new.row_totals(2)[shm.F_REQUESTS] == 6
    assert list(new.slots_in_use()) == []    # no process record is carried


# -- a real meshd ---------------------------------------------------------------------------

def _mesh_with_file(mesh: MeshFactory, tmp_path: Path, web: Backend) -> tuple[Meshd, Path]:
    services = tmp_path / "services.toml"
    services.write_text(f'web = ["{web.address}"]\n')
    text, ports = mesh.config({})
    text = text.replace('plugin = "static"\n[discovery.services]\n',
                        f'plugin = "static"\nfile = "{services}"\ninterval = "100ms"\n')
    return mesh.start(text, ports), services


def _admin(m: Meshd) -> tuple[str, int]:
    host, _, port = m.admin.rpartition(":")  # type: ignore[union-attr]
    return host, int(port)


def _count_control_events(m: Meshd, services: Path, web: Backend) -> tuple[float, float]:
    """One failed discovery watch (the file made invalid, then good again) and admin
    connections evicted at the cap: two counters only the control process keeps."""
    services.write_text("web = [\n")
    errors = m.wait_metric(*ERRORS, at_least=1)
    services.write_text(f'web = ["{web.address}"]\n')
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS + 3):
            idle.append(socket.create_connection(_admin(m), timeout=5))
        evicted = m.wait_metric(*EVICTED, at_least=3)
    finally:
        for s in idle:
            s.close()
    return errors, evicted


def _one_serving_control(m: Meshd, not_pid: int) -> int:
    """Wait until exactly one control process is in the table, serving, not ``not_pid``
    (so nothing else answers the admin port), and answering; return its pid."""
    def one() -> int:
        controls = [s for s in m.slots(KIND_CONTROL)]
        if len(controls) != 1 or controls[0].pid == not_pid or controls[0].state != STATE_SERVING:
            return 0
        try:
            return controls[0].pid if http_get(*_admin(m), "/live", timeout=2)[0] == 200 else 0
        except OSError:
            return 0
    return int(wait_for(one, timeout=30, what="one new control process serving"))


@pytest.mark.parametrize("how", ["kill9", "hup"])
def test_control_counters_survive_a_new_control_process(
        mesh: MeshFactory, backends: Callable[..., Backend], tmp_path: Path, how: str) -> None:
    web = backends("web")
    m, services = _mesh_with_file(mesh, tmp_path, web)
    errors, evicted = _count_control_events(m, services, web)
    old = m.control_pids()[0]
    if how == "kill9":
        os.kill(old, signal.SIGKILL)
    else:
        m.signal(signal.SIGHUP)
    _one_serving_control(m, old)
    m.wait_ready()
    assert m.metric(*ERRORS) >= errors
    assert m.metric(*EVICTED) >= evicted


def test_usr2_keeps_every_counter(mesh: MeshFactory, backends: Callable[..., Backend],
                                  tmp_path: Path) -> None:
    """Under load, a binary upgrade: every counter sample of the old master's last scrape
    is there after the old master is gone, and not lower."""
    web = backends("web")
    m, services = _mesh_with_file(mesh, tmp_path, web)
    _count_control_events(m, services, web)
    load = KeepAliveLoad("127.0.0.1", m.ports["outbound"], 4, "/", WEB).start()  # type: ignore[attr-defined]
    new_master = 0
    try:
        wait_for(lambda: load.ok >= 50, timeout=30, what="the load running")
        before = _counter_samples(m)
        m.signal(signal.SIGUSR2)
        assert m.wait(30) == 0   # the old master hands over, drains and exits
        with m.region() as r:
            new_master = r.get_u32(OFF_MASTER_PID)
        ok = load.ok
        wait_for(lambda: load.ok > ok + 50, timeout=30, what="the new master serving the load")
        after = _counter_samples(m)
    finally:
        load.stop()
        if new_master:
            os.kill(new_master, signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{new_master}/status")
                     or "zombie" in open(f"/proc/{new_master}/status").read(), timeout=20,
                     what="the new master to stop")
    lower = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1) < v}
    assert lower == {}
    requests = [k for k in before if k.startswith("request_total{") and 'service="web"' in k]
    assert requests and sum(after[k] for k in requests) > sum(before[k] for k in requests)
    assert "carrying the counters of the old master" in m.log()


def _counter_samples(m: Meshd) -> dict[str, float]:
    body = http_get(*_admin(m), "/metrics")[2].decode()
    return counter_samples(body)
