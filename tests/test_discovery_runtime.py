"""Discovery inside a running meshd: services watched on demand, fail static with
persisted endpoints across a restart, broken plugins, several sources per service."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from meshd.errors import ShmError
from meshd.shm import STATE_SERVING
from meshd.testing.harness import free_port, http_get, wait_for
from meshd.testing.plugins import make_distribution

# A directory of service files: `DIR/NAME` holds "host:port" lines. No file: the service
# does not exist. No directory: the source is down (the watch raises).
DIRPLUGIN = '''
import os, time
from meshd.discovery import Backend, Endpoint, NoSuchService, Reset

class DirBackend(Backend):
    def __init__(self, name, options):
        super().__init__(name, options)
        self.dir = options["dir"]

    def watch(self, service):
        last = ()  # neither None (no such service) nor a list of lines
        while True:
            if not os.path.isdir(self.dir):
                raise OSError(f"{self.dir} is gone")
            path = os.path.join(self.dir, service)
            try:
                with open(path) as f:
                    lines = [ln.strip() for ln in f if ln.strip()]
            except FileNotFoundError:
                lines = None
            if lines != last:
                last = lines
                if lines is None:
                    yield NoSuchService()
                else:
                    eps = [ln.rsplit(":", 1) for ln in lines]
                    yield Reset(tuple(Endpoint(h, int(p)) for h, p in eps))
            time.sleep(0.05)
'''

BROKEN_IMPORT = "raise RuntimeError('this plugin is broken at import')\n"


def _plugin_env(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "plugins"
    make_distribution(root, "dir-plugin", {"dir": "dirplugin:DirBackend"}, "dirplugin", DIRPLUGIN)
    make_distribution(root, "broken-plugin", {"broken": "brokenplugin:Backend"}, "brokenplugin",
                      BROKEN_IMPORT)
    return dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _config(mesh, services_dir: Path, extra: str = "", sources: str = "") -> tuple[str, dict[str, int]]:
    text, ports = mesh.config({"web": []}, extra=extra)
    text = text.replace('[[discovery]]\nname = "local"', f'''{sources}[[discovery]]
name = "dir"
plugin = "dir"
dir = "{services_dir}"

[[discovery]]
name = "local"''')
    return text, ports


def test_service_first_asked_for_by_a_request_is_discovered(mesh, backends, tmp_path):
    a = backends("a")
    services = tmp_path / "services"
    services.mkdir()
    (services / "orders").write_text(f"{a.address}\n")
    text, ports = _config(mesh, services)
    m = mesh.start(text, ports, env=_plugin_env(tmp_path))
    # Not in the config and the source lists nothing up front: found on first request.
    status, _, body = http_get("127.0.0.1", ports["outbound"], "/o", {"Host": "orders"})
    assert (status, body) == (200, b"a /o\n")
    # A service no source knows: 503 with the reason, without waiting long.
    status, _, body = http_get("127.0.0.1", ports["outbound"], "/", {"Host": "nosuch"})
    assert status == 503 and b"no discovery source knows it" in body
    _, _, raw = http_get("127.0.0.1", ports["admin"], "/endpoints")
    described = json.loads(raw)["services"]
    assert described["orders"]["on_demand"] is True
    [endpoint] = described["orders"]["endpoints"]
    assert (endpoint["address"], endpoint["weight"], endpoint["state"]) == (a.address, 1, "healthy")
    assert m.log().count("watching orders on demand") == 1


def test_restart_during_outage_routes_from_persisted_endpoints(mesh, backends, tmp_path):
    a = backends("a")
    services = tmp_path / "services"
    services.mkdir()
    (services / "web").write_text(f"{a.address}\n")
    text, ports = _config(mesh, services, extra='[service.web]\ndiscovery = "dir"\n')
    env = _plugin_env(tmp_path)
    m = mesh.start(text, ports, env=env)
    assert http_get("127.0.0.1", ports["outbound"], "/1", {"Host": "web"})[0] == 200
    instance = text.split('instance = "')[1].split('"')[0]
    state_file = tmp_path / "state" / f"{instance}.endpoints"
    wait_for(state_file.exists, what="persisted endpoints")

    # The source goes down while meshd runs: traffic keeps flowing (fail static).
    (services / "web").unlink()
    services.rmdir()
    wait_for(lambda: "is gone" in m.log(), what="the watch error in the log")
    assert http_get("127.0.0.1", ports["outbound"], "/2", {"Host": "web"})[0] == 200

    # Restarted during the outage: it still routes, from the persisted endpoints.
    m.signal(signal.SIGTERM)
    assert m.wait(20) == 0
    m2 = mesh.start(text, ports, env=env)
    assert http_get("127.0.0.1", ports["outbound"], "/3", {"Host": "web"})[:3:2] == (200, b"a /3\n")
    _, _, raw = http_get("127.0.0.1", ports["admin"], "/endpoints")
    src = json.loads(raw)["services"]["web"]["sources"]["dir"]
    assert src["stale"] is True and "is gone" in (src["error"] or "")
    _, _, metrics = http_get("127.0.0.1", ports["admin"], "/metrics")
    assert 'meshd_discovery_stale{service="web",source="dir"} 1' in metrics.decode()

    # The source comes back with another endpoint: updates resume.
    b = backends("b")
    services.mkdir()
    (services / "web").write_text(f"{b.address}\n")
    wait_for(lambda: http_get("127.0.0.1", ports["outbound"], "/4", {"Host": "web"})[2] == b"b /4\n",
             timeout=10, what="traffic on the new endpoint")
    assert m2.proc is not None


def test_check_run_and_reload_agree_on_a_plugin_that_fails_to_import(mesh, backends, tmp_path):
    a = backends("a")
    services = tmp_path / "services"
    services.mkdir()
    broken = '[[discovery]]\nname = "bad"\nplugin = "broken"\n\n'
    text, ports = _config(mesh, services, sources=broken,
                          extra='[service.web]\ndiscovery = "local"\n[service.gone]\ndiscovery = "dir"\n')
    text = text.replace("web = []", f'web = ["{a.address}"]')
    env = _plugin_env(tmp_path)
    path = tmp_path / "broken.toml"
    path.write_text(text)
    problem = ("discovery[0].plugin: discovery plugin 'broken' from distribution broken-plugin "
               "0.0.1 failed to import: RuntimeError: this plugin is broken at import")
    # `meshd check` and `meshd run` refuse it alike: exit 2, the same line.
    for command in ("check", "run"):
        out = subprocess.run([sys.executable, "-m", "meshd", command, "-c", str(path)], env=env,
                             capture_output=True, text=True, timeout=30)
        assert (out.returncode, out.stderr) == (2, f"{path}: {problem}\n"), (command, out)
    # A reload to it is refused too, and the running config keeps serving.
    good = text.replace(broken, "")
    m = mesh.start(good, ports, env=env)
    m.config_path.write_text(text)
    m.signal(signal.SIGHUP)
    wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="failure"') == 1,
             what="the reload counted as failed")
    assert f"reload rejected, the running config stays: {m.config_path}: {problem}" in m.log()
    assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})[0] == 200


def test_watch_that_raises_is_reported_with_its_distribution(mesh, backends, tmp_path):
    a = backends("a")
    services = tmp_path / "missing-dir"  # never created: every watch of this source raises
    text, ports = _config(mesh, services, extra='[service.orders]\ndiscovery = "dir"\n')
    text = text.replace("web = []", f'web = ["{a.address}"]')
    m = mesh.start(text, ports, env=_plugin_env(tmp_path), wait_ready=False)
    wait_for(lambda: "discovery source dir (plugin dir from dir-plugin 0.0.1): watch of orders failed" in m.log(),
             timeout=15, what="the failing watch in the log")
    assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})[0] == 200
    # Failing is not the same as not knowing: the 503 names the source and its error.
    status, headers, body = http_get("127.0.0.1", ports["outbound"], "/", {"Host": "orders"})
    reason = f"discovery source 'dir' failing for service 'orders': OSError: {services} is gone"
    assert status == 503 and reason in body.decode(), body
    assert headers["meshd-error"].startswith("discovery source 'dir' failing for service 'orders'")
    assert b"no discovery source knows it" not in body
    # /ready says what it waits for: the first answer for orders from dir.
    status, _, body = http_get("127.0.0.1", ports["admin"], "/ready")
    assert status == 503
    assert body.startswith(b"not ready, waiting for "), body
    assert b"discovery: first answer for orders (source dir)" in body, body


def test_service_split_across_two_sources_by_share(mesh, backends, tmp_path):
    a, b = backends("a"), backends("b")
    port = free_port()
    text, ports = mesh.config({"old": [a.address]}, extra='''
[service.web]
discovery = [{ source = "local", share = 90 }, { source = "new", share = 10 }]
''', workers=1)
    text = text.replace('old = ["', f'web = ["{a.address}"]\nold = ["')
    text = text.replace("[[listener]]", f'''[[discovery]]
name = "new"
plugin = "static"
[discovery.services]
web = ["{b.address}"]

[[listener]]''', 1)
    del port
    mesh.start(text, ports)
    seen: Counter[str] = Counter()
    for i in range(400):
        _, headers, _ = http_get("127.0.0.1", ports["outbound"], f"/{i}", {"Host": "web"})
        seen[headers["x-backend"]] += 1
    assert 0.85 <= seen["a"] / 400 <= 0.95, seen


def test_ready_waits_until_every_worker_has_loaded_the_first_complete_snapshot(
        mesh, backends, tmp_path):
    """/ready turns 200 only once every serving worker has loaded a snapshot that holds
    every source's first answer: a worker still on an older one (here: stopped) keeps
    it 503, naming why."""
    a = backends("a")
    services = tmp_path / "late"  # not there yet: the first answer for orders is owed
    text, ports = _config(mesh, services, extra='[service.orders]\ndiscovery = "dir"\n')
    text = text.replace("web = []", f'web = ["{a.address}"]')
    text = text.replace('worker_timeout = "5s"', 'worker_timeout = "60s"')  # stopped is fine
    m = mesh.start(text, ports, env=_plugin_env(tmp_path), wait_ready=False)
    def serving() -> bool:
        try:
            return len(m.worker_pids(STATE_SERVING)) == 2
        except ShmError:  # the master has not created the region yet
            return False
    wait_for(serving, timeout=30, what="2 serving workers")
    first = m.wait_snapshot_loaded()  # published without orders' answer
    stopped = m.worker_pids()[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        services.mkdir()
        (services / "orders").write_text(f"{a.address}\n")

        def behind() -> bytes:
            status, _, body = http_get("127.0.0.1", ports["admin"], "/ready")
            assert status == 503, body  # never ready while a worker is behind
            return b"endpoints: 1 worker(s) not yet on snapshot" in body and body
        body = wait_for(behind, timeout=30, what="/ready waiting for the stopped worker")
        assert b"discovery: first answer" not in body, body
        assert m.published_seq() > first
    finally:
        os.kill(stopped, signal.SIGCONT)
    m.wait_ready()
    assert {s.snapshot_seq >= first + 1 for s in m.slots() if s.pid in m.worker_pids()} == {True}
