"""meshd's files are its own (issue 11, item 3): a private 0700 shm_dir and state_dir,
0600 files created exclusively, and nothing read that another user could have planted.

The attacker is the `nobody` user (uid 65534): files it owns are planted by root here and
chowned, as if it had written them into a directory it could write."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MeshFactory

from meshd.discovery.api import Endpoint
from meshd.errors import ConfigError, ShmError
from meshd.private_files import UntrustedFile, prepare_dir, read_trusted, reader_uid, write_atomic
from meshd.shm import Region
from meshd.snapshot import Snapshot, snapshot_path
from meshd.snapshot import read as read_snapshot
from meshd.testing.harness import Backend, Meshd, http_get, immutable, wait_for

NOBODY = 65534
root_only = pytest.mark.usefixtures("needs_root")   # plays another user


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _served_by(m: Meshd) -> str:
    status, headers, _ = http_get("127.0.0.1", m.ports["outbound"], "/",  # type: ignore[attr-defined]
                                  {"Host": "web"})
    return headers.get("x-backend", "") if status == 200 else f"status {status}"


def _hup(m: Meshd) -> None:
    """A reload, once the master counts generation 1 as serving (a HUP before that
    supersedes the booting generation instead)."""
    wait_for(lambda: "generation 1 serving" in m.log(), timeout=20, what="generation 1 serving")
    m.signal(signal.SIGHUP)


# -- a running meshd ------------------------------------------------------------------------

def test_every_file_meshd_keeps_is_private(mesh: MeshFactory, backends: Callable[..., Backend]) -> None:
    """shm_dir and state_dir are 0700; the region, every snapshot, every control socket and
    the state file are 0600 and meshd's own, across a reload."""
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    assert _served_by(m) == "a"
    _hup(m)
    wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="success"') >= 1, timeout=30,
             what="the reload")
    state_dir = mesh.tmp_path / "state"
    wait_for(lambda: any(state_dir.glob("*.endpoints")), timeout=10, what="the state file")

    shm = mesh.shm_dir
    assert _mode(shm) == 0o700 and os.stat(shm).st_uid == os.geteuid()
    names = sorted(os.listdir(shm))
    assert any(n.endswith(".shm") for n in names), names
    assert sum(n.endswith(".snap") for n in names) >= 2, names       # g1 and g2
    assert any(n.endswith(".ctl") for n in names), names
    for name in names:
        st = os.lstat(shm / name)
        assert (name, stat.S_IMODE(st.st_mode)) == (name, 0o600)
        assert st.st_uid == os.geteuid()
    assert _mode(state_dir) == 0o700
    for path in state_dir.iterdir():
        assert (path.name, _mode(path)) == (path.name, 0o600)


def _refused(mesh: MeshFactory, top: str) -> tuple[int, str]:
    """Start meshd with ``top`` lines; its exit code and log."""
    text, ports = mesh.config({"web": ["127.0.0.1:1"]}, top=top)
    text = text.replace(f'shm_dir = "{mesh.shm_dir}"\n', "") if "shm_dir" in top else text
    m = mesh.start(text, ports, wait_ready=False)
    return m.wait(30), m.log()


@root_only
@pytest.mark.parametrize("owner, mode, why", [
    (0, 0o1777, "writable by other users (mode 1777)"),        # /dev/shm, /tmp
    (0, 0o770, "writable by other users (mode 0770)"),
    (NOBODY, 0o700, f"owned by uid {NOBODY}, not meshd's uid 0"),
])
def test_shared_or_foreign_shm_dir_refused(mesh: MeshFactory, owner: int, mode: int, why: str) -> None:
    """A shm_dir someone else can write (or owns) is refused at start: exit 2, a line
    naming the key, never a silent start and never a hang."""
    shm = mesh.run_dir / "planted"
    shm.mkdir()
    os.chown(shm, owner, owner)
    os.chmod(shm, mode)
    code, log = _refused(mesh, f'shm_dir = "{shm}"')
    assert code == 2, log
    assert f"shm_dir: {shm} is {why}" in log, log
    assert os.listdir(shm) == []                       # nothing was created in it


@root_only
def test_foreign_state_dir_refused(mesh: MeshFactory) -> None:
    state = mesh.run_dir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    text, ports = mesh.config({"web": ["127.0.0.1:1"]})
    text = text.replace(f'state_dir = "{mesh.tmp_path}/state"', f'state_dir = "{state}"')
    m = mesh.start(text, ports, wait_ready=False)
    assert m.wait(30) == 2, m.log()
    assert f"state_dir: {state} is owned by uid {NOBODY}" in m.log()


