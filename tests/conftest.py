"""Fixtures that run real meshd processes and backends on loopback."""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import Backend, Meshd, free_port, require_root, require_tool
from meshd.testing.k8s_server import K8sApiServer


@pytest.fixture
def needs_root() -> None:
    """Tests that play another user, set file attributes or enter namespaces."""
    require_root("another uid, chattr, or a namespace")


@pytest.fixture
def needs_systemd_analyze() -> None:
    require_tool("systemd-analyze")


@pytest.fixture
def needs_strace() -> None:
    require_tool("strace")


@pytest.fixture
def needs_vagrant() -> None:
    require_tool("vagrant")


@pytest.fixture
def backends() -> Iterator[Callable[..., Backend]]:
    started: list[Backend] = []

    def start(name: str = "a", port: int | None = None, host: str = "127.0.0.1",
              tls: tuple[str, str] | None = None) -> Backend:
        b = Backend(name, port, host, tls).start()
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


class MeshFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Meshd] = []
        self.count = 0
        # Each test's own shm_dir (meshd creates it, 0700), never /run/meshd. Short, for
        # the unix socket paths in it (108 bytes at most); tmp_path is too long for that.
        self.run_dir = Path(tempfile.mkdtemp(prefix="meshd-t-"))
        self.shm_dir = self.run_dir / "shm"

    def config(self, services: dict[str, list[str]], *, workers: int = 2, extra: str = "",
               listeners: str | None = None, top: str = "") -> tuple[str, dict[str, int]]:
        """A config text and its ports: outbound (HTTP), admin, plus whatever `listeners` adds."""
        self.count += 1
        ports = {"outbound": free_port(), "admin": free_port()}
        svc = "\n".join(f'{name} = [{", ".join(repr(a) for a in addrs)}]'.replace("'", '"')
                        for name, addrs in services.items())
        text = textwrap.dedent(f"""\
            workers = {workers}
            drain_timeout = "10s"
            worker_timeout = "5s"
            instance = "test-{self.tmp_path.name[-20:]}-{self.count}"
            state_dir = "{self.tmp_path}/state"
            shm_dir = "{self.shm_dir}"
            {top}
            [admin]
            listen = "127.0.0.1:{ports['admin']}"

            [[discovery]]
            name = "local"
            plugin = "static"
            [discovery.services]
            """) + svc + textwrap.dedent(f"""

            [[listener]]
            name = "outbound"
            listen = "127.0.0.1:{ports['outbound']}"
            direction = "outbound"
            protocol = "http"
            """) + (listeners or "") + "\n" + extra
        return text, ports

    def start(self, text: str, ports: dict[str, int], *, wait_ready: bool = True,
              **kwargs: object) -> Meshd:
        path = self.tmp_path / f"meshd-{self.count}.toml"
        path.write_text(text)
        m = Meshd(path, self.tmp_path / f"meshd-{self.count}.log", admin=f"127.0.0.1:{ports['admin']}",
                  **kwargs)  # type: ignore[arg-type]
        m.ports = ports  # type: ignore[attr-defined]
        self.started.append(m)
        return m.start(wait_ready=wait_ready)

    def run(self, services: dict[str, list[str]], **kwargs: object) -> Meshd:
        start_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in ("env", "args", "wait_ready")}
        text, ports = self.config(services, **kwargs)  # type: ignore[arg-type]
        return self.start(text, ports, **start_kw)  # type: ignore[arg-type]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[MeshFactory]:
    factory = MeshFactory(tmp_path)
    yield factory
    for m in factory.started:
        m.stop()
    shutil.rmtree(factory.run_dir, ignore_errors=True)


@pytest.fixture
def consul() -> Iterator[ConsulServer]:
    """A Consul HTTP API test server on loopback."""
    server = ConsulServer().start()
    yield server
    server.stop()


@pytest.fixture
def api() -> Iterator[K8sApiServer]:
    """A Kubernetes API test server (TLS) on loopback."""
    server = K8sApiServer().start()
    yield server
    server.close()
