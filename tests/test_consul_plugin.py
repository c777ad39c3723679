"""The Consul discovery plugin through py-consul against the Consul test server:
updates, filters, the blocking-query rules of Consul's docs, ACL, outages, config."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshd_consul import ConsulBackend
from meshd_consul.entries import TokenBucket, next_index, to_endpoints

from meshd.discovery.api import Endpoint, NoSuchService, Reset
from meshd.errors import ConfigError
from meshd.testing.consul_server import ConsulServer
from meshd.testing.watch import WatchRecorder

HEALTH = "/v1/health/service/web"


@pytest.fixture
def watch(consul: ConsulServer) -> Iterator[object]:
    recorders: list[WatchRecorder] = []

    def start(service: str = "web", **options: object) -> WatchRecorder:
        rec = WatchRecorder(ConsulBackend("consul", {"address": consul.url, **options}), service)
        recorders.append(rec)
        return rec

    yield start
    for rec in recorders:
        rec.close()


def hosts(eps: tuple[Endpoint, ...]) -> set[str]:
    return {str(e) for e in eps}


def in_long_poll(consul: ConsulServer, count: int = 2) -> None:
    """Wait until the watch has sent its first blocking query (the second request)."""
    consul.wait_for(lambda s: len(s.requests_to(HEALTH)) >= count)


def resets(rec: WatchRecorder) -> list[Reset]:
    return [u for _, u in rec.updates if isinstance(u, Reset)]


# -- updates ---------------------------------------------------------------------------

def test_initial_reset_then_add_remove_unhealthy(consul, watch) -> None:
    a = consul.register("web", 8081, address="10.0.0.1")
    rec = watch()
    assert rec.next() == Reset((Endpoint("10.0.0.1", 8081),))
    b = consul.register("web", 8082, address="10.0.0.2")
    rec.wait_for(lambda eps: hosts(eps) == {"10.0.0.1:8081", "10.0.0.2:8082"}, timeout=2)
    consul.set_health(a, "critical")
    rec.wait_for(lambda eps: hosts(eps) == {"10.0.0.2:8082"}, timeout=2)
    consul.set_health(a, "warning")  # passing_only (the default) keeps warning out
    consul.deregister(b)
    rec.wait_for(lambda eps: eps == (), timeout=2)
    assert rec.exists is True      # registered with no passing instance: not "unknown"
    consul.set_health(a, "passing")
    rec.wait_for(lambda eps: hosts(eps) == {"10.0.0.1:8081"}, timeout=2)


def test_reset_only_when_the_set_changes(consul, watch) -> None:
    consul.register("web", 8081, address="10.0.0.1")
    rec = watch(min_interval="10ms")
    rec.next()
    in_long_poll(consul)
    for _ in range(3):  # idempotent writes wake the blocking query; nothing changes
        n = len(consul.requests_to(HEALTH))
        consul.touch("web")
        consul.wait_for(lambda s, n=n: len(s.requests_to(HEALTH)) > n)
    consul.register("web", 8082, address="10.0.0.2")
    rec.wait_for(lambda eps: len(eps) == 2, timeout=2)
    assert len(resets(rec)) == 2
    assert len(consul.requests_to(HEALTH)) >= 5


def test_passing_only_false_keeps_warning_drops_critical(consul, watch) -> None:
    consul.register("web", 8081, address="10.0.0.1", weights={"Passing": 10, "Warning": 2})
    consul.register("web", 8082, address="10.0.0.2", status="warning",
                    weights={"Passing": 10, "Warning": 2})
    consul.register("web", 8083, address="10.0.0.3", status="critical")
    rec = watch(passing_only=False)
    eps = rec.wait_for(lambda eps: len(eps) == 2)
    assert {(str(e), e.weight) for e in eps} == {("10.0.0.1:8081", 10), ("10.0.0.2:8082", 2)}
    assert all(r.param("passing") is None for r in consul.requests_to(HEALTH))


def test_tags_and_node_meta_filter(consul, watch) -> None:
    consul.register("web", 8081, address="10.0.0.1", tags=["prod", "v2"], node_meta={"rack": "r1"})
    consul.register("web", 8082, address="10.0.0.2", tags=["prod"], node_meta={"rack": "r1"})
    consul.register("web", 8083, address="10.0.0.3", tags=["prod", "v2"], node="n2",
                    node_meta={"rack": "r2"})
    rec = watch(tags=["prod", "v2"], node_meta={"rack": "r1"})
    assert hosts(rec.wait_for(lambda eps: bool(eps))) == {"10.0.0.1:8081"}
    sent = consul.requests_to(HEALTH)[0]
    assert sorted(sent.params["tag"]) == ["prod", "v2"]
    assert sent.params["node-meta"] == ["rack:r1"]


def test_service_in_another_datacenter(consul, watch) -> None:
    consul.register("web", 8081, address="10.0.0.1")
    consul.register("web", 8082, address="10.2.0.1", datacenter="dc2")
    rec2 = watch("web@dc2")
    assert hosts(rec2.wait_for(lambda eps: bool(eps))) == {"10.2.0.1:8082"}
    assert consul.requests_to(HEALTH)[0].param("dc") == "dc2"
    rec_cfg = watch(datacenter="dc2")
    assert hosts(rec_cfg.wait_for(lambda eps: bool(eps))) == {"10.2.0.1:8082"}
    rec_none = watch("web@dc9")   # Consul: 500 "No path to datacenter"
    assert "No path to datacenter" in str(rec_none.wait_error())


def test_meshed_meta_weights_zone_labels_and_node_address(consul, watch) -> None:
    consul.register("web", 8081, node_address="10.0.0.7", node_meta={"zone": "z-node"},
                    tags=["prod"], weights={"Passing": 7},
                    meta={"meshd-inbound-port": "4143", "meshd-identity": "spiffe://t/ns/web"})
    consul.register("web", 8082, address="10.0.0.8", meta={"zone": "z-svc"}, node="n2",
                    node_meta={"zone": "z-node"})
    eps = {str(e): e for e in watch().wait_for(lambda eps: len(eps) == 2)}
    meshed = eps["10.0.0.7:8081"]    # no Service.Address: Node.Address
    assert (meshed.meshed, meshed.inbound_port, meshed.identity) == (True, 4143, "spiffe://t/ns/web")
    assert meshed.weight == 7 and meshed.zone == "z-node"
    assert meshed.labels == (("meta:meshd-identity", "spiffe://t/ns/web"),
                             ("meta:meshd-inbound-port", "4143"), ("tag", "prod"))
    plain = eps["10.0.0.8:8082"]
    assert (plain.meshed, plain.inbound_port, plain.weight, plain.zone) == (False, 0, 1, "z-svc")


def test_to_endpoints_sorts_and_ignores_bad_inbound_port() -> None:
    def entry(addr: str, port: int, meta: dict[str, str]) -> dict[str, object]:
        return {"Node": {"Address": "10.9.9.9"}, "Checks": [{"Status": "passing"}],
                "Service": {"Address": addr, "Port": port, "Meta": meta}}
    eps = to_endpoints([entry("10.0.0.2", 80, {}), entry("10.0.0.1", 80,
                                                          {"meshd-inbound-port": "x"})],
                       "zone", passing_only=True)
    assert [str(e) for e in eps] == ["10.0.0.1:80", "10.0.0.2:80"]
    assert not eps[0].meshed


# -- the blocking-query rules ("Blocking Queries", Implementation Details) ------------

def test_wait_is_sent_with_the_index(consul, watch) -> None:
    consul.register("web", 8081)
    watch(wait="2s").next()
    consul.wait_for(lambda s: len(s.requests_to(HEALTH)) >= 2)
    first, second = consul.requests_to(HEALTH)[:2]
    assert first.param("index") is None and first.param("wait") is None  # a plain read
    assert second.param("wait") == "2s"
    assert int(second.param("index") or 0) >= 1


def test_default_wait_is_five_minutes(consul, watch) -> None:
    consul.register("web", 8081)
    watch().next()
    consul.wait_for(lambda s: len(s.requests_to(HEALTH)) >= 2)
    assert consul.requests_to(HEALTH)[1].param("wait") == "300s"


def test_index_going_backwards_resets_to_a_full_read(consul, watch) -> None:
    consul.register("web", 8081, address="10.0.0.1")
    for _ in range(30):
        consul.touch("web")  # the index climbs well above where it will go back to
    rec = watch()
    rec.next()
    in_long_poll(consul)
    high = int(consul.requests_to(HEALTH)[-1].param("index") or 0)
    consul.set_index(5)                       # a snapshot restore: blocked queries return
    consul.register("web", 8082, address="10.0.0.2")   # index 6, far below `high`
    rec.wait_for(lambda eps: hosts(eps) == {"10.0.0.1:8081", "10.0.0.2:8082"}, timeout=2)
    sent = [r.param("index") for r in consul.requests_to(HEALTH)]
    assert high > 6
    # After the lower index came back: one request without index (the full read)...
    assert None in sent[2:]
    # ...and blocking resumed at the new, lower index (never stuck waiting above it).
    consul.wait_for(lambda s: any(0 < int(r.param("index") or 0) < high
                                  for r in s.requests_to(HEALTH)))


def test_index_zero_blocks_at_one_instead_of_spinning(consul, watch) -> None:
    consul.register("web", 8081, address="10.0.0.1")
    rec = watch(min_interval="1ms")   # no rate limit to hide a busy loop
    rec.next()
    in_long_poll(consul)
    consul.set_index(0)               # Consul answers X-Consul-Index: 0 (a server bug)
    consul.wait_for(lambda s: any(r.param("index") == "1" for r in s.requests_to(HEALTH)))
    count = len(consul.requests_to(HEALTH))
    # The query at index 1 is held by Consul: the watch waits in it (a spinning loop would
    # be answered at once, index 0, and send hundreds), and sent at most one more meanwhile.
    consul.wait_for(lambda s: s.blocked >= 1
                    and s.requests_to(HEALTH)[-1].param("index") == "1")
    assert len(consul.requests_to(HEALTH)) - count <= 1
    consul.register("web", 8082, address="10.0.0.2")   # index 1: not above 1, still blocked
    consul.register("web", 8083, address="10.0.0.3")   # index 2: wakes
    rec.wait_for(lambda eps: len(eps) == 3, timeout=2)


def test_loop_is_rate_limited_when_answers_come_at_once(consul, watch) -> None:
    consul.register("web", 8081)
    watch(min_interval="100ms").next()
    stop = threading.Event()

    def churn() -> None:   # the index changes faster than anyone can block on it
        while not stop.is_set():
            consul.touch("web")
            time.sleep(0.001)
    t = threading.Thread(target=churn, daemon=True)
    before = len(consul.requests_to(HEALTH))
    started = time.monotonic()
    t.start()
    time.sleep(1.0)        # the measurement window itself
    sent = len(consul.requests_to(HEALTH)) - before
    window = time.monotonic() - started  # longer than 1 s on a busy machine
    stop.set()
    t.join(2)
    # ~1 per 100ms plus a burst of 2: the upper bound relative to the real window, the
    # lower one what even a slow machine does in a second
    assert 5 <= sent <= window / 0.1 + 4, (sent, window)


def test_token_bucket_allows_a_burst_of_two_then_the_interval() -> None:
    bucket = TokenBucket(1.0, now=0.0)
    assert [bucket.reserve(0.0), bucket.reserve(0.0)] == [0.0, 0.0]
    assert bucket.reserve(0.0) == pytest.approx(1.0)
    assert bucket.reserve(10.0) == 0.0
    assert next_index(50, 40) == 0 and next_index(50, 0) == 0
    assert next_index(0, 0) == 1 and next_index(3, 9) == 9


# -- existence -------------------------------------------------------------------------

def test_unknown_service_is_no_such_service_until_registered(consul, watch) -> None:
    rec = watch("nope")
    assert rec.next() == NoSuchService()
    iid = consul.register("nope", 8081, address="10.0.0.1")
    rec.wait_for(lambda eps: len(eps) == 1, timeout=2)
    consul.deregister(iid)
    assert rec.next() == Reset((Endpoint("10.0.0.1", 8081),))
    assert rec.next(timeout=2) == NoSuchService()


# -- ACL -------------------------------------------------------------------------------

def test_acl_good_token_works_and_is_sent_per_request(consul, watch, tmp_path: Path) -> None:
    consul.acl = {"good": "read"}
    consul.register("web", 8081)
    token = tmp_path / "token"
    token.write_text("good\n")
    watch(token_file=str(token)).wait_for(lambda eps: len(eps) == 1)
    assert {r.token for r in consul.requests_to(HEALTH)} == {"good"}


@pytest.mark.parametrize("token,expect", [("unknown", "403 ACL not found"),
                                          ("deny", "results filtered by ACLs"),
                                          (None, "results filtered by ACLs")])
def test_acl_refused_token_fails_the_watch(consul, watch, tmp_path: Path, token: str | None,
                                           expect: str) -> None:
    consul.acl = {"deny": "deny"}
    consul.register("web", 8081)
    options: dict[str, object] = {}
    if token:
        (tmp_path / "token").write_text(token)
        options["token_file"] = str(tmp_path / "token")
    err = str(watch(**options).wait_error())
    assert "ACL denied for health/service/web" in err and expect in err
    assert f"consul 127.0.0.1:{consul.port}" in err
    assert not token or token not in err.replace("ACL not found", "")


def test_rotated_token_file_is_picked_up(consul, watch, tmp_path: Path) -> None:
    consul.acl = {"t1": "read", "t2": "read"}
    consul.register("web", 8081, address="10.0.0.1")
    token = tmp_path / "token"
    token.write_text("t1")
    rec = watch(token_file=str(token))
    rec.next()
    in_long_poll(consul)
    (tmp_path / "token.new").write_text("t2")
    os.replace(tmp_path / "token.new", token)   # rotated atomically, as a rotator should
    consul.acl = {"t2": "read"}        # t1 revoked
    consul.register("web", 8082, address="10.0.0.2")
    rec.wait_for(lambda eps: len(eps) == 2, timeout=2)
    consul.wait_for(lambda s: s.requests_to(HEALTH)[-1].token == "t2")
    assert rec.error is None


def test_missing_token_file_is_a_clear_error(consul, watch, tmp_path: Path) -> None:
    err = str(watch(token_file=str(tmp_path / "absent")).wait_error())
    assert "token_file" in err and "absent" in err


# -- failures ----------------------------------------------------------------------------

def test_server_error_fails_the_watch_with_the_status(consul, watch) -> None:
    consul.register("web", 8081)
    consul.fail_next(1, 500, "rpc error making call: No cluster leader")
    err = str(watch().wait_error())
    assert "health/service/web" in err and "500 rpc error making call: No cluster leader" in err


def test_outage_fails_the_watch_and_a_new_watch_resumes_after_restart(consul, watch) -> None:
    consul.register("web", 8081, address="10.0.0.1")
    rec = watch()
    rec.next()
    in_long_poll(consul)
    consul.stop()
    err = str(rec.wait_error(timeout=3))
    assert f"consul 127.0.0.1:{consul.port}: unreachable for health/service/web" in err
    consul.register("web", 8082, address="10.0.0.2")   # changed while the agent was away
    consul.restart()
    again = watch()
    again.wait_for(lambda eps: len(eps) == 2, timeout=2)


def test_close_ends_a_watch_blocked_in_a_long_poll(consul) -> None:
    consul.register("web", 8081)
    backend = ConsulBackend("consul", {"address": consul.url, "wait": "10m"})
    rec = WatchRecorder(backend, "web")
    rec.next()
    in_long_poll(consul)
    started = time.monotonic()
    rec.close(timeout=5)
    assert not rec._thread.is_alive()
    assert time.monotonic() - started < 5.0  # not the 10 minutes of the long poll
    assert rec.error is None


# -- config ----------------------------------------------------------------------------

def test_config_errors_name_their_keys() -> None:
    with pytest.raises(ConfigError) as e:
        ConsulBackend("consul", {"address": "ftp://x", "wait": "11m", "tags": "prod",
                                 "node_meta": {"rack": 1}, "passing_only": "yes",
                                 "cert_file": "/c.pem", "min_interval": "fast", "colour": 1})
    keys = {k for k, _ in e.value.problems}
    assert keys == {"address", "wait", "tags", "node_meta", "passing_only", "key_file",
                    "min_interval", "colour"}
    assert "unknown key" in dict(e.value.problems)["colour"]


def test_config_defaults_and_https() -> None:
    o = ConsulBackend("c", {}).opts
    assert (o.scheme, o.host, o.port, o.wait, o.min_interval, o.passing_only) == (
        "http", "127.0.0.1", 8500, 300.0, 0.1, True)
    o = ConsulBackend("c", {"address": "https://[::1]", "ca_file": "/ca.pem"}).opts
    assert (o.scheme, o.host, o.port, o.ca_file) == ("https", "[::1]", 8501, "/ca.pem")


# -- registration --------------------------------------------------------------------------

def test_register_local_needs_a_write_token(consul) -> None:
    consul.acl = {"writer": "write", "reader": "read"}
    backend = ConsulBackend("consul", {"address": consul.url})
    with pytest.raises(Exception, match=r"ACL denied for agent/service/register \(403"):
        backend.register_local("web", 8081)
    backend.close()


def test_register_local_is_seen_by_a_watch(consul, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("writer")
    consul.acl = {"writer": "write"}
    backend = ConsulBackend("consul", {"address": consul.url, "token_file": str(tmp_path / "token")})
    sid = backend.register_local("web", 8081, address="10.0.0.1", inbound_port=4143,
                                 identity="spiffe://t/web", ready_url="http://10.0.0.1:4191/ready")
    [inst] = consul.instances()
    assert (inst.id, inst.status, inst.meta["meshd-inbound-port"]) == ("web-8081", "critical", "4143")
    assert inst.checks[0]["http"] == "http://10.0.0.1:4191/ready"
    assert inst.checks[0]["deregistercriticalserviceafter"] == "1m"
    rec = WatchRecorder(backend, "web")
    assert rec.next() == Reset(())              # critical until the first check passes
    consul.set_health(sid, "passing")           # (the test server runs no checks itself)
    [ep] = rec.wait_for(lambda eps: len(eps) == 1, timeout=2)
    assert (ep.meshed, ep.inbound_port, ep.identity) == (True, 4143, "spiffe://t/web")
    backend.deregister_local(sid)
    rec.wait_for(lambda eps: rec.exists is False, timeout=2)
    assert rec.updates[-1][1] == NoSuchService()
    rec.close()


# -- made-up names: knows() and the kept catalog ------------------------------------------

def test_knows_answers_from_the_catalog_it_keeps(consul) -> None:
    consul.register("web", 8081, address="10.0.0.1")
    backend = ConsulBackend("consul", {"address": consul.url, "wait": "30s"})
    try:
        assert backend.knows("web") is None           # the first call starts the catalog watch
        assert backend.catalog.wait_synced(5)
        assert (backend.knows("web"), backend.knows("junk")) == (True, False)
        assert backend.knows("WEB") is True           # Consul's lookups ignore case
        assert backend.knows("web@dc2") is None       # another datacenter's catalog is not kept
        consul.register("orders", 8082, address="10.0.0.2")
        deadline = time.monotonic() + 5
        while backend.knows("orders") is not True and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.knows("orders") is True
        # One blocking query follows the catalog: no read per knows() call.
        catalog = consul.requests_to("/v1/catalog/services")
        assert len(catalog) <= 3 and catalog[-1].param("index") not in (None, "0")
    finally:
        backend.close()


def test_a_name_the_catalog_lacks_is_watched_without_a_query_until_it_appears(consul) -> None:
    backend = ConsulBackend("consul", {"address": consul.url, "wait": "30s"})
    backend.knows("orders")                           # as meshd asks before watching
    assert backend.catalog.wait_synced(5)
    rec = WatchRecorder(backend, "orders")
    try:
        assert isinstance(rec.next(), NoSuchService)
        # Not registered: the watch waits on the kept catalog, not on the agent.
        assert consul.requests_to("/v1/health/service/orders") == []
        assert consul.blocked <= 1                    # the catalog's own query
        consul.register("orders", 8081, address="10.0.0.1")
        rec.wait_for(lambda eps: hosts(eps) == {"10.0.0.1:8081"}, timeout=5)
        consul.deregister("orders-node1-8081")        # gone again: back to waiting
        assert isinstance(rec.next(), Reset) and isinstance(rec.next(), NoSuchService)
    finally:
        rec.close()


def test_a_watch_is_not_held_by_a_catalog_nobody_started(consul) -> None:
    # watch() alone (no knows()) works as before: the health query, then the catalog once.
    backend = ConsulBackend("consul", {"address": consul.url, "wait": "30s"})
    rec = WatchRecorder(backend, "nosuch")
    try:
        assert isinstance(rec.next(), NoSuchService)
        assert not backend.catalog.started
        assert len(consul.requests_to("/v1/health/service/nosuch")) >= 1
    finally:
        rec.close()
