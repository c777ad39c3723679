"""meshd.config: parsing, defaults and every validation rule, with the exact key paths."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from meshd.config import (
    Address,
    AdminConfig,
    Config,
    LimitsConfig,
    ServiceConfig,
    load,
    parse,
    parse_address,
    parse_duration,
)
from meshd.cpus import usable_cpus
from meshd.errors import ConfigError
from meshd.private_files import default_shm_dir

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.toml"
OUTBOUND = {"name": "out", "listen": "127.0.0.1:4140"}


def minimal(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"listener": [dict(OUTBOUND)]}
    data.update(extra)
    return data


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


def keys(data: dict[str, Any]) -> list[str]:
    return [key for key, _ in problems(data)]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return str(path)


# -- durations and addresses ----------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25), ("10s", 10.0), ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0),
    ("0s", 0.0), ("0.5ms", 0.0005),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "10", 10, 1.5, True, None, "", "s", "10 s", "-1s", "+1s", "1d", "10S", ".5s", "1.s",
    "1m30s", "inf", "10sec", " 10s",
])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


@pytest.mark.parametrize(("text", "host", "port", "shown", "family"), [
    ("127.0.0.1:4140", "127.0.0.1", 4140, "127.0.0.1:4140", socket.AF_INET),
    ("0.0.0.0:4143", "0.0.0.0", 4143, "0.0.0.0:4143", socket.AF_INET),
    ("[::1]:4140", "::1", 4140, "[::1]:4140", socket.AF_INET6),
    ("[0:0::1]:80", "::1", 80, "[::1]:80", socket.AF_INET6),
    ("localhost:80", "localhost", 80, "localhost:80", socket.AF_INET),
    ("127.0.0.1:0", "127.0.0.1", 0, "127.0.0.1:0", socket.AF_INET),
    ("h:65535", "h", 65535, "h:65535", socket.AF_INET),
])
def test_addresses(text: str, host: str, port: int, shown: str, family: int) -> None:
    addr = parse_address(text)
    assert addr == Address(host, port)
    assert str(addr) == shown
    assert addr.family == family


@pytest.mark.parametrize("value", [
    "127.0.0.1", "127.0.0.1:", ":80", "::1:4140", "[::1]", "[nope]:80", "[::1:80",
    "h:65536", "h:-1", "h:+80", "h:8 0", "a b:80", "h:80x", 4140, None, ["h:1"], "",
])
def test_bad_addresses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_address(value)


def test_port_range_message() -> None:
    with pytest.raises(ValueError, match=r"port must be 0\.\.65535, got 70000"):
        parse_address("h:70000")


def test_default_shm_dir() -> None:
    """$RUNTIME_DIRECTORY (systemd), else /run/meshd as root, else $XDG_RUNTIME_DIR/meshd,
    else none ("": `meshd run` asks for shm_dir); never the world-writable /dev/shm."""
    assert default_shm_dir({"RUNTIME_DIRECTORY": "/run/meshd"}, 61000) == "/run/meshd"
    assert default_shm_dir({"RUNTIME_DIRECTORY": "/run/a:/run/b"}, 0) == "/run/a"
    assert default_shm_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, 0) == "/run/meshd"
    assert default_shm_dir({"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000) == "/run/user/1000/meshd"
    assert default_shm_dir({"RUNTIME_DIRECTORY": "", "XDG_RUNTIME_DIR": ""}, 1000) == ""
    assert default_shm_dir({}, 1000) == ""


# -- defaults and the example ---------------------------------------------------------------

def test_defaults() -> None:
    cfg = parse(minimal())
    assert cfg.path == ""
    assert cfg.workers == min(os.cpu_count() or 1, 128)
    assert (cfg.drain_timeout, cfg.worker_timeout) == (30.0, 30.0)
    assert (cfg.state_dir, cfg.shm_dir) == ("/var/lib/meshd",
                                            default_shm_dir(os.environ, os.geteuid()))
    assert (cfg.instance, cfg.metric_rows) == ("meshd", 1024)
    assert cfg.admin == AdminConfig(Address("127.0.0.1", 4191))
    assert cfg.discovery == ()
    assert dict(cfg.services) == {}
    assert cfg.limits == LimitsConfig()
    assert cfg.limits.header_bytes == 65536 and cfg.limits.detect_timeout == 1.0
    (listener,) = cfg.listeners
    assert listener.name == "out" and listener.listen == Address("127.0.0.1", 4140)
    assert (listener.direction, listener.protocol) == ("outbound", "auto")
    assert (listener.service, listener.forward) == (None, None)
    assert (listener.backlog, listener.max_connections) == (1024, 10000)


def test_service_defaults() -> None:
    cfg = parse(minimal(service={"web": {}}))
    assert cfg.services["web"] == ServiceConfig("web", 10.0, 2.0, 60.0, None)


def test_example_loads() -> None:
    cfg = load(str(EXAMPLE))
    assert cfg.path == str(EXAMPLE)
    assert cfg.workers == 2
    assert [lst.name for lst in cfg.listeners] == ["outbound", "inbound"]
    assert cfg.listeners[1].forward == Address("127.0.0.1", 8080)
    assert cfg.services["web"].discovery == "local"
    (source,) = cfg.discovery
    assert (source.name, source.plugin) == ("local", "static")
    assert dict(source.options) == {"services": {"web": ["127.0.0.1:8081", "127.0.0.1:8082"]}}


def test_load_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
workers = 3
drain_timeout = "0s"
worker_timeout = "1s"
state_dir = "/tmp/state"
shm_dir = "/tmp/shm"
instance = "edge-1"
metric_rows = 16
[admin]
listen = "[::1]:9990"
[[listener]]
name = "db"
listen = "127.0.0.1:0"
protocol = "tcp"
service = "db@dc2"
backlog = 1
max_connections = 1
[service."web@dc2"]
timeout = "250ms"
[limits]
header_bytes = 1024
request_line_bytes = 256
header_count = 1
header_read_timeout = "1ms"
client_idle_timeout = "5m"
detect_timeout = "500ms"
""")
    cfg = load(path)
    assert (cfg.workers, cfg.drain_timeout, cfg.worker_timeout) == (3, 0.0, 1.0)
    assert (cfg.state_dir, cfg.shm_dir, cfg.instance, cfg.metric_rows) == (
        "/tmp/state", "/tmp/shm", "edge-1", 16)
    assert str(cfg.admin.listen) == "[::1]:9990"
    assert cfg.listeners[0].service == "db@dc2" and cfg.listeners[0].protocol == "tcp"
    assert cfg.services["web@dc2"].timeout == 0.25
    assert cfg.limits == LimitsConfig(1024, 256, 1, 0.001, 300.0, 0.5)


