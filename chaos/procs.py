"""The processes of a chaos or soak run, and what reads them: the Consul test server, the
endpoints (``chaos.endpoint``), a TCP echo server, one or two meshds (followed across a
USR2 upgrade through the master pid in their shm region), the worker-of-a-connection
mapper, and /proc readings (RSS, fds).

Everything started here is stopped by pid in ``Topology.stop``; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from chaos.load import Conn
from meshd.shm import KIND_CONTROL, KIND_WORKER, OFF_MASTER_PID
from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import Meshd, free_port, port_open, wait_for
from meshd.testing.tcp_server import TcpServer, echo

META_INBOUND_PORT = "meshd-inbound-port"
ROOT = Path(__file__).resolve().parents[1]   # chaos.endpoint is run from here


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """TERM ``pid`` (a process this run started), KILL it when it has not gone in time."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not alive(pid), timeout, what=f"pid {pid} to exit")
            return


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    """(resident KiB, open fds) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS")), 0)
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


class Endpoint:
    """``chaos.endpoint`` in its own process, restartable on its port."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name, self.port = name, free_port()
        self.posts = workdir / f"{name}.posts"
        self.posts.unlink(missing_ok=True)   # this run's POSTs only (restarts append)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Endpoint:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chaos.endpoint", "--listen", self.address, "--name",
             self.name, "--posts", str(self.posts)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        wait_for(lambda: port_open("127.0.0.1", self.port), 20, what=f"endpoint {self.name}")
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def control(self, path: str) -> None:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            conn.getresponse().read()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Mesh:
    """One meshd, followed across USR2 (the master pid in its region)."""

    def __init__(self, name: str, meshd: Meshd, admin_port: int) -> None:
        self.name, self.meshd, self.admin_port = name, meshd, admin_port
        self.masters: list[int] = []

    def master(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            with self.meshd.region() as r:
                pid = r.get_u32(OFF_MASTER_PID)
            if pid and pid not in self.masters:
                self.masters.append(pid)
        return self.masters[-1] if self.masters else 0

    def slots(self) -> list[tuple[int, int, int]]:
        """(pid, kind, state) of the processes its region lists now."""
        try:
            return [(s.pid, s.kind, s.state) for s in self.meshd.slots()]
        except (OSError, ValueError):
            return []

    def workers(self) -> list[int]:
        return sorted(p for p, kind, _ in self.slots() if kind == KIND_WORKER and alive(p))

    def controls(self) -> list[int]:
        return sorted(p for p, kind, _ in self.slots() if kind == KIND_CONTROL and alive(p))

    def processes(self) -> dict[int, str]:
        """pid -> role ("master", "control", "worker") of its live processes."""
        out = {self.master(): "master"}
        for pid, kind, _ in self.slots():
            if alive(pid):
                out[pid] = "worker" if kind == KIND_WORKER else "control"
        return out

    def stop(self) -> None:
        self.meshd.stop()
        for pid in self.masters:
            if alive(pid):
                stop_pid(pid)


class Topology:
    """Consul test server, 3 endpoints (1 in two-meshd mode), a TCP echo server, and meshd
    A (clients' side) -- plus inbound meshd B in front of the endpoint in "two" mode."""

    def __init__(self, topology: str = "one", workers: int = 2, idle_timeout: str = "5s",
                 workdir: Path | None = None, worker_timeout: str = "10s") -> None:
        assert topology in ("one", "two"), topology
        self.topology = topology
        self.workers = workers
        self.idle_timeout = idle_timeout
        # Boots are judged by worker_timeout too: on a loaded machine (2 CPUs, many
        # sessions) a 5 s one ABRTed booting workers in a loop for 30 s.
        self.worker_timeout = worker_timeout
        self.run_dir = Path(tempfile.mkdtemp(prefix="meshd-c-"))   # short: unix sockets
        self.workdir = workdir or self.run_dir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.consul = ConsulServer()
        self.endpoints: list[Endpoint] = []
        self.echo: TcpServer | None = None
        self.ws: WsEcho | None = None
        self.meshes: dict[str, Mesh] = {}
        self.http_port = self.tcp_port = 0
        self.inbound_port = 0

    @property
    def a(self) -> Mesh:
        return self.meshes["a"]

    @property
    def target(self) -> Mesh:
        """The meshd the faults go to: B (inbound) with two meshds, else A."""
        return self.meshes.get("b") or self.meshes["a"]

    def start(self) -> Topology:
        self.consul.start()
        n = 3 if self.topology == "one" else 1
        self.endpoints = [Endpoint(f"e{i + 1}", self.workdir).start() for i in range(n)]
        self.echo = TcpServer(echo, backlog=256)
        meta: dict[str, str] = {}
        if self.topology == "two":
            self.inbound_port = free_port()
            self.meshes["b"] = self._start_mesh("b", self._inbound_config())
            meta = {META_INBOUND_PORT: str(self.inbound_port)}
        for ep in self.endpoints:
            self.consul.register("web", ep.port, address="127.0.0.1", meta=meta, id=ep.name)
        self.consul.register("echo", self.echo.port, address="127.0.0.1", meta=meta, id="echo")
        # WebSocket clients reach the echo server directly from A, even with two meshds
        # (no inbound meshd in front of it: the hop between meshds is HTTP/2).
        self.ws = WsEcho().start()
        self.consul.register("ws", self.ws.port, address="127.0.0.1", id="ws")
        self.http_port, self.tcp_port = free_port(), free_port()
        self.meshes["a"] = self._start_mesh("a", self._outbound_config())
        return self

    def _common(self, name: str, admin: int) -> str:
        return textwrap.dedent(f"""\
            workers = {self.workers}
            drain_timeout = "5s"
            worker_timeout = "{self.worker_timeout}"
            instance = "chaos-{os.getpid()}-{name}"
            state_dir = "{self.run_dir}/state-{name}"
            shm_dir = "{self.run_dir}/shm-{name}"
            [admin]
            listen = "127.0.0.1:{admin}"
            """)

    def _outbound_config(self) -> str:
        return textwrap.dedent(f"""\
            [[discovery]]
            name = "consul"
            plugin = "consul"
            address = "{self.consul.url}"
            wait = "30s"

            [[listener]]
            name = "outbound"
            listen = "127.0.0.1:{self.http_port}"
            direction = "outbound"
            protocol = "auto"

            [[listener]]
            name = "echo"
            listen = "127.0.0.1:{self.tcp_port}"
            protocol = "tcp"
            service = "echo"

            [service.web]
            discovery = "consul"
            timeout = "10s"
            try_timeout = "3s"
            retries = 2
            idle_timeout = "{self.idle_timeout}"

            [service.echo]
            discovery = "consul"
            idle_timeout = "{self.idle_timeout}"

            [service.ws]
            discovery = "consul"
            idle_timeout = "{self.idle_timeout}"
            """)

    def _inbound_config(self) -> str:
        assert self.echo is not None
        return textwrap.dedent(f"""\
            [[discovery]]
            name = "local"
            plugin = "static"
            [discovery.services]

            [[listener]]
            name = "inbound"
            listen = "127.0.0.1:{self.inbound_port}"
            direction = "inbound"
            protocol = "auto"
            forward = "{self.endpoints[0].address}"
            tunnel_ports = [{self.echo.port}]
            """)

    def _start_mesh(self, name: str, body: str) -> Mesh:
        admin = free_port()
        path = self.workdir / f"meshd-{name}.toml"
        path.write_text(self._common(name, admin) + "\n" + body)
        meshd = Meshd(path, self.workdir / f"meshd-{name}.log", admin=f"127.0.0.1:{admin}")
        mesh = Mesh(name, meshd, admin)
        self.meshes[name] = mesh
        meshd.start(wait_ready=False)
        mesh.masters.append(meshd.pid)
        meshd.wait_ready(60)
        return mesh

    def stop(self) -> None:
        for mesh in self.meshes.values():
            with contextlib.suppress(Exception):
                mesh.stop()
        for ep in self.endpoints:
            ep.stop()
        if self.echo is not None:
            self.echo.close()
        if self.ws is not None:
            self.ws.stop()
        self.consul.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)   # shm, state (logs are in workdir)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WsEcho:
    """A WebSocket echo server (the websockets library, threads) on a free port."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        def echo(ws: object) -> None:
            for message in ws:  # type: ignore[attr-defined]
                ws.send(message)  # type: ignore[attr-defined]
        self.server = serve(echo, "127.0.0.1", 0)
        self.port = int(self.server.socket.getsockname()[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="ws-echo")

    def start(self) -> WsEcho:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(5)


class WorkerMapper:
    """Which worker of ``mesh`` accepted each client connection: every ``interval`` s,
    the sockets of each worker (their inodes in /proc/PID/fd) are matched against
    /proc/net/tcp, and a connection whose client port a worker holds on the listening
    port gets that worker's pid. ``refresh()`` maps now (before a fault is injected)."""

    def __init__(self, mesh: Mesh, listen_ports: set[int],
                 pending: Callable[[], list[Conn]], interval: float = 0.1) -> None:
        self.mesh, self.listen_ports, self.pending = mesh, listen_ports, pending
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mapper")
        self._lock = threading.Lock()

    def start(self) -> WorkerMapper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        with self._lock:
            conns = self.pending()
            if not conns:
                return
            owner: dict[int, int] = {}
            inode_pid: dict[str, int] = {}
            for pid in self.mesh.workers():
                with contextlib.suppress(OSError):
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        with contextlib.suppress(OSError):
                            target = os.readlink(f"/proc/{pid}/fd/{fd}")
                            if target.startswith("socket:["):
                                inode_pid[target[8:-1]] = pid
            with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    owner_pid = inode_pid.get(parts[9])
                    if owner_pid and int(parts[1].split(":")[1], 16) in self.listen_ports:
                        owner[int(parts[2].split(":")[1], 16)] = owner_pid
            for c in conns:
                if c.local_port in owner:
                    c.worker = owner[c.local_port]


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False
