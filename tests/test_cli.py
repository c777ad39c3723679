"""The `meshd` command through click's CliRunner: version, check, plugins and stat (the last
against a small HTTP server on loopback that answers like the admin API)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import meshd
from meshd.cli import cli
from meshd.config import parse
from meshd.metrics import StatWindow, row_keys
from meshd.shm import F_REQUESTS, Region
from meshd.testing.harness import free_port
from meshd.testing.plugins import make_distribution

ROOT = Path(__file__).resolve().parent.parent


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="meshd")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "meshd.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_version() -> None:
    result = invoke("version")
    assert result.exit_code == 0
    assert result.stdout == f"meshd {meshd.__version__}\n"


# -- check ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["example.toml", "demo.toml"])
def test_check_shipped_configs(name: str) -> None:
    path = str(ROOT / "config" / name)
    result = invoke("check", "-c", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{path}: ok (2 listeners, 1 discovery sources, ")
    assert result.stderr == ""


def test_check_reports_every_config_problem(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        bogus = 1
        drain_timeout = "10"
        [[discovery]]
        name = "local"
        plugin = "static"
        [discovery.services]
        web = ["127.0.0.1:8081"]
        [[listener]]
        name = "out"
        [[listener]]
        name = "in"
        listen = "127.0.0.1:4143"
        direction = "inbound"
        """)
    result = invoke("check", "-c", path)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f'{path}: drain_timeout: expected a duration with a unit (ms, s, m, h) like "10s", '
        "got '10'",
        f"{path}: listener[0].listen: required",
        f"{path}: listener[1].forward: required for an inbound listener (the local application)",
        f"{path}: bogus: unknown key",
    ]


def test_check_reports_plugin_problems(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        [[discovery]]
        name = "local"
        plugin = "static"
        [discovery.services]
        web = ["nohost", "127.0.0.1:1", { address = "127.0.0.1:2", port = 3 }]
        [[discovery]]
        name = "other"
        plugin = "nope"
        [[listener]]
        name = "out"
        listen = "127.0.0.1:4140"
        """)
    result = invoke("check", "-c", path)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[:2] == [
        f"""{path}: discovery[0].services.web[0]: expected "host:port" (IPv6 as "[::1]:port"), """
        "got 'nohost'",
        f"{path}: discovery[0].services.web[2]: unknown key 'port'",
    ]
    assert re.fullmatch(re.escape(f"{path}: discovery[1].plugin: no discovery plugin named "
                                  "'nope' is installed (installed: ") + r".*\bstatic\b.*\)",
                        lines[2]), lines[2]
    assert len(lines) == 3


def test_check_reports_config_and_plugin_problems_together(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        bogus = 1
        [[discovery]]
        name = "local"
        plugin = "static"
        [discovery.services]
        web = ["nohost"]
        [[listener]]
        name = "out"
        listen = "127.0.0.1:4140"
        """)
    result = invoke("check", "-c", path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{path}: bogus: unknown key",
        f"""{path}: discovery[0].services.web[0]: expected "host:port" (IPv6 as "[::1]:port"), """
        "got 'nohost'",
    ]


def test_check_keeps_max_watches_from_the_plugin_when_the_config_has_problems(
        tmp_path: Path) -> None:
    path = write(tmp_path, """\
        bogus = 1
        [[discovery]]
        name = "local"
        plugin = "static"
        max_watches = 5
        [[listener]]
        name = "out"
        listen = "127.0.0.1:4140"
        """)
    result = invoke("check", "-c", path)
    assert result.exit_code == 2
    assert result.stderr == f"{path}: bogus: unknown key\n"  # max_watches is meshd's key