# -- top-level keys -------------------------------------------------------------------------

def test_workers_auto() -> None:
    assert parse(minimal(workers="auto")).workers == min(usable_cpus(), 128)  # see test_cpus
    assert parse(minimal(workers=128)).workers == 128


@pytest.mark.parametrize(("value", "message"), [
    ("x", "expected an integer or \"auto\", got 'x'"),
    (True, 'expected an integer or "auto", got True'),
    (1.0, 'expected an integer or "auto", got 1.0'),
    (0, "must be between 1 and 128, got 0"),
    (129, "must be between 1 and 128, got 129"),
])
def test_bad_workers(value: object, message: str) -> None:
    assert problems(minimal(workers=value)) == [("workers", message)]


@pytest.mark.parametrize(("key", "value"), [
    ("drain_timeout", 30), ("drain_timeout", "30"), ("drain_timeout", "-1s"),
    ("worker_timeout", "999ms"), ("worker_timeout", "0s"),
    ("state_dir", 1), ("state_dir", ""), ("shm_dir", []),
    ("instance", "a/b"), ("instance", ""), ("metric_rows", 15), ("metric_rows", 1_000_001),
    ("metric_rows", True), ("metric_rows", "1024"),
])
def test_bad_top_level(key: str, value: object) -> None:
    assert keys(minimal(**{key: value})) == [key]


def test_messages_say_what_was_expected() -> None:
    found = dict(problems(minimal(worker_timeout="500ms", metric_rows=True, state_dir={})))
    assert found == {
        "worker_timeout": "must be at least 1s, got '500ms'",
        "metric_rows": "expected an integer, got True",
        "state_dir": "expected a string, got a table",
    }


