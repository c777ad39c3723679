"""Made-up service names against a real meshd and the Consul test server (issue 11, items
7 and 12): they cannot lock a registered service out, hold agent connections or memory
past ``max_watches``, outlive the negative cache, or flood the log."""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from collections.abc import Iterable

from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import http_get, process_usage, wait_for
from meshd.testing.k8s_config import kubernetes_table

JUNK = 1300    # 1,000 and then some: some asks may not fit the control socket's queue
FLOOD_THREADS = 16
DEFAULT_MAX_WATCHES = 100


def _consul_first(mesh, consul: ConsulServer, top: str = "") -> tuple[str, dict[str, int]]:
    """Consul as the first [[discovery]] source (names nobody configured go to it), before
    the harness's static one; nothing configured: every service is watched on demand."""
    text, ports = mesh.config({}, workers=1, top=top)
    consul_source = (f'[[discovery]]\nname = "consul"\nplugin = "consul"\n'
                     f'address = "{consul.url}"\nwait = "30s"\n\n')
    return text.replace("[[discovery]]", consul_source + "[[discovery]]", 1), ports


def _flood(port: int, hosts: Iterable[str]) -> Counter[int]:
    """One GET per Host name, over FLOOD_THREADS keep-alive connections; status counts."""
    todo = list(hosts)
    lock = threading.Lock()
    statuses: Counter[int] = Counter()

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        while True:
            with lock:
                if not todo:
                    break
                host = todo.pop()
            try:
                conn.request("GET", "/", headers={"Host": host})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException):
                conn.close()
                status = 0
            with lock:
                statuses[status] += 1
        conn.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(FLOOD_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "the flood did not finish"
    return statuses


def _described(admin: int) -> dict:
    _, _, raw = http_get("127.0.0.1", admin, "/endpoints")
    return json.loads(raw)


def _junk_watched(admin: int) -> list[str]:
    return [name for name in _described(admin)["services"] if name.startswith("junk")]


def test_made_up_names_do_not_lock_out_a_registered_service(mesh, backends, tmp_path) -> None:
    # meshd's token may read the services it calls (least privilege: "web..."), so Consul
    # refuses the health of a made-up name (403) and lists only web in the catalog.
    a = backends("a")
    token = tmp_path / "consul.token"
    token.write_text("meshd\n")
    consul = ConsulServer(acl={"meshd": "read:web"}).start()
    consul.register("web", a.port, address=a.host)
    text, ports = _consul_first(mesh, consul)
    text = text.replace('wait = "30s"\n', f'wait = "30s"\ntoken_file = "{token}"\n', 1)
    try:
        _lockout(mesh, consul, text, ports)
    finally:
        consul.stop()


def _lockout(mesh, consul: ConsulServer, text: str, ports: dict[str, int]) -> None:
    m = mesh.start(text, ports)
    [control] = m.control_pids()
    rss_before, _ = process_usage(control)

    statuses = _flood(ports["outbound"], (f"junk{i}" for i in range(JUNK)))
    assert statuses == {503: JUNK}, statuses          # every name was answered: unknown

    # The registered service, never asked for before, answers on its first request.
    status, headers, _ = http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})
    assert (status, headers.get("x-backend")) == (200, "a")

    # Memory stays bounded: the junk held at most max_watches watches, no connection each.
    rss_after, _ = process_usage(control)
    assert rss_after - rss_before < 25, (rss_before, rss_after)
    assert consul.max_blocked <= DEFAULT_MAX_WATCHES + 2, consul.max_blocked

    # The junk is dropped within the negative cache's 5s (plus the check), web stays.
    wait_for(lambda: not _junk_watched(ports["admin"]), timeout=15,
             what="the made-up names to expire")
    assert "web" in _described(ports["admin"])["services"]

    # A thousand made-up names gave a bounded number of log lines (ratelog.Throttle).
    log = m.log()
    started, stopped = log.count("on demand (sources:"), log.count("stopped watching junk")
    answered = log.count("503: unknown service 'junk")   # the worker's line, per listener
    assert started <= 25 and stopped <= 25 and answered <= 25, (started, stopped, answered)


