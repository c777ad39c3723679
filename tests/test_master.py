"""The master with real processes and signals: reloads, crashes, hangs, draining,
scaling, binary upgrade, boot failures, systemd socket activation and sd_notify."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from meshd.shm import (
    F_TCP_OPEN,
    F_TCP_OPEN_TOTAL,
    KIND_WORKER,
    OFF_GENERATION,
    OFF_MASTER_PID,
    STATE_SERVING,
    Region,
)
from meshd.testing.harness import KeepAliveLoad, http_get, wait_for

WEB = {"Host": "web"}


def _serving_workers(m, count: int) -> list[int]:
    return wait_for(lambda: (p := m.worker_pids(STATE_SERVING)) and len(p) == count and p,
                    timeout=15, what=f"{count} serving workers")


def test_ten_hups_under_load_lose_nothing(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    load = KeepAliveLoad("127.0.0.1", m.ports["outbound"], 32, "/", WEB).start()
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(m.metric("request_total", 'service="web"'))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(0.5)
        for _ in range(10):
            m.signal(signal.SIGHUP)
            time.sleep(0.6)
        with m.region() as r:
            wait_for(lambda: r.get_u64(OFF_GENERATION) == 11, what="generation 11")
        _serving_workers(m, 2)
        time.sleep(1.0)
    finally:
        load.stop()
        stop.set()
        sampler.join()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 500
    assert len(seen) > 20
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False)), seen
    # the last generation counts as a reload once it serves (a busy machine boots slowly)
    wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="success"') >= 1,
             timeout=15, what="a successful reload counted")
    assert m.metric("meshd_config_reloads_total", 'result="failure"') == 0


def test_hup_with_invalid_config_keeps_old_one(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    good = m.config_path.read_text()
    m.config_path.write_text(good.replace('drain_timeout = "10s"', 'drain_timeout = "ten"'))
    m.signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in m.log(), what="the rejection in the log")
    assert re.search(r"reload rejected.*drain_timeout: ", m.log())
    assert http_get("127.0.0.1", m.ports["outbound"], "/", WEB)[0] == 200
    assert m.metric("meshd_config_reloads_total", 'result="failure"') == 1
    with m.region() as r:
        assert r.get_u64(OFF_GENERATION) == 1


def test_killed_worker_is_replaced_and_only_its_connections_fail(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    load = KeepAliveLoad("127.0.0.1", m.ports["outbound"], 16, "/", WEB).start()
    try:
        time.sleep(1.0)
        victim = m.slots(KIND_WORKER)[0]
        with m.region() as r:
            # Client connections on the victim: its stripe's open-connection gauges.
            open_on_victim = sum(r.read_field(victim.index, row, F_TCP_OPEN) for row in range(r.rows))
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        new = wait_for(lambda: victim.pid not in (p := m.worker_pids(STATE_SERVING))
                       and len(p) == 2 and p, timeout=5, what="a replacement worker")
        replaced_in = time.monotonic() - killed_at
        time.sleep(0.5)
    finally:
        load.stop()
    assert new
    assert replaced_in < 2.0
    assert len(load.failed_connections) <= open_on_victim
    assert load.ok > 100
    assert m.metric("meshd_worker_restarts_total") == 1


def test_stopped_worker_is_killed_after_worker_timeout(mesh, backends):
    a = backends("a")
    text, ports = mesh.config({"web": [a.address]})
    m = mesh.start(text.replace('worker_timeout = "5s"', 'worker_timeout = "1s"'), ports)
    victim = m.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_for(lambda: victim not in m.worker_pids() and len(m.worker_pids(STATE_SERVING)) == 2,
                 timeout=10, what="the stopped worker replaced")
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert re.search(rf"worker {victim} .*silent for", m.log())
    assert http_get("127.0.0.1", m.ports["outbound"], "/", WEB)[0] == 200


def test_term_drains_slow_request_and_refuses_new_connections(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    result: dict[str, object] = {}

    def slow() -> None:
        result["resp"] = http_get("127.0.0.1", m.ports["outbound"], "/slow?ms=2000", WEB, timeout=10)
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)
    m.signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=0.5).close()
            return False
        except ConnectionRefusedError:
            return True
    wait_for(refused, timeout=1.0, what="new connections refused")
    assert t.is_alive()  # the slow request is still in flight while we are refused
    t.join(10)
    status, _, body = result["resp"]  # type: ignore[misc]
    assert status == 200 and body == b"a /slow\n"
    assert m.wait(15) == 0


def test_ttin_ttou_change_worker_count(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    m.signal(signal.SIGTTIN)
    _serving_workers(m, 3)
    m.signal(signal.SIGTTOU)
    wait_for(lambda: len(m.worker_pids()) == 2, timeout=15, what="two workers")
    # One at a time: the kernel merges a second TTOU that arrives before the first is seen.
    m.signal(signal.SIGTTOU)
    wait_for(lambda: len(m.worker_pids()) == 1, timeout=15, what="one worker")
    assert http_get("127.0.0.1", m.ports["outbound"], "/", WEB)[0] == 200
    assert m.metric("meshd_workers") == 1


def test_usr2_upgrades_without_failed_requests(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    old_master = m.pid
    load = KeepAliveLoad("127.0.0.1", m.ports["outbound"], 16, "/", WEB).start()
    new_master = 0
    try:
        time.sleep(0.5)
        m.signal(signal.SIGUSR2)
        assert m.wait(30) == 0  # the old master hands over and drains
        r = Region.attach(m.shm_path)
        new_master = r.get_u32(OFF_MASTER_PID)
        r.close()
        assert new_master not in (0, old_master)
        time.sleep(1.0)
    finally:
        load.stop()
        if new_master:
            os.kill(new_master, signal.SIGTERM)
            wait_for(lambda: _gone(new_master), timeout=20, what="the new master to stop")
    assert load.failures == [], load.failures[:5]
    assert load.ok > 200
    assert "binary upgrade: telling the old master" in m.log()


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts: the orphaned new master's parent is init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_worker_that_cannot_boot_halts_master_with_exit_3(mesh, backends, tmp_path):
    a = backends("a")
    broken = tmp_path / "broken"
    (broken / "gevent").mkdir(parents=True)
    (broken / "gevent" / "__init__.py").write_text('raise ImportError("gevent is broken here")\n')
    env = dict(os.environ, PYTHONPATH=str(broken))
    m = mesh.run({"web": [a.address]}, env=env, wait_ready=False)
    assert m.wait(30) == 3
    log = m.log()
    assert "could not boot: ImportError: gevent is broken here" in log
    assert "halting with exit code 3" in log
    # No restart storm: each process was started once.
    assert len(re.findall(r"spawned (worker|control)", log)) <= 3


def test_listen_fds_socket_activation(mesh, backends):
    a = backends("a")
    text, ports = mesh.config({"web": [a.address]})
    path = mesh.tmp_path / "activated.toml"
    path.write_text(text)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", ports["outbound"]))
    sock.listen(16)
    fd = sock.fileno()

    def to_fd3() -> None:
        os.dup2(fd, 3)
    # systemd sets LISTEN_PID to the pid it execs: `exec` in sh keeps the shell's pid.
    proc = subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh",
         sys.executable, "-m", "meshd", "run", "-c", str(path)],
        preexec_fn=to_fd3, pass_fds=(3,), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _ready(ports["admin"]), timeout=20, what="activated meshd ready")
        # The test still holds the listening socket, so meshd cannot have bound the port
        # itself: the answer proves it serves on the inherited fd.
        assert http_get("127.0.0.1", ports["outbound"], "/x", WEB)[:3:2] == (200, b"a /x\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        sock.close()
    assert proc.returncode == 0
    assert f"inherited listening socket 127.0.0.1:{ports['outbound']}".encode() in err


def _ready(admin_port: int) -> bool:
    try:
        return http_get("127.0.0.1", admin_port, "/ready", timeout=1)[0] == 200
    except OSError:
        return False


def test_sd_notify_messages(mesh, backends, tmp_path):
    a = backends("a")
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="400000")
    m = mesh.run({"web": [a.address]}, env=env, wait_ready=False)
    messages: list[str] = []

    def expect(field: str) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = sock.recv(4096).decode()
            messages.append(msg)
            if field in msg.split("\n"):
                return
        pytest.fail(f"no {field} in {messages}")
    try:
        expect("READY=1")
        assert f"MAINPID={m.pid}" in messages[-1]
        expect("WATCHDOG=1")
        m.signal(signal.SIGHUP)
        expect("RELOADING=1")
        expect("READY=1")
        m.signal(signal.SIGTERM)
        expect("STOPPING=1")
        assert m.wait(20) == 0
    finally:
        sock.close()


def test_control_process_is_supervised_like_a_worker(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    [control] = m.control_pids()
    os.kill(control, signal.SIGKILL)
    wait_for(lambda: (c := m.control_pids()) and control not in c and _ready(m.ports["admin"]),
             timeout=10, what="a new control process serving the admin API")
    assert http_get("127.0.0.1", m.ports["outbound"], "/", WEB)[0] == 200


def test_workers_share_the_accepted_connections(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    load = KeepAliveLoad("127.0.0.1", m.ports["outbound"], 24, "/", WEB).start()
    time.sleep(1.5)
    load.stop()
    assert load.failures == []
    with m.region() as r:
        per_worker = [sum(r.read_field(s.index, row, F_TCP_OPEN_TOTAL) for row in range(r.rows))
                      for s in r.slots_in_use() if s.kind == KIND_WORKER]
    # Every worker took a fair part of the 24 connections (none starved).
    assert len(per_worker) == 2 and min(per_worker) >= 4, per_worker


def test_a_burst_of_connections_is_spread_over_the_workers(mesh, backends):
    """16 connections opened at once (as an HTTP/2 client or a peer meshd opens its few
    long-lived ones): without accept balancing the first worker to wake takes them all."""
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    socks = [socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10)
             for _ in range(16)]
    try:
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        for s in socks:
            assert s.recv(65536).startswith(b"HTTP/1.1 200")

        def open_per_worker() -> list[int]:
            with m.region() as r:
                return [sum(r.read_field(w.index, row, F_TCP_OPEN) for row in range(r.rows))
                        for w in r.slots_in_use() if w.kind == KIND_WORKER]
        wait_for(lambda: sum(open_per_worker()) == 16, timeout=5, what="16 open connections")
        per_worker = open_per_worker()
        with m.region() as r:  # what the workers publish for each other (slot +48)
            published = [w.connections for w in r.slots_in_use() if w.kind == KIND_WORKER]
        assert sorted(published) == sorted(per_worker)
        assert len(per_worker) == 2 and min(per_worker) >= 5, per_worker
    finally:
        for s in socks:
            s.close()


def test_stat_reads_shared_memory_read_only(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    for _ in range(7):
        assert http_get("127.0.0.1", m.ports["outbound"], "/", WEB)[0] == 200
    out = subprocess.run([sys.executable, "-m", "meshd", "stat", "--shm", str(m.config_path),
                          "-o", "json"], capture_output=True, text=True, timeout=20, check=True)
    rows = json.loads(out.stdout)["rows"]
    [web] = [r for r in rows if r["service"] == "web"]
    assert web["requests_total"] == 7 and web["success_rate"] == 1.0


def _ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)


def test_children_ignore_the_masters_own_signals(mesh, backends):
    """`systemctl kill -s USR2 meshd` signals every process of the unit: a worker or the
    control process taking USR2's (or HUP's, TTIN's, TTOU's) default action would die."""
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    children = _serving_workers(m, 1) + m.control_pids()
    for pid in children:
        ignored = _ignored_signals(pid)
        for sig in (signal.SIGUSR2, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            assert ignored & (1 << (sig - 1)), (pid, sig.name)
        assert not ignored & (1 << (signal.SIGTERM - 1))  # the drain still works
    assert not _ignored_signals(m.pid) & (1 << (signal.SIGUSR2 - 1))