def test_unknown_keys_everywhere() -> None:
    data = minimal(bogus=1, admin={"listen": "127.0.0.1:4191", "port": 1},
                   service={"web": {"timeout": "1s", "retry_count": 3}},
                   limits={"header_bytes": 2048, "body_bytes": 1})
    data["listener"][0]["ssl"] = True
    assert sorted(keys(data)) == sorted([
        "bogus", "admin.port", "listener[0].ssl", "service.web.retry_count", "limits.body_bytes",
    ])
    assert all(message == "unknown key" for _, message in problems(data))


def test_sections_must_be_tables() -> None:
    assert problems(minimal(admin="x", limits=[1], service={"web": 5})) == [
        ("admin", "expected a table, got 'x'"),
        ("service.web", "expected a table, got 5"),
        ("limits", "expected a table, got an array"),
    ]
    assert keys(minimal(service="web")) == ["service"]


# -- listeners ------------------------------------------------------------------------------

def test_listener_required() -> None:
    assert problems({}) == [("listener", "at least one [[listener]] is required")]
    assert keys({"listener": []}) == ["listener"]
    assert problems({"listener": dict(OUTBOUND)}) == [
        ("listener", "expected an array of tables ([[listener]]), got a table")]
    assert problems({"listener": [1]}) == [("listener[0]", "expected a table, got 1")]


def test_listener_name_and_listen_required() -> None:
    assert problems({"listener": [{}]}) == [
        ("listener[0].name", "required"), ("listener[0].listen", "required")]


def test_listener_bad_values() -> None:
    bad = {"name": "a b", "listen": "nowhere", "direction": "sideways", "protocol": "udp",
           "service": "", "backlog": 0, "max_connections": 0}
    assert keys({"listener": [bad]}) == [f"listener[0].{key}" for key in bad]
    assert keys({"listener": [dict(OUTBOUND, backlog=65536)]}) == ["listener[0].backlog"]
    assert keys({"listener": [dict(OUTBOUND, max_connections=True)]}) == [
        "listener[0].max_connections"]


def test_listener_names_unique() -> None:
    second = {"name": "out", "listen": "127.0.0.1:4141"}
    assert problems({"listener": [dict(OUTBOUND), second]}) == [
        ("listener[1].name", "duplicate name 'out' (also listener[0])")]


def test_listen_addresses_unique() -> None:
    second = {"name": "two", "listen": "127.0.0.1:4140"}
    assert keys({"listener": [dict(OUTBOUND), second]}) == ["listener[1].listen"]
    wildcard = {"name": "two", "listen": "0.0.0.0:4140"}
    assert keys({"listener": [dict(OUTBOUND), wildcard]}) == ["listener[1].listen"]


def test_port_zero_and_other_families_may_repeat() -> None:
    listeners = [{"name": "a", "listen": "127.0.0.1:0"}, {"name": "b", "listen": "127.0.0.1:0"},
                 {"name": "c", "listen": "[::]:4140"}, {"name": "d", "listen": "0.0.0.0:4140"}]
    assert len(parse({"listener": listeners}).listeners) == 4


def test_listener_may_not_take_admin_address() -> None:
    data = {"listener": [{"name": "a", "listen": "127.0.0.1:4191"}]}
    assert problems(data) == [
        ("listener[0].listen", "127.0.0.1:4191 clashes with the admin address 127.0.0.1:4191")]
    moved = {"admin": {"listen": "127.0.0.1:5000"},
             "listener": [{"name": "a", "listen": "127.0.0.1:5000"}]}
    assert keys(moved) == ["listener[0].listen"]


def test_inbound_needs_forward() -> None:
    data = {"listener": [dict(OUTBOUND), {"name": "in", "listen": "0.0.0.0:4143",
                                          "direction": "inbound"}]}
    assert keys(data) == ["listener[1].forward"]
    data["listener"][1]["forward"] = "127.0.0.1:8080"
    assert parse(data).listeners[1].forward == Address("127.0.0.1", 8080)


def test_outbound_may_not_forward() -> None:
    assert keys({"listener": [dict(OUTBOUND, forward="127.0.0.1:8080")]}) == [
        "listener[0].forward"]


def test_outbound_tcp_needs_service() -> None:
    assert keys({"listener": [dict(OUTBOUND, protocol="tcp")]}) == ["listener[0].service"]
    inbound_tcp = dict(OUTBOUND, protocol="tcp", direction="inbound", forward="127.0.0.1:1")
    assert parse({"listener": [inbound_tcp]}).listeners[0].service is None


