"""`meshd check --live`: the real command against real meshds (healthy; a Consul source
that refuses, so it never syncs; a failed reload; nobody listening), and the verdicts of
``check_live.evaluate`` over plain answers for what a test meshd cannot easily reach
(rows exhausted, a certificate about to expire)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MeshFactory

from meshd.cli.check_live import FAIL, PASS, SKIP, WARN, evaluate
from meshd.testing.harness import Backend, Meshd, free_port, http_get, wait_for


def check_live(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", "check", "--live", *args],
                          capture_output=True, text=True, timeout=60)


def lines(out: str) -> dict[str, str]:
    """check name -> its line, for the check lines of the table output."""
    found = {}
    for line in out.splitlines():
        if line[:2] in ("✔ ", "× ", "‼ ", "- "):
            found[line[2:].split(":", 1)[0]] = line
    return found


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Meshd]:
    factory = MeshFactory(tmp_path_factory.mktemp("live"))
    a = Backend("a").start()
    try:
        yield factory.run({"web": [a.address]}, workers=2)
    finally:
        for m in factory.started:
            m.stop()
        a.stop()


def test_every_check_passes_on_a_healthy_meshd(healthy):
    out = check_live("--admin", healthy.admin)
    assert out.returncode == 0, out.stdout + out.stderr
    got = lines(out.stdout)
    assert set(got) == {"admin API reachable", "meshd ready", "workers up",
                        "discovery source local (static)", "shm rows", "workload certificate",
                        "config reloads"}, out.stdout
    assert got["workers up"].startswith("✔ workers up: 2 of 2 serving")
    assert got["workload certificate"].startswith("- ")   # no [identity]: not checked
    assert all(line.startswith("✔ ") for name, line in got.items()
               if name != "workload certificate"), out.stdout
    assert "Status check results are ✔" in out.stdout
    js = check_live("--admin", healthy.admin, "-o", "json")
    assert js.returncode == 0
    body = json.loads(js.stdout)
    assert body["ok"] is True and body["admin"] == healthy.admin
    assert {c["result"] for c in body["checks"]} == {PASS, SKIP}


def test_the_admin_address_comes_from_the_config(healthy):
    out = check_live("-c", str(healthy.config_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"meshd at {healthy.admin}" in out.stdout


def test_nobody_listening_fails():
    admin = f"127.0.0.1:{free_port()}"
    out = check_live("--admin", admin)
    assert out.returncode == 1, out.stdout + out.stderr
    got = lines(out.stdout)
    assert got["admin API reachable"].startswith("× admin API reachable: cannot connect")
    assert "Status check results are × (1 failed)" in out.stdout
    body = json.loads(check_live("--admin", admin, "-o", "json").stdout)
    assert body["ok"] is False and body["checks"][0]["result"] == FAIL


def test_a_source_that_never_syncs_fails(mesh):
    refused = free_port()   # nobody listens: the Consul agent "refuses"
    text, ports = mesh.config({}, workers=1, extra=textwrap.dedent(f"""\
        [[discovery]]
        name = "consul"
        plugin = "consul"
        address = "http://127.0.0.1:{refused}"

        [service.web]
        discovery = "consul"
        """))
    m = mesh.start(text, ports, wait_ready=False)
    wait_for(lambda: _status(m, "/status") == 200, timeout=20, what="the admin API")
    out = check_live("--admin", m.admin)
    assert out.returncode == 1, out.stdout + out.stderr
    got = lines(out.stdout)
    source = got["discovery source consul (consul)"]
    assert source.startswith("× ") and "without a first answer: web" in source, out.stdout
    assert got["discovery source local (static)"].startswith("✔ ")
    assert got["meshd ready"].startswith("× meshd ready: /ready 503: not ready, waiting for")
    assert "Status check results are ×" in out.stdout


def test_a_failed_reload_fails(mesh, backends, tmp_path):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    assert check_live("--admin", m.admin).returncode == 0
    good = m.config_path.read_text()
    m.config_path.write_text(good + "\nno_such_key = 1\n")
    m.signal(signal.SIGHUP)
    m.wait_metric("meshd_config_reloads_total", 'result="failure"', 1)
    out = check_live("--admin", m.admin)
    assert out.returncode == 1, out.stdout + out.stderr
    line = lines(out.stdout)["config reloads"]
    assert line.startswith("× config reloads: the last reload failed (1 since generation 1"), line
    # a reload that works starts generation 2: its record is clean
    m.config_path.write_text(good)
    m.signal(signal.SIGHUP)
    # The new control process answers the admin port as soon as it boots; the old one
    # until the master retires it once generation 2 serves (it then stops accepting at
    # once). Wait for that retirement: from then on generation 2 answers.
    wait_for(lambda: {s.generation for s in m.slots()} == {2}, timeout=60,
             what="generation 2 alone in the process table")
    m.wait_ready(60)
    out = check_live("--admin", m.admin)
    assert out.returncode == 0, out.stdout
    assert lines(out.stdout)["config reloads"].startswith(
        "✔ config reloads: none failed since generation 2 started (1 succeeded, 1 failed")


def _hp(m: Meshd) -> tuple[str, int]:
    host, port = m.admin.rsplit(":", 1)
    return host, int(port)


def _status(m: Meshd, path: str) -> int:
    try:
        return http_get(*_hp(m), path, timeout=2)[0]
    except OSError:
        return 0


# -- the verdicts over plain answers ------------------------------------------------------


def _answers(**changes: Any) -> dict[str, tuple[int, bytes]]:
    status: dict[str, Any] = {
        "generation": 3,
        "workers": {"serving": 2, "desired": 2, "restarts_total": 0},
        "reloads": {"success_total": 2, "failure_total": 0, "failed_since_start": 0},
        "rows": {"metric": {"capacity": 1024, "in_use": 10},
                 "endpoint": {"capacity": 4096, "in_use": 10}, "exhausted_total": 0},
        "discovery": {"local": {"plugin": "static", "error": None, "services": 1, "synced": 1,
                                "stale": 0, "pending": [], "pending_total": 0, "failing": [],
                                "failing_total": 0}},
        "identity": None,
    }
    status.update(changes)
    return {"/live": (200, b"live\n"), "/ready": (200, b"ready\n"),
            "/status": (200, json.dumps(status).encode()),
            "/identity": (404 if status["identity"] is None else 200, b"")}


def _verdicts(answers: dict[str, tuple[int, bytes]]) -> dict[str, tuple[str, str]]:
    return {c.name: (c.result, c.detail) for c in evaluate(answers.__getitem__)}


def test_rows_exhausted_fail_and_nearly_full_warn():
    full = {"metric": {"capacity": 1024, "in_use": 1024},
            "endpoint": {"capacity": 4096, "in_use": 10}, "exhausted_total": 3}
    result, detail = _verdicts(_answers(rows=full))["shm rows"]
    assert result == FAIL and detail.startswith("3 pairs or endpoints found no row"), detail
    high = {**full, "exhausted_total": 0, "metric": {"capacity": 1024, "in_use": 800}}
    assert _verdicts(_answers(rows=high))["shm rows"][0] == WARN


def test_certificate_expiry():
    def cert(left: float, lifetime: float) -> dict[str, Any]:
        return {"local_id": "spiffe://cluster.local/ns/default/sa/web", "expires_in_s": left,
                "lifetime_s": lifetime, "not_after": "2026-12-08T00:00:00Z", "error": None}
    day = 86400.0
    assert _verdicts(_answers(identity=cert(8 * 3600, day)))["workload certificate"][0] == PASS
    # a 24h leaf renewed on time (at 2/3) never has less than 8h left; 5h: renewal is late
    result, detail = _verdicts(_answers(identity=cert(5 * 3600, day)))["workload certificate"]
    assert result == WARN and "valid for 5h 0m" in detail and "not renewed" in detail
    # a year-long certificate warns on its last day only
    assert _verdicts(_answers(identity=cert(2 * day, 365 * day)))["workload certificate"][0] == PASS
    assert _verdicts(_answers(identity=cert(day - 60, 365 * day)))["workload certificate"][0] == WARN
    assert _verdicts(_answers(identity=cert(-30, day)))["workload certificate"][0] == FAIL
    none = {"local_id": None, "expires_in_s": None, "lifetime_s": None, "not_after": None,
            "error": "ca.key unreadable"}
    result, detail = _verdicts(_answers(identity=none))["workload certificate"]
    assert result == FAIL and "ca.key unreadable" in detail


def test_workers_missing_and_a_failing_watch_fail():
    v = _verdicts(_answers(
        workers={"serving": 1, "desired": 2, "restarts_total": 4},
        discovery={"consul": {"plugin": "consul", "error": None, "services": 3, "synced": 3,
                              "stale": 0, "pending": [], "pending_total": 0,
                              "failing": [{"service": "web", "error": "503 from the agent"}],
                              "failing_total": 1}}))
    assert v["workers up"] == (FAIL, "1 of 2 serving, 4 restarted since start")
    result, detail = v["discovery source consul (consul)"]
    assert result == FAIL and detail == "1 watch failing (web): 503 from the agent"


def test_an_admin_without_status_is_named():
    answers = _answers()
    answers["/status"] = (404, b"not found\n")
    v = _verdicts(answers)
    assert v["admin API answers"][0] == FAIL and "older than" in v["admin API answers"][1]


def test_check_without_config_or_live_is_a_usage_error(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "meshd", "check"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "or --live" in out.stderr


def test_a_workload_certificate_is_checked(mesh, backends, tmp_path):
    ca = tmp_path / "ca"
    init = subprocess.run([sys.executable, "-m", "meshd", "ca", "init", "--dir", str(ca),
                           "--trust-domain", "lab.example"], capture_output=True, text=True,
                          timeout=60)
    assert init.returncode == 0, init.stderr
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1, extra=textwrap.dedent(f"""\
        [identity]
        provider = "meshd-ca"
        trust_domain = "lab.example"
        dir = "{ca}"
        service = "web"
        ttl = "1h"
        """))
    out = check_live("--admin", m.admin)
    assert out.returncode == 0, out.stdout + out.stderr
    line = lines(out.stdout)["workload certificate"]
    assert re.match(r"✔ workload certificate: spiffe://lab\.example/service/web valid for "
                    r"(59m \d+s|1h 0m), until 20\d\d-", line), line
