"""The Vagrant lab without VMs: `vagrant validate --ignore-provider` on the Vagrantfile, the
provisioning scripts run against temporary roots, and what they write run for real on
loopback: two "VMs" (meshd with the lab config and its identity from the shared lab CA,
the demo app, the service registered as the VM's Consul agent registers it) against a
Consul API test server; traffic between them is mTLS and moves to app1 when app2 goes
away."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import Backend, Meshd, free_port, http_get, require_tool, wait_for

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "deploy" / "vagrant"
CONSUL_IP = "192.168.56.10"
APPS = {"app1": "192.168.56.11", "app2": "192.168.56.12"}
LAB_IDENTITY = "spiffe://lab.meshd/service/demo"


def provision(script: str, root: Path, *args: str) -> None:
    """Run a provisioning script; the app VMs of one test share one lab CA (beside
    their roots), made with this checkout's meshd."""
    env = dict(os.environ, LAB_CA=str(root.parent / "lab-ca"), MESHD=f"{sys.executable} -m meshd")
    out = subprocess.run(["sh", str(LAB / script), str(root), *args], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


def lab_ca_here(text: str, root: Path) -> str:
    """The lab config with the CA directory of the VM's root instead of /etc/meshd/ca."""
    assert 'dir = "/etc/meshd/ca"' in text
    return text.replace('dir = "/etc/meshd/ca"', f'dir = "{root}/etc/meshd/ca"')


@pytest.mark.usefixtures("needs_vagrant")
def test_vagrantfile_validates(tmp_path: Path) -> None:
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant.d"), VAGRANT_CHECKPOINT_DISABLE="1",
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"))   # not .vagrant/ in the tree
    out = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vagrantfile validated successfully" in out.stdout
    # The machines and addresses the scripts are given are the ones this test uses.
    text = (ROOT / "Vagrantfile").read_text()
    assert f'CONSUL_IP = "{CONSUL_IP}"' in text
    assert all(f'"{name}" => "{ip}"' in text for name, ip in APPS.items())


def test_provisioning_writes_checked_config_and_units(tmp_path: Path) -> None:
    provision("consul.sh", tmp_path / "consul", CONSUL_IP)
    hcl = (tmp_path / "consul/etc/consul.d/consul.hcl").read_text()
    assert "server = true" in hcl and f'bind_addr = "{CONSUL_IP}"' in hcl
    provision("app.sh", tmp_path / "app1", "app1", APPS["app1"], CONSUL_IP)
    app = tmp_path / "app1"
    assert f'retry_join = ["{CONSUL_IP}"]' in (app / "etc/consul.d/consul.hcl").read_text()

    # meshd accepts its config (the consul plugin validating its keys, the meshd-ca
    # provider its CA directory: 0700, the key 0600, the same lab CA on every VM)...
    config = app / "etc/meshd/meshd.toml"
    here = tmp_path / "app1.toml"
    here.write_text(lab_ca_here(config.read_text(), app))
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(here)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ca = app / "etc/meshd/ca"
    assert [(p.name, stat.S_IMODE(p.stat().st_mode)) for p in (ca, *sorted(ca.iterdir()))] == [
        ("ca", 0o700), ("ca.crt", 0o644), ("ca.key", 0o600)]
    provision("app.sh", tmp_path / "app2", "app2", APPS["app2"], CONSUL_IP)
    assert (tmp_path / "app2/etc/meshd/ca/ca.key").read_bytes() == (ca / "ca.key").read_bytes()
    dropin = (app / "etc/systemd/system/meshd.service.d/lab-identity.conf").read_text()
    assert "DynamicUser=no" in dropin and "User=meshd" in dropin
    # ...and the service Consul registers points peers at its inbound listener.
    svc = json.loads((app / "etc/consul.d/demo.json").read_text())["service"]
    listeners = {lst["name"]: lst for lst in tomllib.loads(config.read_text())["listener"]}
    assert (svc["name"], svc["address"]) == ("demo", APPS["app1"])
    assert svc["meta"]["meshd-identity"] == LAB_IDENTITY
    assert listeners["inbound"]["listen"] == f"0.0.0.0:{svc['meta']['meshd-inbound-port']}"
    assert listeners["inbound"]["forward"] == f"127.0.0.1:{svc['port']}"
    assert svc["check"]["http"] == f"http://127.0.0.1:{svc['port']}/health"

    require_tool("systemd-analyze")
    units = sorted((app / "etc/systemd/system").glob("*.service"))
    assert [u.name for u in units] == ["consul.service", "demo-app.service", "lab-traffic.service"]
    out = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                         text=True, timeout=120)
    # What only exists on the VM (the consul binary, /opt/meshd from make install) is
    # missing here; nothing else may be wrong.
    problems = [line for line in out.stderr.splitlines() if not re.fullmatch(
        r"\S+\.service: Command (/usr/local/bin/consul|/opt/meshd/bin/python) is not "
        r"executable: No such file or directory", line)]
    assert problems == [], out.stderr