def test_bad_direction_is_reported_once() -> None:
    assert keys({"listener": [dict(OUTBOUND, direction="in", forward="127.0.0.1:1")]}) == [
        "listener[0].direction"]


def test_opaque_ports_default_and_values() -> None:
    from meshd.proto.detect import DEFAULT_OPAQUE_PORTS

    (listener,) = parse(minimal()).listeners
    assert listener.opaque_ports == DEFAULT_OPAQUE_PORTS
    assert listener.opaque_ports == {25, 587, 3306, 4444, 5432, 6379, 9300, 11211}
    (listener,) = parse({"listener": [dict(OUTBOUND, opaque_ports=[1, 65535, 6379])]}).listeners
    assert listener.opaque_ports == frozenset({1, 65535, 6379})
    (listener,) = parse({"listener": [dict(OUTBOUND, opaque_ports=[])]}).listeners
    assert listener.opaque_ports == frozenset()  # detect on every port


@pytest.mark.parametrize(("value", "message"), [
    (25, "expected a list of ports (integers 1..65535), got 25"),
    ("25", "expected a list of ports (integers 1..65535), got '25'"),
    ({"a": 1}, "expected a list of ports (integers 1..65535), got a table"),
    ([25, 0], "expected a list of ports (integers 1..65535), got 0 at [1]"),
    ([65536], "expected a list of ports (integers 1..65535), got 65536 at [0]"),
    ([-1], "expected a list of ports (integers 1..65535), got -1 at [0]"),
    (["25"], "expected a list of ports (integers 1..65535), got '25' at [0]"),
    ([True], "expected a list of ports (integers 1..65535), got True at [0]"),
    ([25.0], "expected a list of ports (integers 1..65535), got 25.0 at [0]"),
    ([25, 587, 25], "port 25 is listed twice"),
])
def test_bad_opaque_ports(value: object, message: str) -> None:
    assert problems({"listener": [dict(OUTBOUND), dict(OUTBOUND, name="b",
                                                       listen="127.0.0.1:4141",
                                                       opaque_ports=value)]}) == [
        ("listener[1].opaque_ports", message)]


def test_opaque_ports_only_on_auto_listeners() -> None:
    assert problems({"listener": [dict(OUTBOUND, protocol="http", opaque_ports=[25])]}) == [
        ("listener[0].opaque_ports",
         'only a protocol = "auto" listener detects protocols; this one is "http" and never '
         "looks at ports")]
    tcp = dict(OUTBOUND, protocol="tcp", service="db", opaque_ports=[])
    assert keys({"listener": [tcp]}) == ["listener[0].opaque_ports"]
    # a bad protocol is reported alone, a bad port list once
    assert keys({"listener": [dict(OUTBOUND, protocol="udp", opaque_ports=[25])]}) == [
        "listener[0].protocol"]
    assert keys({"listener": [dict(OUTBOUND, protocol="http", opaque_ports=[0])]}) == [
        "listener[0].opaque_ports"]


INBOUND = {"name": "in", "listen": "0.0.0.0:4143", "direction": "inbound",
           "forward": "127.0.0.1:8080"}


def test_tunnel_ports_default_and_values() -> None:
    _, inbound = parse({"listener": [dict(OUTBOUND), dict(INBOUND)]}).listeners
    assert inbound.tunnel_ports == frozenset()  # no tunnel is honoured
    _, inbound = parse({"listener": [dict(OUTBOUND),
                                     dict(INBOUND, tunnel_ports=[5432, 6379])]}).listeners
    assert inbound.tunnel_ports == frozenset({5432, 6379})
    assert problems({"listener": [dict(INBOUND, tunnel_ports=[5432, 0])]}) == [
        ("listener[0].tunnel_ports", "expected a list of ports (integers 1..65535), got 0 at [1]")]


def test_tunnel_ports_only_on_inbound_auto_listeners() -> None:
    assert problems({"listener": [dict(OUTBOUND, tunnel_ports=[5432])]}) == [
        ("listener[0].tunnel_ports", "only an inbound listener accepts meshd tunnels (to ports "
                                     "of its forward host); an outbound one never does")]
    assert problems({"listener": [dict(INBOUND, protocol="tcp", tunnel_ports=[5432])]}) == [
        ("listener[0].tunnel_ports", 'only a protocol = "auto" listener reads a meshd tunnel '
                                     'header; this one is "tcp"')]
    assert keys({"listener": [dict(OUTBOUND, tunnel_ports=[])]}) == ["listener[0].tunnel_ports"]