@root_only
def test_planted_snapshot_of_the_next_generation_is_never_used(
        mesh: MeshFactory, backends: Callable[..., Backend]) -> None:
    """The reviewer's attack: another user plants the next generation's snapshot (pointing
    service web at its own backend) where meshd will look after the next HUP, in a way the
    control process cannot replace (in sticky /dev/shm: EPERM; here: chattr +i). The new
    workers refuse it (not meshd's file) and traffic never reaches the planted backend;
    once the file is gone, the reload completes with meshd's own snapshot."""
    a, evil = backends("a"), backends("evil")
    m = mesh.run({"web": [a.address]})
    assert _served_by(m) == "a"
    instance = next(line.split('"')[1] for line in m.config_path.read_text().splitlines()
                    if line.startswith("instance"))
    g1 = read_snapshot(snapshot_path(str(mesh.shm_dir), instance, m.pid, 1))
    planted = Path(snapshot_path(str(mesh.shm_dir), instance, m.pid, 2))
    host, port = evil.address.rsplit(":", 1)
    planted.write_bytes(Snapshot(2, 1, {"web": (Endpoint(host, int(port)),)}, g1.rows,
                                 endpoint_rows=g1.endpoint_rows).encode())
    os.chown(planted, NOBODY, NOBODY)
    os.chmod(planted, 0o644)
    try:
        with immutable(planted):
            _hup(m)
            # Until a new worker refuses the file (or, trusting it, serves from it).
            wait_for(lambda: (f"owned by uid {NOBODY}, not 0; not trusted" in m.log()
                              or _served_by(m) == "evil"), timeout=30,
                     what="a new worker reading the planted snapshot")
            assert [_served_by(m) for _ in range(20)] == ["a"] * 20
        planted.unlink()
        wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="success"') >= 1,
                 timeout=40, what="the reload, with meshd's own snapshot")
        assert [_served_by(m) for _ in range(20)] == ["a"] * 20
    finally:
        with contextlib.suppress(FileNotFoundError):
            subprocess.run(["chattr", "-i", str(planted)], check=False)


@root_only
def test_meshd_stat_reads_only_meshds_files(mesh: MeshFactory, backends: Callable[..., Backend]) -> None:
    """`meshd stat --shm` attaches the region only once it proves to be meshd's: a region
    file swapped for another user's is refused with a clear error, not read."""
    a = backends("a")
    m = mesh.run({"web": [a.address]})
    assert _served_by(m) == "a"
    stat_cmd = [sys.executable, "-m", "meshd", "stat", "--shm", str(m.config_path), "-o", "json"]
    ok = subprocess.run(stat_cmd, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    os.chown(m.shm_path, NOBODY, NOBODY)
    refused = subprocess.run(stat_cmd, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert f"owned by uid {NOBODY}, not 0; not trusted" in refused.stderr
    os.chown(m.shm_path, 0, 0)


# -- the rules, file by file ----------------------------------------------------------------

def test_write_atomic_creates_0600_and_leaves_nothing_behind(tmp_path: Path) -> None:
    old = os.umask(0)       # even with no umask at all
    try:
        write_atomic(str(tmp_path / "f"), b"one")
        write_atomic(str(tmp_path / "f"), b"two")
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["f"] and _mode(tmp_path / "f") == 0o600
    assert read_trusted(str(tmp_path / "f")) == b"two"


def test_read_refuses_links_fifos_and_shared_files(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write_atomic(str(real), b"x")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError):          # ELOOP: a link is never followed
        read_trusted(str(tmp_path / "link"))
    os.mkfifo(tmp_path / "fifo", 0o600)
    started = time.monotonic()
    with pytest.raises(UntrustedFile, match="not a regular file"):
        read_trusted(str(tmp_path / "fifo"))       # and no hang waiting for a writer
    assert time.monotonic() - started < 5
    os.chmod(real, 0o620)
    with pytest.raises(UntrustedFile, match="writable by other users"):
        read_trusted(str(real))
    with pytest.raises(ShmError, match="writable by other users"):
        Region.attach(str(real))


@root_only
def test_foreign_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "meshd-x.shm"
    Region.create(str(path), 2, 4).close()
    Region.attach(str(path)).close()
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ShmError, match=f"owned by uid {NOBODY}"):
        Region.attach(str(path))
    snap = tmp_path / "s.snap"
    snap.write_bytes(Snapshot(1, 1, {}, {}).encode())
    os.chmod(snap, 0o600)
    read_snapshot(str(snap))
    os.chown(snap, NOBODY, NOBODY)
    with pytest.raises(UntrustedFile):
        read_snapshot(str(snap))


def test_prepare_dir(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b"
    assert prepare_dir(str(new), "shm_dir")
    assert _mode(new) == 0o700
    assert prepare_dir(str(new), "shm_dir")            # again: it is ours
    os.chmod(new, 0o707)
    with pytest.raises(ConfigError) as e:
        prepare_dir(str(new), "shm_dir")
    assert e.value.problems[0][0] == "shm_dir"
    with pytest.raises(ConfigError, match="shm_dir: not set"):
        prepare_dir("", "shm_dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        prepare_dir(str(tmp_path / "file"), "state_dir")


@root_only
def test_root_reads_the_files_of_a_service_users_private_dir(tmp_path: Path) -> None:
    """`meshd stat --shm` as root, meshd running as a service user (DynamicUser=): root
    trusts the files of the owner of a shm_dir no one else can write, and only those."""
    shm = tmp_path / "run"
    shm.mkdir(mode=0o700)
    region = shm / "meshd-x.shm"
    Region.create(str(region), 2, 4).close()
    os.chown(shm, NOBODY, NOBODY)
    os.chown(region, NOBODY, NOBODY)
    assert reader_uid(str(shm)) == NOBODY
    Region.attach(str(region), uid=reader_uid(str(shm))).close()
    os.chown(region, 0, 0)                 # not the directory owner's: refused
    with pytest.raises(ShmError, match="not trusted"):
        Region.attach(str(region), uid=reader_uid(str(shm)))
    os.chmod(shm, 0o770)                   # a directory others can write: nothing in it
    with pytest.raises(UntrustedFile, match="writable by other users"):
        reader_uid(str(shm))