def _lab_vm(root: Path, name: str, consul: ConsulServer, tmp_path: Path) -> tuple[Meshd, Backend, dict[str, int]]:
    """One application VM of the lab, on loopback: its demo app, its meshd with the lab
    config (ports moved off the fixed ones, the agent's address the test server's), and
    its demo service registered as its Consul agent would from demo.json."""
    provision("app.sh", root, name, APPS[name], CONSUL_IP)
    app = Backend(name).start()
    ports = {"outbound": free_port(), "inbound": free_port(), "admin": free_port()}
    text = (root / "etc/meshd/meshd.toml").read_text()
    moves = {"127.0.0.1:4140": f"127.0.0.1:{ports['outbound']}",
             "0.0.0.0:4143": f"127.0.0.1:{ports['inbound']}",
             "127.0.0.1:4191": f"127.0.0.1:{ports['admin']}",
             "http://127.0.0.1:8500": consul.url,
             "127.0.0.1:8080": app.address,
             "workers = 2": "workers = 1"}
    for old in moves:
        assert old in text
    # One pass: a port put in by one move (41911) must not be rewritten by a later one
    # (127.0.0.1:4191 -> a port and a stray "1").
    text = re.sub("|".join(re.escape(old) + r"(?!\d)" for old in moves),
                  lambda m: moves[m.group(0)], text)
    text = lab_ca_here(text, root)
    instance = f"lab-{name}-{tmp_path.name[-16:]}"
    config = tmp_path / f"{name}.toml"
    config.write_text(f'state_dir = "{tmp_path}/{name}-state"\ninstance = "{instance}"\n' + text)
    svc = json.loads((root / "etc/consul.d/demo.json").read_text())["service"]
    consul.register(svc["name"], app.port, id=svc["id"], address="127.0.0.1", node=name,
                    meta={**svc["meta"], "meshd-inbound-port": str(ports["inbound"])})
    m = Meshd(config, tmp_path / f"{name}.log", admin=f"127.0.0.1:{ports['admin']}",
              instance=instance).start()
    return m, app, ports


def test_lab_traffic_moves_when_an_app_vm_stops(tmp_path: Path) -> None:
    consul = ConsulServer().start()
    started: list[Meshd | Backend] = []
    try:
        m1, app1, ports1 = _lab_vm(tmp_path / "app1", "app1", consul, tmp_path)
        started += [m1, app1]
        m2, app2, ports2 = _lab_vm(tmp_path / "app2", "app2", consul, tmp_path)
        started += [m2, app2]

        def call() -> tuple[int, str | None]:
            status, headers, _ = http_get("127.0.0.1", ports1["outbound"], "/lab", {"Host": "demo"})
            return status, headers.get("x-backend")

        # app1's traffic loop reaches both VMs' demo apps, through app2's meshd too.
        seen: set[str | None] = set()

        def both() -> bool:
            seen.add(call()[1])
            return seen >= {"app1", "app2"}
        wait_for(both, timeout=20, what="answers from both app VMs")
        assert m2.metric("request_total", 'direction="inbound"') >= 1
        # Both meshds carry the lab identity, from the one lab CA, and the hop between
        # them is mTLS: the endpoints' identity comes from the Consul meta.
        for ports in (ports1, ports2):
            status, _, body = http_get("127.0.0.1", ports["admin"], "/identity")
            assert status == 200 and json.loads(body)["local_id"] == LAB_IDENTITY, body
        tls = 'listener="{}",direction="{}",result="{}"'.format
        assert m1.metric("meshd_tls_handshake_total", tls("outbound", "outbound", "ok")) >= 1
        assert m2.metric("meshd_tls_handshake_total", tls("inbound", "inbound", "ok")) >= 1
        assert m2.metric("meshd_tls_handshake_total",
                         tls("inbound", "inbound", "plaintext_permitted")) == 0

        # `vagrant halt app2`: its agent leaves Consul, its meshd and app stop.
        consul.deregister("demo-app2")
        m2.stop()
        app2.stop()
        wait_for(lambda: all(call() == (200, "app1") for _ in range(10)), timeout=20,
                 what="all traffic on app1")
    finally:
        for proc in reversed(started):
            proc.stop()
        consul.stop()