@pytest.mark.parametrize(("forward", "listen", "refused"), [
    ("127.0.0.1:8080", "127.0.0.1:4140", True),
    ("127.0.0.1:8080", "0.0.0.0:4140", True),       # a wildcard bind takes every address
    ("10.0.0.5:8080", "0.0.0.0:4140", True),
    ("localhost:8080", "127.0.0.1:4140", True),     # a name may resolve to this host
    ("0.0.0.0:8080", "127.0.0.1:4140", True),       # connecting to 0.0.0.0 reaches this host
    ("[::ffff:127.0.0.1]:8080", "127.0.0.1:4140", True),
    ("10.0.0.5:8080", "127.0.0.1:4140", False),     # another address: not meshd's socket
    ("127.0.0.2:8080", "127.0.0.1:4140", False),
    ("[::1]:8080", "0.0.0.0:4140", False),          # IPv4 wildcard, IPv6 target
])
def test_tunnel_ports_may_not_name_meshd_own_ports(forward: str, listen: str,
                                                   refused: bool) -> None:
    data = {"admin": {"listen": "127.0.0.1:4191"},
            "listener": [dict(OUTBOUND, listen=listen),
                         dict(INBOUND, listen="127.0.0.1:4143", forward=forward,
                              tunnel_ports=[5432, 4140])]}
    if not refused:
        assert parse(data).listeners[1].tunnel_ports == {5432, 4140}
        return
    assert problems(data) == [("listener[1].tunnel_ports",
                               f"port 4140 is meshd's own listener 'out' {listen}: a tunnel to "
                               f"{Address(parse_address(forward).host, 4140)} would reach "
                               f"meshd itself")]


def test_tunnel_ports_may_not_name_the_admin_or_the_listener_itself() -> None:
    data = {"listener": [dict(INBOUND, tunnel_ports=[4191, 4143])]}
    assert problems(data) == [
        ("listener[0].tunnel_ports", "port 4143 is meshd's own listener 'in' 0.0.0.0:4143: a "
                                     "tunnel to 127.0.0.1:4143 would reach meshd itself"),
        ("listener[0].tunnel_ports", "port 4191 is meshd's own admin address 127.0.0.1:4191: a "
                                     "tunnel to 127.0.0.1:4191 would reach meshd itself")]


# -- services and discovery -----------------------------------------------------------------

def test_service_bad_values() -> None:
    service = {"timeout": "10", "connect_timeout": 2, "idle_timeout": "0s", "discovery": 1}
    assert keys(minimal(service={"web": service})) == [
        f"service.web.{key}" for key in service]


def test_service_names() -> None:
    assert parse(minimal(service={"web.ns": {}, "web@dc2": {}, "a_b-1": {}})).services
    assert keys(minimal(service={"web/x": {}})) == ["service.web/x"]


def test_service_discovery_must_exist() -> None:
    data = minimal(discovery=[{"name": "local", "plugin": "static"}],
                   service={"web": {"discovery": "consul"}, "api": {"discovery": "local"}})
    assert problems(data) == [
        ("service.web.discovery", "no [[discovery]] source is named 'consul'")]


def test_discovery_options_kept() -> None:
    source = {"name": "consul", "plugin": "consul", "address": "http://127.0.0.1:8500",
              "datacenter": "dc1"}
    (cfg,) = parse(minimal(discovery=[source])).discovery
    assert (cfg.name, cfg.plugin) == ("consul", "consul")
    assert dict(cfg.options) == {"address": "http://127.0.0.1:8500", "datacenter": "dc1"}
    with pytest.raises(TypeError):
        cfg.options["address"] = "x"  # type: ignore[index]


def test_discovery_name_and_plugin_required() -> None:
    assert problems(minimal(discovery=[{"address": "x"}])) == [
        ("discovery[0].name", "required"), ("discovery[0].plugin", "required")]
    assert keys(minimal(discovery=[{"name": "a", "plugin": 1}])) == ["discovery[0].plugin"]
    assert keys(minimal(discovery={"name": "a", "plugin": "static"})) == ["discovery"]


