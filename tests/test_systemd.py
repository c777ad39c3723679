"""The systemd unit's hardening, checked without a running systemd: the exposure score of
`systemd-analyze security --offline`, ExecReload's check-then-HUP, and a real meshd under
what the sandbox allows (the kernel's refusal of writable+executable memory, the system
calls and address families it uses against SystemCallFilter= and
RestrictAddressFamilies=)."""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meshd.testing.harness import http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "systemd" / "meshd.service"
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
MAX_EXPOSURE = 3.0

needs_analyze = pytest.mark.usefixtures("needs_systemd_analyze")


def unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in SERVICE.read_text().splitlines()
            if line.startswith(key + "=")]


@needs_analyze
def test_security_exposure_at_most_3() -> None:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(SERVICE)],
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for meshd\.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match[1]) <= MAX_EXPOSURE, out.stdout


def test_exec_reload_checks_before_it_signals(mesh, backends, tmp_path) -> None:
    """ExecReload= lines run in order as systemd runs them: the first failing one fails the
    reload and the rest are skipped, so a rejected config sends no HUP."""
    commands = unit_values("ExecReload")
    assert [shlex.split(c)[:2] for c in commands] == [["/usr/local/bin/meshd", "check"],
                                                        ["/bin/kill", "-HUP"]]
    a = backends("a")
    m = mesh.run({"web": [a.address]})

    def systemctl_reload() -> int:
        for command in commands:
            argv = [str(m.config_path) if w == "/etc/meshd/meshd.toml" else
                    str(m.pid) if w == "$MAINPID" else w for w in shlex.split(command)]
            if argv[0] == "/usr/local/bin/meshd":
                argv[:1] = [sys.executable, "-m", "meshd"]
            code = subprocess.run(argv, capture_output=True, timeout=60).returncode
            if code:
                return code
        return 0

    good = m.config_path.read_text()
    m.config_path.write_text(good.replace('drain_timeout = "10s"', 'drain_timeout = "ten"'))
    assert systemctl_reload() == 2
    m.config_path.write_text(good)
    assert systemctl_reload() == 0
    # Only the second reload reached meshd: generation 2 serves, nothing was rejected.
    wait_for(lambda: "generation 2 serving" in m.log(), timeout=30, what="the reload")
    assert "reload rejected" not in m.log()
    assert http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})[0] == 200


def _refuse_write_execute() -> None:
    """What MemoryDenyWriteExecute=yes asks of the kernel, for this process and its
    children: no mapping both writable and executable, none made executable later."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _mdwe_supported() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, "
                            "prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"],
                           preexec_fn=_refuse_write_execute, capture_output=True, text=True)
    # The probe must fail: proof that the prctl is in force for what meshd runs below.
    return probe.returncode != 0 and "PermissionError" in probe.stderr


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_gevent_serves_without_writable_executable_memory(mesh, backends) -> None:
    a = backends("a")
    text, ports = mesh.config({"web": [a.address]})
    m = mesh.start(text, ports, preexec_fn=_refuse_write_execute)
    assert http_get("127.0.0.1", m.ports["outbound"], "/h1", {"Host": "web"})[:3:2] == (200, b"a /h1\n")
    h2 = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-H", "Host: web",
                         f"http://127.0.0.1:{m.ports['outbound']}/h2"],
                        capture_output=True, text=True, timeout=30)
    assert h2.stdout == "a /h2\n", h2
    m.signal(signal.SIGHUP)   # a new generation boots under it too
    wait_for(lambda: "generation 2 serving" in m.log(), timeout=30, what="the reload")
    assert http_get("127.0.0.1", m.ports["outbound"], "/h1", {"Host": "web"})[0] == 200


def _syscall_set(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd filter group, nested groups expanded."""
    seen = set() if seen is None else seen
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", group],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("@"):
            if word not in seen:
                seen.add(word)
                calls |= _syscall_set(word, seen)
        else:
            calls.add(word)
    return calls


@needs_analyze
@pytest.mark.usefixtures("needs_strace")
@pytest.mark.timeout(400)   # everything runs traced, several times slower
def test_syscalls_and_address_families_stay_within_the_unit_filters(mesh, backends, tmp_path) -> None:
    [allow] = [v for v in unit_values("SystemCallFilter") if not v.startswith("~")]
    [deny] = [v[1:] for v in unit_values("SystemCallFilter") if v.startswith("~")]
    allowed = set().union(*(_syscall_set(g) for g in allow.split()))
    allowed -= set().union(*(_syscall_set(g) for g in deny.split()))
    [families] = unit_values("RestrictAddressFamilies")

    a = backends("a")
    trace = tmp_path / "strace.out"
    text, ports = mesh.config({"web": [a.address]})
    config = tmp_path / "traced.toml"
    config.write_text(text)
    log = tmp_path / "meshd.log"
    with open(log, "wb") as out:
        traced = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "meshd", "run", "-c",
             str(config)], stdout=out, stderr=out)
    try:
        def ready() -> bool:
            assert traced.poll() is None, "meshd under strace exited"
            try:
                return http_get("127.0.0.1", ports["admin"], "/ready", timeout=2)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout=90, what="meshd under strace")
        for path in ("/a", "/b"):
            assert http_get("127.0.0.1", ports["outbound"], path, {"Host": "web"}, timeout=20)[0] == 200
        assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "nosuch"}, timeout=20)[0] == 503
        master = int(trace.read_text(errors="replace").split(None, 1)[0])  # strace's child
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: "generation 2 serving" in log.read_text(), timeout=90,
                 what="the reload under strace")
        assert http_get("127.0.0.1", ports["outbound"], "/c", {"Host": "web"}, timeout=20)[0] == 200
        os.kill(master, signal.SIGTERM)
        assert traced.wait(90) == 0
    finally:
        if traced.poll() is None:
            traced.kill()
            traced.wait(10)
    used: set[str] = set()
    used_families: set[str] = set()
    for line in trace.read_text(errors="replace").splitlines():
        found = re.match(r"\d+\s+(?:<\.\.\. )?([a-z0-9_]+)\(", line)
        if found:
            used.add(found[1])
        fam = re.match(r"\d+\s+socket\((AF_[A-Z0-9]+)", line)
        if fam:
            used_families.add(fam[1])
    assert used, "strace recorded nothing"
    assert used - allowed == set(), f"system calls the unit's filter refuses: {sorted(used - allowed)}"
    assert used_families <= set(families.split()), used_families
