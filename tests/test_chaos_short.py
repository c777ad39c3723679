"""The short versions of `make chaos` and `make soak` (chaos/): a chaos run of ~15 s with
a few seeded faults in a fixed order, and a ~10 s soak, each checked against its aims."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chaos.report import render  # noqa: E402
from chaos.run import run_chaos  # noqa: E402
from chaos.soak import render_soak, run_soak  # noqa: E402
from meshd.testing.harness import require_tool  # noqa: E402

# A discovery outage first (so the control process has counted discovery errors), then
# a worker killed, the control process killed and a HUP storm (10 in 5 s). The load has
# HTTP/1.1, HTTP/2, opaque TCP and WebSocket clients.
FAULTS = ("discovery_outage", "kill9", "control_kill", "hup_storm")


@pytest.fixture(scope="module")
def chaos_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    report = run_chaos(21, seed=7, topology="one", out=tmp_path_factory.mktemp("chaos"),
                       kinds=FAULTS, outage=2.0, hold=2.0, gap=1.5, ordered=True,
                       baseline=3.0)
    print(render(report))
    return report


def test_short_chaos_injected_its_faults(chaos_report: dict[str, Any]) -> None:
    assert [f["kind"] for f in chaos_report["faults"]] == list(FAULTS), chaos_report["faults"]
    assert chaos_report.get("scheduler_errors") == []
    assert chaos_report["sent"] > 500
    assert set(chaos_report["requests"]) == {"h1_get", "h1_post", "h2_get", "tcp", "ws"}


def test_short_chaos_every_failure_is_explained(chaos_report: dict[str, Any]) -> None:
    """Only the killed worker's own connections may fail: no GET is lost to a HUP storm,
    a discovery outage or a control process restart."""
    assert chaos_report["unexplained"] == {}, chaos_report["unexplained_samples"]
    assert chaos_report["duplicated_posts"] == 0, chaos_report["duplicated_samples"]


def test_short_chaos_shm_counters_never_go_backwards(chaos_report: dict[str, Any]) -> None:
    """The counters in the shared region (request_total, response_total, tcp_*) survive a
    killed worker, a HUP storm and a control process restart (the control process's own
    too: test_short_chaos_no_counter_goes_backwards)."""
    backwards = [b for b in chaos_report["counters_backwards"] if not b["documented"]]
    assert backwards == []
    assert chaos_report["scrapes"]["a"]["ok"] >= 10


def test_short_chaos_no_counter_goes_backwards(chaos_report: dict[str, Any]) -> None:
    """Not even the control process's own counters (meshd_discovery_errors_total...):
    they live in the region's control tables, so a new control process continues them."""
    assert chaos_report["counters_backwards"] == []


@pytest.fixture(scope="module")
def soak_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tool("h2load")
    out = tmp_path_factory.mktemp("soak")
    result = run_soak(8, out, burst_every=3.0, fds_wait=6.0)
    result["out"] = out
    print(render_soak(result))
    return result


def test_short_soak_serves_every_request(soak_result: dict[str, Any]) -> None:
    assert soak_result["requests"] > 200
    assert soak_result["h2load_bursts_at_s"], "no h2load burst ran"
    assert soak_result["failed"] == 0, soak_result["failures"]
    assert soak_result["connections"] > 20   # churn: new client connections all along
    csv = (soak_result["out"] / "soak.csv").read_text().splitlines()
    assert csv[0] == "t_s,pid,role,rss_kib,fds" and len(csv) > 10
    assert {"master", "control", "worker"} <= {line.split(",")[2] for line in csv[1:]}


def test_short_soak_fds_back_after_the_load(soak_result: dict[str, Any]) -> None:
    """3 s after the load stops, every meshd process holds the fds it held before it."""
    assert soak_result["fds_back_after_s"] is not None, soak_result.get("extra_sockets")
    assert soak_result["fds_back_after_s"] <= 3.0, soak_result.get("extra_sockets")
