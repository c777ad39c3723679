"""`meshd endpoints` against a real meshd: the table, --json, --service, an ejected endpoint
and the recent success rate of a failing one, an unreachable admin API."""

from __future__ import annotations

import http.client
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner, Result

from meshd.cli import cli
from meshd.cli.endpoints import HEADER
from meshd.control.health import EndpointRows, HealthKeeper
from meshd.discovery.api import Endpoint
from meshd.shm import KIND_WORKER, Region
from meshd.testing.harness import free_port, http_get, wait_for


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["endpoints", *args], prog_name="meshd")


def table(m, *args: str) -> dict[str, list[str]]:
    """`meshd endpoints` of a running meshd: endpoint address -> its columns."""
    result = invoke("--admin", m.admin, *args)
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert tuple(header.split()) == HEADER
    rows = [line.split() for line in lines]
    assert all(len(r) == len(HEADER) for r in rows), rows
    return {r[1]: r for r in rows}


def send(port: int, seconds: float, host: str = "web", connections: int = 2) -> int:
    """Requests over keep-alive connections for ``seconds``; how many were answered 200."""
    ok = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < deadline:
            conn.request("GET", "/", headers={"Host": host})
            resp = conn.getresponse()
            resp.read()
            with lock:
                ok[0] += resp.status == 200
        conn.close()
    threads = [threading.Thread(target=run) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    return ok[0]


def test_table_json_and_service_filter(mesh, backends):
    a, b, x = backends("a"), backends("b"), backends("x")
    m = mesh.run({"web": [b.address, a.address], "hold": [x.address]})
    send(m.ports["outbound"], 1.5)
    held = [threading.Thread(target=http_get, args=("127.0.0.1", m.ports["outbound"],
                                                    "/slow?ms=4000", {"Host": "hold"}, 15))
            for _ in range(3)]
    for t in held:
        t.start()
    try:
        wait_for(lambda: table(m)[x.address][3] == "3", timeout=10, what="3 in flight to x")
        # Also through the config file: its [admin] listen.
        result = invoke("-c", str(m.config_path))
        assert result.exit_code == 0, result.output
    finally:
        for t in held:
            t.join(20)
    lines = result.stdout.splitlines()[1:]
    # Sorted by service, then endpoint (port as a number).
    web = sorted([a.address, b.address], key=lambda s: int(s.rpartition(":")[2]))
    assert [(line.split()[0], line.split()[1]) for line in lines] == [
        ("hold", x.address), ("web", web[0]), ("web", web[1])]
    rows = {line.split()[1]: line.split() for line in lines}
    for address in (a.address, b.address):
        _, _, state, inflight, ewma, success, rps, until, failures, identity = rows[address]
        assert (state, inflight, until, failures, identity) == ("healthy", "0", "-", "0", "-"), rows[address]
        assert ewma.endswith("ms") and float(ewma[:-2]) > 0
        assert success == "100.0%"
        assert float(rps) > 0
    assert rows[x.address][3] == "3"
    assert rows[x.address][5] == "-"  # nothing answered yet: no success rate

    result = invoke("--admin", m.admin, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["services"]) == {"web", "hold"}
    [ep] = data["services"]["hold"]["endpoints"]
    for key in ("ejected_until", "success_rate_10s", "requests_10s", "rps_10s"):
        assert key in ep
    web_eps = {e["address"]: e for e in data["services"]["web"]["endpoints"]}
    assert web_eps[a.address]["success_rate_10s"] == 1.0
    assert web_eps[a.address]["requests_10s"] > 0
    assert web_eps[a.address]["ejected_until"] is None

    result = invoke("--admin", m.admin, "--json", "--service", "web")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["services"]) == {"web"}
    assert set(table(m, "--service", "hold")) == {x.address}

    result = invoke("--admin", m.admin, "--service", "nope")
    assert result.exit_code == 1
    assert result.stderr == "Error: no watched service 'nope' (watched: hold, web)\n"