def test_discovery_names_unique() -> None:
    sources = [{"name": "a", "plugin": "static"}, {"name": "a", "plugin": "consul"}]
    assert problems(minimal(discovery=sources)) == [
        ("discovery[1].name", "duplicate name 'a' (also discovery[0])")]


# -- limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [
    ("header_bytes", 1023), ("request_line_bytes", 255), ("header_count", 0),
    ("header_count", True), ("header_read_timeout", 10), ("client_idle_timeout", "0s"),
    ("detect_timeout", "1"), ("tcp_idle_timeout", "0s"), ("tcp_idle_timeout", 3600),
    ("write_timeout", "0s"), ("write_timeout", "1"),
])
def test_bad_limits(key: str, value: object) -> None:
    assert keys(minimal(limits={key: value})) == [f"limits.{key}"]


def test_connection_timeouts() -> None:
    limits = parse(minimal()).limits
    assert (limits.tcp_idle_timeout, limits.write_timeout) == (3600.0, 60.0)
    limits = parse(minimal(limits={"tcp_idle_timeout": "1s", "write_timeout": "250ms"})).limits
    assert (limits.tcp_idle_timeout, limits.write_timeout) == (1.0, 0.25)


# -- all at once, files, errors -------------------------------------------------------------

def test_many_problems_at_once() -> None:
    data = {
        "workers": "x", "drain_timeout": "30", "bogus": 1,
        "admin": {"listen": "nowhere"},
        "listener": [{"name": "a", "listen": "127.0.0.1:4140"},
                     {"name": "a", "listen": "127.0.0.1:4140", "direction": "inbound"}],
        "service": {"web": {"timeout": 5}},
        "limits": {"header_bytes": 10},
    }
    assert sorted(keys(data)) == sorted([
        "workers", "drain_timeout", "bogus", "admin.listen", "listener[1].forward",
        "listener[1].name", "listener[1].listen", "service.web.timeout", "limits.header_bytes",
    ])


def test_parse_does_not_change_its_input() -> None:
    data = minimal(discovery=[{"name": "a", "plugin": "static", "x": 1}])
    before = repr(data)
    parse(data)
    assert repr(data) == before


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 2\n[[listener]\nname = "x"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    ((key, message),) = info.value.problems
    assert key == "" and "line 2" in message and "column" in message
    assert info.value.path == path


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'instance = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert [key for key, _ in info.value.problems] == [""]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.problems == [("", "cannot read: No such file or directory")]
    assert info.value.lines() == [f"{path}: cannot read: No such file or directory"]


def test_lines_format(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = "x"\n[[listener]]\nname = "a"\nlisten = "h:1"\nbad = 1\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.lines() == [
        f"{path}: workers: expected an integer or \"auto\", got 'x'",
        f"{path}: listener[0].bad: unknown key",
    ]


def test_frozen() -> None:
    cfg = parse(minimal(service={"web": {}}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listeners[0].backlog = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.admin.listen.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.services["api"] = ServiceConfig("api")  # type: ignore[index]
    assert isinstance(cfg, Config) and isinstance(cfg.listeners, tuple)



def test_on_demand_discovery_bounds() -> None:
    cfg = parse(minimal())
    assert cfg.discovery_negative_ttl == 5.0
    cfg = parse(minimal(discovery_negative_ttl="2s", discovery=[
        {"name": "a", "plugin": "static"},
        {"name": "b", "plugin": "consul", "max_watches": 20, "address": "http://x:8500"}]))
    assert cfg.discovery_negative_ttl == 2.0
    assert [d.max_watches for d in cfg.discovery] == [100, 20]
    assert "max_watches" not in cfg.discovery[1].options     # meshd's key, not the plugin's
    assert keys(minimal(discovery_negative_ttl="10ms")) == ["discovery_negative_ttl"]
    assert keys(minimal(discovery=[{"name": "a", "plugin": "static", "max_watches": 0}])) == [
        "discovery[0].max_watches"]


def test_tunnel_ports_may_not_name_the_probe_port() -> None:
    data = {"admin": {"listen": "127.0.0.1:4191", "probe_listen": "0.0.0.0:4192"},
            "listener": [dict(OUTBOUND),
                         dict(INBOUND, listen="127.0.0.1:4143", tunnel_ports=[4192])]}
    assert keys(data) == ["listener[1].tunnel_ports"]
