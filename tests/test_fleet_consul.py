"""Fleet control from Consul config entries, end to end: a real meshd with the consul
config source (and discovery) against the Consul test server, real HTTP clients.

A canary split moved 0 -> 10 -> 50 -> 100 % under load; a router path match with its own
timeout; resolver failover to another datacenter and back; the source down (and a
restart) keeping the last good policy; a malformed entry refused and named; precedence
of a local [[route]]."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import msgpack

from meshd.control import state
from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import Meshd, http_get, wait_for
from meshd.testing.load import CountingLoad


def fleet_config(mesh: Any, consul: ConsulServer, workers: int = 2, extra: str = "") -> tuple[str, dict[str, int]]:
    return mesh.config({}, workers=workers, extra=textwrap.dedent(f"""\
        [[discovery]]
        name = "consul"
        plugin = "consul"
        address = "{consul.url}"
        wait = "30s"

        [[config_source]]
        name = "consul"
        plugin = "consul"
        address = "{consul.url}"
        wait = "30s"
        """) + extra)


def admin_json(m: Meshd, path: str) -> Any:
    assert m.admin is not None
    host, _, port = m.admin.rpartition(":")
    status, _, body = http_get(host, int(port), path)
    assert status == 200, (status, body)
    return json.loads(body)


def fleet_service(m: Meshd, service: str) -> dict[str, Any]:
    return admin_json(m, "/config")["fleet"]["services"].get(service, {})


def wait_applied(m: Meshd, service: str, kind: str, predicate: Any, timeout: float = 10.0) -> float:
    """Seconds until /config shows ``service``'s effective ``kind`` satisfying
    ``predicate`` and every worker loaded a snapshot at least that recent."""
    started = time.monotonic()

    def shown() -> bool:
        part = fleet_service(m, service).get("effective", {}).get(kind)
        return predicate(part)
    wait_for(shown, timeout, interval=0.005, what=f"{kind} of {service} applied")

    def published() -> bool:
        fleet = admin_json(m, "/config")["fleet"]
        return bool(fleet["version"] == fleet["published_version"])
    wait_for(published, timeout, interval=0.005, what="the policies published")
    m.wait_snapshot_loaded(timeout=timeout)
    return time.monotonic() - started


def splitter(v2: float) -> dict[str, Any]:
    return {"Kind": "service-splitter", "Name": "web",
            "Splits": [{"Weight": 100 - v2, "ServiceSubset": "v1"},
                       {"Weight": v2, "ServiceSubset": "v2"}]}


RESOLVER = {"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1",
            "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                        "v2": {"Filter": "Service.Meta.version == v2"}}}


def split_weights(part: Any) -> list[int] | None:
    return [t["weight"] for t in part["value"]["targets"]] if part else None


def test_canary_split_under_load(mesh, backends, consul) -> None:
    a, b = backends("v1"), backends("v2")
    consul.register("web", a.port, address=a.host, meta={"version": "v1"})
    consul.register("web", b.port, address=b.host, meta={"version": "v2"})
    consul.write_config(RESOLVER)
    consul.write_config(splitter(0))
    m = mesh.start(*fleet_config(mesh, consul))
    load = CountingLoad(m.ports["outbound"]).start()
    took = []
    try:
        for share in (0, 10, 50, 100):
            consul.write_config(splitter(share))
            took.append(wait_applied(m, "web", "split",
                                     lambda p, s=share: split_weights(p) == [(100 - s) * 100, s * 100]))
            counts = load.sample(2000)
            got = 100 * counts["v2"] / sum(counts.values())
            assert abs(got - share) <= 3, (share, counts)
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.total_ok >= 8000
    # Within a second of the write, measured (the bound asserted is generous: busy CPUs).
    print("write-to-applied seconds per step:", [round(t, 3) for t in took])
    assert max(took) < 10


def test_router_path_match_with_its_own_timeout(mesh, backends, consul) -> None:
    a = backends("a")
    consul.register("web", a.port, address=a.host)
    consul.write_config({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/slow"}},
         "Destination": {"Service": "web", "RequestTimeout": "300ms"}}]})
    m = mesh.start(*fleet_config(mesh, consul, workers=1))
    port = m.ports["outbound"]
    started = time.monotonic()
    status, _, body = http_get("127.0.0.1", port, "/slow?ms=3000", {"Host": "web"})
    took = time.monotonic() - started
    assert status == 504, body
    assert took < 2.5, took          # the route's 300 ms, not the service's 10 s
    status, _, body = http_get("127.0.0.1", port, "/other", {"Host": "web"})
    assert (status, body) == (200, b"a /other\n")
    # Deleted in Consul: the service's own timeout again, live.
    consul.delete_config("service-router", "web")
    wait_applied(m, "web", "routes", lambda p: p is None)
    status, _, body = http_get("127.0.0.1", port, "/slow?ms=600", {"Host": "web"})
    assert status == 200, body


def test_resolver_failover_to_another_datacenter_and_back(mesh, backends, consul) -> None:
    a, b = backends("dc1"), backends("dc2")
    ia = consul.register("web", a.port, address=a.host)
    consul.register("web", b.port, address=b.host, datacenter="dc2", node="node2")
    consul.write_config({"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "2s",
                         "Failover": {"*": {"Datacenters": ["dc2"]}}})
    m = mesh.start(*fleet_config(mesh, consul, workers=1))
    port = m.ports["outbound"]

    def who() -> str:
        status, headers, _ = http_get("127.0.0.1", port, "/", {"Host": "web"})
        return headers.get("x-backend", f"status {status}")

    assert {who() for _ in range(10)} == {"dc1"}
    consul.set_health(ia, "critical")          # no healthy endpoint in dc1
    wait_for(lambda: who() == "dc2", 10, what="failover to dc2")
    assert {who() for _ in range(10)} == {"dc2"}
    consul.set_health(ia, "passing")           # and back
    wait_for(lambda: who() == "dc1", 10, what="back to dc1")
    assert {who() for _ in range(10)} == {"dc1"}
    effective = fleet_service(m, "web")["effective"]["resolver"]
    assert effective["from"] == "consul: service-resolver/web"
    assert effective["value"]["failover"] == [{"service": "web@dc2", "subset": ""}]


def test_source_down_keeps_last_good_also_after_restart(mesh, backends, consul) -> None:
    a, b = backends("v1"), backends("v2")
    consul.register("web", a.port, address=a.host, meta={"version": "v1"})
    consul.register("web", b.port, address=b.host, meta={"version": "v2"})
    consul.write_config(RESOLVER)
    consul.write_config({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/beta"}},
         "Destination": {"ServiceSubset": "v2"}}]})
    m = mesh.start(*fleet_config(mesh, consul, workers=1))
    port = m.ports["outbound"]

    def routed() -> tuple[bytes, bytes]:
        return (http_get("127.0.0.1", port, "/beta/x", {"Host": "web"})[2],
                http_get("127.0.0.1", port, "/x", {"Host": "web"})[2])

    assert routed() == (b"v2 /beta/x\n", b"v1 /x\n")
    persisted = admin_json(m, "/config")["fleet"]["persisted"]["path"]
    endpoints = admin_json(m, "/endpoints")["persisted"]["path"]

    def saved() -> bool:
        try:
            fleet = msgpack.unpackb(open(persisted, "rb").read())["services"]
        except OSError:
            return False
        return (set(fleet.get("web", {}).get("consul", {})) == {"routes", "resolver"}
                and "web" in state.load(endpoints)[0])
    wait_for(saved, 10, what="the policies and endpoints persisted")
    consul.stop()                              # the source goes down
    m.wait_metric("meshd_fleet_stale", 'service="web"', at_least=1)
    assert routed() == (b"v2 /beta/x\n", b"v1 /x\n")
    m.stop()                                   # and meshd restarts meanwhile
    m.start()
    assert routed() == (b"v2 /beta/x\n", b"v1 /x\n")
    assert fleet_service(m, "web")["sources"]["consul"]["stale"] is True
    consul.restart()                           # back: a change applies again
    consul.delete_config("service-router", "web")
    wait_applied(m, "web", "routes", lambda p: p is None, timeout=60)
    assert routed() == (b"v1 /beta/x\n", b"v1 /x\n")


def test_malformed_entry_refused_named_and_previous_kept(mesh, backends, consul) -> None:
    a, b = backends("v1"), backends("v2")
    consul.register("web", a.port, address=a.host, meta={"version": "v1"})
    consul.register("web", b.port, address=b.host, meta={"version": "v2"})
    consul.write_config(RESOLVER)
    consul.write_config(splitter(100))
    m = mesh.start(*fleet_config(mesh, consul, workers=1))
    port = m.ports["outbound"]
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"v2 /\n"
    bad = splitter(50)
    bad["Splits"][1]["Weight"] = 40            # adds up to 90
    consul.write_config(bad)
    labels = 'service="web",source="consul",kind="split",entry="service-splitter/web"'
    m.wait_metric("meshd_fleet_refused_entries", labels)
    assert {http_get("127.0.0.1", port, "/", {"Host": "web"})[2] for _ in range(10)} == {b"v2 /\n"}
    status, _, body = http_get("127.0.0.1", m.ports["admin"], "/ready")
    assert status == 200
    assert b"refused service-splitter/web" in body and b"add up to 90" in body, body
    assert "refused service-splitter/web for service web: Splits: the weights add up to 90" in m.log()
    refused = fleet_service(m, "web")["sources"]["consul"]["refused"]
    assert refused["split"]["entry"] == "service-splitter/web"
    # An RE2-only regex (Consul takes it, Python's re does not): refused too.
    consul.write_config({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathRegex": "/\\pL+"}}, "Destination": {"ServiceSubset": "v1"}}]})
    m.wait_metric("meshd_fleet_refused_entries", 'kind="routes"')
    # Fixed: accepted, applied, no longer named.
    consul.write_config(splitter(0))
    wait_applied(m, "web", "split", lambda p: split_weights(p) == [10000, 0])
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"v1 /\n"
    assert m.metric("meshd_fleet_refused_entries", 'kind="split"') == 0


def test_local_route_wins_over_fleet_routes(mesh, backends, consul) -> None:
    a, b = backends("a"), backends("b")
    consul.register("web", a.port, address=a.host)
    consul.register("other", b.port, address=b.host)
    consul.write_config({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": "other"}}]})
    consul.write_config({"Kind": "service-router", "Name": "api", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": "other"}}]})
    m = mesh.start(*fleet_config(mesh, consul, workers=1, extra=textwrap.dedent("""
        [[route]]
        host = "web"
        service = "web"
        """)))
    port = m.ports["outbound"]
    assert http_get("127.0.0.1", port, "/", {"Host": "web"})[2] == b"a /\n"     # the file's
    assert http_get("127.0.0.1", port, "/", {"Host": "api"})[2] == b"b /\n"     # the fleet's
    web = fleet_service(m, "web")
    assert web["effective"]["routes"]["from"] == "file"
    assert web["overridden_by_file"]["routes"] == "consul: service-router/web"
    assert fleet_service(m, "api")["effective"]["routes"]["from"] == "consul: service-router/api"


def test_source_keys_are_checked_by_check_run_and_reload(mesh, backends, tmp_path) -> None:
    """`meshd check`, `meshd run` and a HUP refuse a config source's bad keys with the
    same key-path lines (the plugin validates them); a refused reload keeps serving."""
    a = backends("a")
    good, ports = mesh.config({"web": [a.address]}, workers=1)
    bad = good + textwrap.dedent("""
        [[config_source]]
        name = "consul"
        plugin = "consul"
        address = 5
        passing_only = true
        [[config_source]]
        name = "other"
        plugin = "nonesuch"
        """)
    lines = ["config_source[0].address: expected a URL", "config_source[0].passing_only: unknown key",
             "config_source[1].plugin: no config plugin named 'nonesuch' is installed"]
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    for command in ("check", "run"):
        out = subprocess.run([sys.executable, "-m", "meshd", command, "-c", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (command, out)
        for line in lines:
            assert f"{path}: {line}" in out.stderr, (command, line, out.stderr)
    m = mesh.start(good, ports)
    m.config_path.write_text(bad)
    m.signal(signal.SIGHUP)
    wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="failure"') == 1,
             what="the reload counted as failed")
    for line in lines:
        assert f"{m.config_path}: {line}" in m.log(), line
    assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})[0] == 200
