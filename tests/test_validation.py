"""One validation for `meshd run`, `meshd check` and a reload (HUP), and a master that
never imports ssl: plugins and TLS files are checked in a short-lived child the master
forks (``meshd.validate.load_checked(isolated=True)``), so the gevent children patch
the standard library before anything in their memory imported ssl."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from meshd.master.spawn import MODULES_FILE_ENV
from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import http_get, wait_for


def test_the_master_imports_no_ssl_before_fork(mesh, backends, consul: ConsulServer, tmp_path):
    a = backends("a")
    text, ports = mesh.config({"web": [a.address]}, workers=1, extra=textwrap.dedent(f"""\
        [[discovery]]
        name = "consul"
        plugin = "consul"
        address = "{consul.url}"

        [service.api]
        discovery = "consul"

        [service.secure]
        [service.secure.tls]
        server_name = "secure.example"
        """))
    modules = tmp_path / "master-modules.txt"
    env = dict(os.environ, **{MODULES_FILE_ENV: str(modules)})
    m = mesh.start(text, ports, env=env)
    assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})[0] == 200
    names = modules.read_text().split()
    assert "meshd.master.arbiter" in names   # written by the master, before its first fork
    assert [n for n in names if n == "ssl" or n.startswith(("_ssl", "gevent", "meshd_consul"))] == []
    # A reload checks in a child too: the master still has no ssl when it forks again.
    modules.unlink()
    m.signal(signal.SIGHUP)
    wait_for(lambda: "generation 2 serving" in m.log(), timeout=30, what="the reload served")
    names = modules.read_text().split()
    assert "meshd.master.arbiter" in names
    assert [n for n in names if n == "ssl" or n.startswith(("_ssl", "gevent", "meshd_consul"))] == []


def test_a_reload_to_a_bad_ca_file_is_refused_as_at_start(mesh, backends, tmp_path):
    a = backends("a")
    text, ports = mesh.config({"web": [a.address]}, workers=1)
    m = mesh.start(text, ports)
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n")
    m.config_path.write_text(text + f'\n[service.web.tls]\nca_file = "{bad}"\n')
    m.signal(signal.SIGHUP)
    wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="failure"') == 1,
             what="the reload counted as failed")
    assert f"reload rejected, the running config stays: {m.config_path}: service.web.tls.ca_file" in m.log()
    assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})[0] == 200


def test_a_plugin_option_typo_is_refused_by_check_run_and_reload(mesh, backends, consul: ConsulServer, tmp_path):
    """The consul plugin refuses an unknown key: `meshd check`, `meshd run` and a HUP
    to it all say so, with the same line (the reload's check runs in a child)."""
    a = backends("a")
    good, ports = mesh.config({"web": [a.address]}, workers=1, extra=textwrap.dedent(f"""\
        [[discovery]]
        name = "consul"
        plugin = "consul"
        address = "{consul.url}"
        """))
    bad = good.replace(f'address = "{consul.url}"', f'address = "{consul.url}"\nwiat = "30s"')
    path = tmp_path / "typo.toml"
    path.write_text(bad)
    line = "discovery[1].wiat: unknown key (known: address, ca_file"  # [0]: the static source
    for command in ("check", "run"):
        out = subprocess.run([sys.executable, "-m", "meshd", command, "-c", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and f"{path}: {line}" in out.stderr, (command, out)
    m = mesh.start(good, ports)
    m.config_path.write_text(bad)
    m.signal(signal.SIGHUP)
    wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="failure"') == 1,
             what="the reload counted as failed")
    assert f"reload rejected, the running config stays: {m.config_path}: {line}" in m.log()
    assert "generation 2" not in m.log()
    assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})[0] == 200
