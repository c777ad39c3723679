"""`make install DESTDIR=...` as a packager runs it: wheels built from the tree, installed
(not editable) into a fresh venv at PREFIX, the command linked, the units and the example
config in place. Then, with the staged tree mounted where it will live (a private mount
namespace: /opt and /usr/local/bin seen by this test's commands only), the installed
meshd serves a real request, and `systemd-analyze verify` accepts the installed units."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from meshd.testing.harness import Backend, free_port, http_get, terminate, wait_for

# The first test also pays for the module's `make install` (wheels, a venv, dependencies
# from the package index, pip's cache warm or not): more than the suite's 120 s default.
pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/meshd"
ENV = {k: v for k, v in os.environ.items()
       if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "JOURNAL_STREAM")}


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture
def namespace_allowed(needs_root: None, needs_systemd_analyze: None) -> None:
    assert _can_unshare(), "unshare -m is refused: the test needs a private mount namespace"


needs_namespace = pytest.mark.usefixtures("namespace_allowed")


@pytest.fixture(scope="module")
def destdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("destdir")
    out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "install",
                          f"DESTDIR={dest}", f"PREFIX={PREFIX}", f"PYTHON={sys.executable}"],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    return dest


def in_namespace(destdir: Path, argv: list[str]) -> list[str]:
    """``argv`` run with DESTDIR's PREFIX at PREFIX and its /usr/local/bin at /usr/local/bin."""
    script = (f"mount --make-rprivate / && mount -t tmpfs tmpfs /opt && mkdir {PREFIX} && "
              f"mount --bind '{destdir}{PREFIX}' {PREFIX} && "
              f"mount --bind '{destdir}/usr/local/bin' /usr/local/bin && exec \"$@\"")
    return ["unshare", "-m", "sh", "-c", script, "sh", *argv]


def site_packages(destdir: Path) -> Path:
    [sp] = (destdir / PREFIX.lstrip("/")).glob("lib/python3*/site-packages")
    return sp


def test_every_package_directory_is_in_the_wheel(destdir: Path) -> None:
    installed = site_packages(destdir) / "meshd"
    for d in sorted((ROOT / "meshd").rglob("*")):
        if not d.is_dir() or d.name == "__pycache__" or not any(d.glob("*.py")):
            continue
        rel = d.relative_to(ROOT / "meshd")
        assert (installed / rel / "__init__.py").is_file(), f"meshd/{rel} is not a package in the wheel"
        for py in d.glob("*.py"):
            assert (installed / rel / py.name).is_file(), f"meshd/{rel}/{py.name} not installed"


def test_the_layout_and_no_staging_path_in_any_file(destdir: Path) -> None:
    assert os.readlink(destdir / "usr/local/bin/meshd") == f"{PREFIX}/bin/meshd"
    assert (destdir / PREFIX.lstrip("/") / "bin/meshd").read_text().startswith(f"#!{PREFIX}/bin/python")
    assert (destdir / "etc/meshd/meshd.toml").read_bytes() == (ROOT / "config/example.toml").read_bytes()
    for unit in ("meshd.service", "meshd.socket"):
        assert (destdir / "etc/systemd/system" / unit).is_file()
    service = (destdir / "etc/systemd/system/meshd.service").read_text()
    assert f"Documentation=file://{PREFIX}/share/doc/meshd/README.md" in service
    assert (destdir / PREFIX.lstrip("/") / "share/doc/meshd/README.md").is_file()
    # Packagers ship DESTDIR's contents as they are: no file may name it.
    leaks = subprocess.run(["grep", "-rl", str(destdir), str(destdir)], capture_output=True, text=True)
    assert leaks.stdout == "", leaks.stdout[:2000]
    # Its own plugins, installed from wheels too, and nothing imported from this checkout.
    python = destdir / PREFIX.lstrip("/") / "bin/python"
    out = subprocess.run([str(python), "-m", "meshd", "plugins"], capture_output=True, text=True,
                         timeout=60, env=ENV, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.stdout.splitlines()[1:]}
    assert {kind_name: row[0] for kind_name, row in rows.items()} == {
        ("discovery", "consul"): "meshd-consul", ("discovery", "kubernetes"): "meshd-kubernetes",
        ("discovery", "static"): "meshd-static", ("identity", "consul"): "meshd-consul",
        ("identity", "files"): "meshd-proxy", ("identity", "meshd-ca"): "meshd-proxy"}
    assert all(row[-1] == "ok" for row in rows.values()), out.stdout
    where = subprocess.run([str(python), "-c", "import meshd.worker.process, meshd_static; "
                            "print(meshd.__file__, meshd_static.__file__)"],
                           capture_output=True, text=True, timeout=60, env=ENV, cwd="/")
    assert where.returncode == 0, where.stderr
    assert str(ROOT) not in where.stdout and f"{PREFIX}/lib/" in where.stdout.replace(str(destdir), "")