def test_watches_per_source_stay_within_max_watches(mesh, api, tmp_path) -> None:
    # The kubernetes plugin cannot tell a name from memory (no knows()): each name a
    # client makes up is watched with a stream of its own, and only max_watches at once.
    text, ports = mesh.config({}, workers=1)
    source = kubernetes_table(api, tmp_path, "discovery", timeout=None) + "\n"
    m = mesh.start(text.replace("[[discovery]]", source + "[[discovery]]", 1), ports)
    statuses = _flood(ports["outbound"], (f"junk{i}" for i in range(300)))
    assert statuses == {503: 300}, statuses
    # Evicted watches hang up at once; the test server notices within its check interval.
    wait_for(lambda: api.open_watches() <= DEFAULT_MAX_WATCHES, timeout=10,
             what="watch streams within max_watches")
    # At most the cap, plus evictions the server had not noticed yet while the flood's
    # FLOOD_THREADS clients ran.
    assert api.max_open_watches <= DEFAULT_MAX_WATCHES + FLOOD_THREADS, api.max_open_watches
    assert m.metric("meshd_discovery_watches_evicted_total", 'source="k8s"') >= 200
    assert m.metric("meshd_discovery_watches", 'source="k8s"') <= DEFAULT_MAX_WATCHES
    # Found absent, they are dropped within the negative cache's 5s.
    wait_for(lambda: not _junk_watched(ports["admin"]), timeout=15,
             what="the made-up names to expire")


def test_failing_watches_of_made_up_names_expire_as_fast_as_absent_ones(mesh, tmp_path) -> None:
    # A token that may read nothing: Consul filters every answer, each watch fails with an
    # ACL denial (it never learns the name is absent); the negative cache drops it all the
    # same, not service_idle_expiry (10m) later.
    token = tmp_path / "consul.token"
    token.write_text("blind\n")
    with ConsulServer(acl={"blind": "deny"}) as consul:
        text, ports = _consul_first(mesh, consul)
        text = text.replace('wait = "30s"\n', f'wait = "30s"\ntoken_file = "{token}"\n', 1)
        m = mesh.start(text, ports)
        statuses = _flood(ports["outbound"], (f"junk{i}" for i in range(50)))
        assert set(statuses) == {503}, statuses
        wait_for(lambda: "ACL denied for health/service/junk" in m.log(), timeout=5,
                 what="the failing watches")
        wait_for(lambda: not _junk_watched(ports["admin"]), timeout=15,
                 what="failing watches of made-up names to expire")
        failed = m.log().count("watch of junk")
        assert failed <= 25, failed


def test_refused_watches_are_logged_at_a_bounded_rate(mesh, backends, consul) -> None:
    # max_watches = 2 held by two services Consul knows: made-up names are refused.
    a = backends("a")
    consul.register("web", a.port, address=a.host)
    consul.register("api", a.port, address=a.host)
    text, ports = _consul_first(mesh, consul)
    text = text.replace('wait = "30s"\n', 'wait = "30s"\nmax_watches = 2\n', 1)
    m = mesh.start(text, ports)
    for name in ("web", "api"):
        assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": name})[0] == 200
    statuses = _flood(ports["outbound"], (f"junk{i}" for i in range(200)))
    assert statuses == {503: 200}, statuses
    assert m.metric("meshd_discovery_watches_refused_total", 'source="consul"') >= 200
    refused = m.log().count("not watching junk")
    assert 1 <= refused <= 25, refused
    # Known services are never refused: a third one still gets its watch (past the cap).
    consul.register("orders", a.port, address=a.host)
    wait_for(lambda: http_get("127.0.0.1", ports["outbound"], "/",
                              {"Host": "orders"})[0] == 200, timeout=10,
             what="a known service past max_watches")
