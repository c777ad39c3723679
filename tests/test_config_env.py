"""``${VAR}`` in config values (the sidecar's POD_IP, POD_NAMESPACE...), expanded when the
config is parsed so that check, run and reload agree; and the sidecar keys
``shutdown_delay`` and ``[admin] probe_listen``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshd.config import Address, parse
from meshd.config_env import expand_env
from meshd.errors import ConfigError
from meshd.testing.harness import Backend, Meshd, free_port, http_get, port_open, wait_for


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"listener": [{"name": "out", "listen": "127.0.0.1:4140"}]}
    data.update(extra)
    return data


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


def test_references_are_replaced_in_strings_at_any_depth() -> None:
    env = {"POD_IP": "10.1.2.3", "NS": "shop"}
    found: list[tuple[str, str]] = []
    out = expand_env({"a": "${POD_IP}:4143", "t": {"l": ["x-${NS}", 5, {"k": "${NS}"}]},
                      "n": 3, "lit": "$${POD_IP} costs $$5", "two": "${NS}.${NS}"}, found, env)
    assert found == []
    assert out == {"a": "10.1.2.3:4143", "t": {"l": ["x-shop", 5, {"k": "shop"}]}, "n": 3,
                   "lit": "${POD_IP} costs $$5", "two": "shop.shop"}


def test_a_value_is_not_expanded_twice() -> None:
    found: list[tuple[str, str]] = []
    assert expand_env({"a": "${A}"}, found, {"A": "${B}", "B": "no"}) == {"a": "${B}"}


@pytest.mark.parametrize(("value", "message"), [
    ("${NOPE}", "environment variable NOPE is not set"),
    ("${1X}", "malformed reference '${1X}'"),
    ("${}", "malformed reference '${}'"),
    ("a ${OPEN", "malformed reference '${OPEN'"),
])
def test_unset_or_malformed_references_name_the_key_path(value: str, message: str) -> None:
    os.environ.pop("NOPE", None)
    listener = {"name": "out", "listen": "127.0.0.1:4140"}
    data = {"listener": [listener, {"name": "in", "listen": value}]}
    found = problems(data)
    assert found[0][0] == "listener[1].listen"
    assert found[0][1].startswith(message)


def test_environment_in_addresses_and_plugin_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHD_TEST_IP", "127.0.0.7")
    monkeypatch.setenv("MESHD_TEST_NS", "shop")
    cfg = parse(minimal(admin={"probe_listen": "${MESHD_TEST_IP}:4192"},
                        discovery=[{"name": "k", "plugin": "kubernetes",
                                    "namespace": "${MESHD_TEST_NS}"}]))
    assert cfg.admin.probe_listen == Address("127.0.0.7", 4192)
    assert cfg.discovery[0].options["namespace"] == "shop"


def test_check_reports_an_unset_variable(tmp_path: Path) -> None:
    config = tmp_path / "meshd.toml"
    config.write_text('[[listener]]\nname = "out"\nlisten = "${MESHD_TEST_UNSET}:4140"\n')
    env = {k: v for k, v in os.environ.items() if k != "MESHD_TEST_UNSET"}
    proc = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert (f"{config}: listener[0].listen: environment variable MESHD_TEST_UNSET is not set"
            in proc.stderr)
    assert proc.stderr.count("listener[0].listen") == 1, proc.stderr  # not the raw value too
    env["MESHD_TEST_UNSET"] = "127.0.0.1"
    proc = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr


def test_shutdown_delay_and_probe_listen_keys() -> None:
    cfg = parse(minimal())
    assert cfg.shutdown_delay == 0.0 and cfg.admin.probe_listen is None
    cfg = parse(minimal(shutdown_delay="5s", admin={"probe_listen": "0.0.0.0:4192"}))
    assert cfg.shutdown_delay == 5.0 and cfg.admin.probe_listen == Address("0.0.0.0", 4192)
    assert [k for k, _ in problems(minimal(shutdown_delay=5))] == ["shutdown_delay"]
    assert [k for k, _ in problems(minimal(admin={"probe_listen": "0.0.0.0:4191"}))] == [
        "admin.probe_listen"]  # clashes with the admin address
    assert [k for k, _ in problems(minimal(admin={"probe_listen": "127.0.0.1:4140"}))] == [
        "listener[0].listen"]


def test_probe_listener_serves_live_and_ready_only(tmp_path: Path) -> None:
    admin, probe = free_port(), free_port()
    backend = Backend("a").start()
    config = tmp_path / "meshd.toml"
    config.write_text(f"""