def test_installed_meshd_serves_a_request(destdir: Path, tmp_path: Path) -> None:
    backend = Backend("a").start()
    outbound, admin = free_port(), free_port()
    config = tmp_path / "meshd.toml"
    # Short: the control sockets live in shm_dir (107 bytes a path), and tmp_path is long
    # (under pytest -n it holds the test process's name too).
    run_dir = tempfile.mkdtemp(prefix="meshd-i-")
    config.write_text(textwrap.dedent(f"""\
        workers = 1
        state_dir = "{tmp_path}/state"
        shm_dir = "{run_dir}/shm"
        instance = "install-test"
        [admin]
        listen = "127.0.0.1:{admin}"
        [[discovery]]
        name = "local"
        plugin = "static"
        [discovery.services]
        web = ["{backend.address}"]
        [[listener]]
        name = "outbound"
        listen = "127.0.0.1:{outbound}"
        """))
    log = open(tmp_path / "meshd.log", "wb")
    if _can_unshare():   # the installed command at its final path, as systemd runs it
        argv = in_namespace(destdir, ["/usr/local/bin/meshd", "run", "-c", str(config)])
    else:                # the staged venv in place (its python finds its own site-packages)
        argv = [str(destdir / PREFIX.lstrip("/") / "bin/python"), "-m", "meshd", "run", "-c",
                str(config)]
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=ENV, cwd=str(tmp_path))
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "meshd.log").read_text())
            try:
                return http_get("127.0.0.1", admin, "/ready", timeout=1)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout=60, what="the installed meshd /ready")
        status, headers, body = http_get("127.0.0.1", outbound, "/installed", {"Host": "web"})
        assert (status, headers.get("x-backend"), body) == (200, "a", b"a /installed\n")
        # the dashboard's files are package data: in the wheel, not only in this checkout
        from meshd.control.dashboard import FILES
        for path, (name, _) in FILES.items():
            status, _, body = http_get("127.0.0.1", admin, path)
            assert (status, body) == (200, (ROOT / "meshd/assets/dashboard" / name).read_bytes())
    finally:
        terminate(proc)
        log.close()
        backend.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert proc.returncode == 0, (tmp_path / "meshd.log").read_text()


@needs_namespace
def test_installed_units_pass_systemd_analyze_verify(destdir: Path) -> None:
    units = [str(destdir / "etc/systemd/system" / u) for u in ("meshd.service", "meshd.socket")]
    out = subprocess.run(in_namespace(destdir, ["systemd-analyze", "verify", *units]),
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    # The same units without the install: ExecStart names nothing.
    plain = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True,
                           timeout=120, env=ENV)
    if not Path("/usr/local/bin/meshd").exists():
        assert plain.returncode != 0 and "/usr/local/bin/meshd is not executable" in plain.stderr


def test_installed_config_and_units_agree(destdir: Path) -> None:
    """The installed meshd checks the installed config as ExecStartPre would."""
    python = destdir / PREFIX.lstrip("/") / "bin/python"
    out = subprocess.run([str(python), "-m", "meshd", "check", "-c",
                          str(destdir / "etc/meshd/meshd.toml")],
                         capture_output=True, text=True, timeout=60, env=ENV, cwd="/")
    assert out.returncode == 0, out.stderr
    service = (destdir / "etc/systemd/system/meshd.service").read_text()
    assert "ExecStart=/usr/local/bin/meshd run -c /etc/meshd/meshd.toml" in service