def test_ejected_endpoint_and_recent_success_rate(mesh, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    m = mesh.run({"web": [a.address, b.address, c.address]}, workers=1)
    http_get(c.host, c.port, "/_fail?code=503")

    def ejected() -> tuple[list[str], datetime] | None:
        send(m.ports["outbound"], 0.3)
        shown = datetime.now(UTC)
        row = table(m)[c.address]
        return (row, shown) if row[2] == "ejected" else None

    row, shown = wait_for(ejected, timeout=15, what="c ejected")
    until = datetime.fromisoformat(row[7])
    assert until.tzinfo is not None and until.utcoffset() == timedelta(0), row
    assert until > shown, row  # the end of the backoff, in the future when it was shown
    assert (until - datetime.now(UTC)).total_seconds() < 61, row
    assert row[5] == "0.0%", row  # every request c answered in the last 10 s was a 503
    assert int(row[8]) >= 7, row
    assert table(m)[a.address][5] == "100.0%"

    http_get(c.host, c.port, "/_fail?code=0")

    def recovered() -> bool:
        send(m.ports["outbound"], 0.5)
        row = table(m)[c.address]
        return row[2] == "healthy" and row[5] != "-" and float(row[5][:-1]) >= 90
    wait_for(recovered, timeout=25, what="c healthy with a success rate of 90 % or more")


def test_recent_window_and_ejected_until(tmp_path: Path) -> None:
    """The JSON behind the table, from HealthKeeper alone with a simulated clock: the
    success rate and requests/s over the samples of about the last 10 s, and the end of
    an ejection as wall-clock time."""
    region = Region.create(str(tmp_path / "r.shm"), 2, 4, endpoint_rows=4)
    try:
        region.claim_slot(0, 1, KIND_WORKER)
        region.set_pid(0, 1)
        ep, other = Endpoint("127.0.0.1", 8080), Endpoint("127.0.0.1", 8081)
        rows = EndpointRows(region, None)
        rows.ensure([ep, other])
        row = rows.rows[str(ep)]
        keeper = HealthKeeper(region, rows)
        stripe = region.ep_stripe(0)
        services = {"web": ((ep, other), 3)}

        def run(seconds: float, per_tick: int, failure: bool, t: float) -> float:
            for _ in range(round(seconds * 10)):
                for _ in range(per_tick):
                    stripe.started(row)
                    stripe.finished(row, 0.001, t, failure)
                keeper.tick(services, t)
                t = round(t + 0.1, 3)
            return t

        assert keeper.describe(ep, 100.0)["success_rate_10s"] is None
        t = run(20.0, 1, False, 100.0)
        d = keeper.describe(ep, t)
        assert d["success_rate_10s"] == 1.0
        assert 90 <= d["requests_10s"] <= 101, d  # about the last 10 s, not all 200
        assert 9.5 <= d["rps_10s"] <= 10.5, d
        assert d["ejected_until"] is None

        t = run(0.3, 1, True, t)  # three failures in a row: ejected
        d = keeper.describe(ep, t, wall=1_800_000_000.0)
        assert d["state"] == "ejected", d
        assert d["success_rate_10s"] < 1.0
        wall_until = 1_800_000_000.0 + d["ejected_for_s"]
        assert abs(datetime.fromisoformat(d["ejected_until"]).timestamp() - wall_until) < 0.002
        assert d["ejected_until"].endswith("Z")

        t = run(11.0, 0, False, t)  # nothing for a while: no recent requests
        d = keeper.describe(ep, t)
        assert (d["requests_10s"], d["success_rate_10s"], d["rps_10s"]) == (0, None, 0.0), d
        assert d["successes"] == 200 and d["failures"] == 3  # the totals stay
    finally:
        region.close()


def test_unreachable_admin() -> None:
    port = free_port()
    result = invoke("--admin", f"127.0.0.1:{port}")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(
        f"Error: cannot reach the admin API at http://127.0.0.1:{port}/endpoints: ")
    assert "Connection refused" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


def test_admin_address_from_config(tmp_path) -> None:
    port = free_port()
    path = tmp_path / "meshd.toml"
    path.write_text(f'[admin]\nlisten = "0.0.0.0:{port}"\n'
                    '[[listener]]\nname = "out"\nlisten = "127.0.0.1:4140"\n')
    result = invoke("-c", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(  # a wildcard listen address is asked on loopback
        f"Error: cannot reach the admin API at http://127.0.0.1:{port}/endpoints: ")

    result = invoke("-c", str(path), "--admin", f"127.0.0.1:{port}")
    assert result.exit_code == 2
    assert "give --admin or --config, not both" in result.stderr

    result = invoke("-c", str(tmp_path / "absent.toml"))
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory\n"