workers = 1
state_dir = "{tmp_path}/state"
[admin]
listen = "127.0.0.1:{admin}"
probe_listen = "${{MESHD_TEST_PROBE}}"
[[discovery]]
name = "s"
plugin = "static"
[discovery.services]
a = ["{backend.address}"]
[[listener]]
name = "out"
listen = "127.0.0.1:{free_port()}"
""")
    env = dict(os.environ, MESHD_TEST_PROBE=f"127.0.0.1:{probe}")
    meshd = Meshd(config, tmp_path / "log", admin=f"127.0.0.1:{admin}", env=env)
    try:
        meshd.start()
        assert http_get("127.0.0.1", probe, "/live")[0] == 200
        assert http_get("127.0.0.1", probe, "/ready")[0] == 200
        for path in ("/endpoints", "/metrics", "/stats"):
            assert http_get("127.0.0.1", probe, path)[0] == 404, path
            assert http_get("127.0.0.1", admin, path)[0] == 200, path
        # a reload keeps it (the socket is the control process's, handed on)
        wait_for(lambda: "generation 1 serving" in meshd.log(), 20, what="generation 1")
        meshd.signal(signal.SIGHUP)
        wait_for(lambda: meshd.metric("meshd_config_reloads_total") >= 1, 20, what="reload")
        # The old generation's control process answers too until it is retired (then
        # it stops accepting and answers what it accepted: test_admin_reload_drain):
        # once generation 2 is alone it is the one answering.
        wait_for(lambda: {s.generation for s in meshd.slots()} == {2}, 60,
                 what="generation 2 alone in the process table")
        assert http_get("127.0.0.1", probe, "/ready")[0] == 200
    finally:
        meshd.stop()
        backend.stop()


def test_shutdown_delay_keeps_serving_new_requests_after_term(tmp_path: Path) -> None:
    """The application's own outbound calls while it shuts down (TERM reaches every
    container of a pod at once) still go through meshd until shutdown_delay ends; then
    meshd drains and exits 0."""
    admin, out = free_port(), free_port()
    backend = Backend("a").start()
    config = tmp_path / "meshd.toml"
    config.write_text(f"""
workers = 2
shutdown_delay = "3s"
drain_timeout = "5s"
state_dir = "{tmp_path}/state"
[admin]
listen = "127.0.0.1:{admin}"
[[discovery]]
name = "s"
plugin = "static"
[discovery.services]
a = ["{backend.address}"]
[[listener]]
name = "out"
listen = "127.0.0.1:{out}"
""")
    meshd = Meshd(config, tmp_path / "log", admin=f"127.0.0.1:{admin}")
    try:
        meshd.start()
        assert http_get("127.0.0.1", out, "/", {"Host": "a"})[0] == 200
        meshd.signal(signal.SIGTERM)
        wait_for(lambda: "serving on for shutdown_delay" in meshd.log(), 10, what="TERM seen")
        # new connections, during the delay: served
        for _ in range(3):
            status, headers, _body = http_get("127.0.0.1", out, "/", {"Host": "a"})
            assert status == 200 and headers["x-backend"] == "a"
        assert meshd.proc is not None and meshd.proc.poll() is None
        assert meshd.wait(30) == 0
        assert "graceful stop" in meshd.log()
        assert not port_open("127.0.0.1", out)
    finally:
        meshd.stop()
        backend.stop()


def test_a_second_term_during_shutdown_delay_stops_without_waiting(tmp_path: Path) -> None:
    admin = free_port()
    config = tmp_path / "meshd.toml"
    config.write_text(f"""
workers = 1
shutdown_delay = "10m"
state_dir = "{tmp_path}/state"
[admin]
listen = "127.0.0.1:{admin}"
[[listener]]
name = "out"
listen = "127.0.0.1:{free_port()}"
""")
    meshd = Meshd(config, tmp_path / "log", admin=f"127.0.0.1:{admin}")
    try:
        meshd.start()
        meshd.signal(signal.SIGTERM)
        wait_for(lambda: "serving on for shutdown_delay" in meshd.log(), 10, what="TERM seen")
        meshd.signal(signal.SIGTERM)
        assert meshd.wait(30) == 0  # not ten minutes
        assert "graceful stop" in meshd.log()
    finally:
        meshd.stop()