def test_check_plugin_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        [[discovery]]
        name = "local"
        plugin = "static"
        refresh = "5s"
        [[listener]]
        name = "out"
        listen = "127.0.0.1:4140"
        """)
    result = invoke("check", "-c", path)
    assert result.exit_code == 2
    assert result.stderr == f"{path}: discovery[0].refresh: unknown key\n"


def test_check_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = \n")
    result = invoke("check", "-c", path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}: invalid TOML: ")
    assert len(result.stderr.splitlines()) == 1


def test_check_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    result = invoke("check", "-c", path)
    assert result.exit_code == 2
    assert result.stderr == f"{path}: cannot read: No such file or directory\n"


def test_check_needs_a_file() -> None:
    result = invoke("check")
    assert result.exit_code == 2
    assert "Missing option '-c' / '--config'" in result.stderr


# -- plugins -------------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "status"), [("--load", ["ok"]), ("--no-load", ["not", "loaded"])])
def test_plugins_lists_static(flag: str, status: list[str]) -> None:
    result = invoke("plugins", flag)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "STATUS"]
    [static] = [line.split() for line in lines if line.startswith("discovery  static ")]
    assert static == ["discovery", "static", "meshd-static", dist_version("meshd-static"), *status]
    # identity providers too: meshd's own and the consul plugin's (one name, two kinds)
    kinds = {(row[0], row[1]): row[2] for row in (line.split() for line in lines[1:])}
    assert kinds[("identity", "files")] == kinds[("identity", "meshd-ca")] == "meshd-proxy"
    assert kinds[("identity", "consul")] == kinds[("discovery", "consul")] == "meshd-consul"


def test_plugins_exits_1_when_one_fails_to_load(tmp_path: Path) -> None:
    root = tmp_path / "plugins"
    make_distribution(root, "broken-plugin", {"broken": "brokenplugin:Backend"}, "brokenplugin",
                      "raise RuntimeError('broken at import')\n")
    env = dict(os.environ, PYTHONPATH=str(root))

    def plugins(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshd", "plugins", *args], env=env,
                              capture_output=True, text=True, timeout=30)

    out = plugins()
    assert out.returncode == 1, out.stdout + out.stderr
    rows = {line.split()[1]: line for line in out.stdout.splitlines()[1:]}
    assert rows["broken"].split()[:5] == ["discovery", "broken", "broken-plugin", "0.0.1", "error:"]
    assert "RuntimeError: broken at import" in rows["broken"]
    assert rows["static"].split()[4:] == ["ok"]
    # Not imported: no plugin is called ok, and nothing failed.
    out = plugins("--no-load")
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = [line.split()[4:] for line in out.stdout.splitlines()[1:]]
    assert statuses and all(s == ["not", "loaded"] for s in statuses), out.stdout


# -- stat ----------------------------------------------------------------------------------

WEB_ROW = {
    "direction": "outbound", "listener": "outbound", "service": "web",
    "requests_total": 1234, "success_rate": 0.9875, "rps": 12.345,
    "latency_ms_p50": 1.5, "latency_ms_p95": 12.4, "latency_ms_p99": None,
    "window_s": 10.0,
}
API_ROW = {**WEB_ROW, "service": "api", "requests_total": 3, "success_rate": None, "rps": 0.0,
           "latency_ms_p50": None, "latency_ms_p95": None}
STATS = {"generation": 2, "rows": [API_ROW, WEB_ROW]}


def test_canned_rows_have_the_shape_of_real_figures(tmp_path: Path) -> None:
    """What AdminApp.stats serves: {"generation": G, "rows": StatWindow.figures(keys)}."""
    region = Region.create(str(tmp_path / "r.shm"), 2, 4)
    try:
        region.stripe(0).add(2, F_REQUESTS)
        window = StatWindow()
        window.take(region, [2], now=1.0)
        cfg = parse({"listener": [{"name": "outbound", "listen": "127.0.0.1:0"}]})
        [real] = window.figures(row_keys(cfg, {"outbound": {"web": 2}}))
    finally:
        region.close()
    assert set(real) == set(WEB_ROW)


@pytest.fixture
def admin_server() -> Iterator[Callable[[bytes], str]]:
    """Start a loopback HTTP server answering GET /stats with the given body; its address."""
    servers: list[ThreadingHTTPServer] = []

    def start(body: bytes) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status = 200 if self.path == "/stats" else 404
                payload = body if status == 200 else b"not found\n"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_stat_table(admin_server: Callable[[bytes], str]) -> None:
    result = invoke("stat", "--admin", admin_server(json.dumps(STATS).encode()))
    assert result.exit_code == 0, result.output
    header, api, web = result.stdout.splitlines()
    assert header.split() == ["DIRECTION", "LISTENER", "SERVICE", "SUCCESS", "RPS", "P50",
                              "P95", "P99", "REQUESTS"]
    assert web.split() == ["outbound", "outbound", "web", "98.75%", "12.3", "1.50ms", "12ms",
                           "-", "1234"]
    assert api.split() == ["outbound", "outbound", "api", "-", "0.0", "-", "-", "-", "3"]
    assert header.index("SUCCESS") == web.index("98.75%")  # columns line up


def test_stat_json(admin_server: Callable[[bytes], str]) -> None:
    result = invoke("stat", "--admin", admin_server(json.dumps(STATS).encode()), "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == STATS


def test_stat_when_nothing_listens() -> None:
    port = free_port()
    result = invoke("stat", "--admin", f"127.0.0.1:{port}")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    assert result.stderr.startswith(
        f"Error: cannot reach the admin API at http://127.0.0.1:{port}/stats: ")
    assert "Connection refused" in result.stderr
    assert "Traceback" not in result.output


def test_stat_when_the_answer_is_not_json(admin_server: Callable[[bytes], str]) -> None:
    address = admin_server(b"<html>some other server</html>")
    result = invoke("stat", "--admin", address)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"Error: cannot reach the admin API at http://{address}/stats")
