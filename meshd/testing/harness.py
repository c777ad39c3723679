"""Running meshd and backends as real processes on loopback, for tests and the demo.

Everything here is bounded: every wait has a deadline and every process started is
stopped by the object that started it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from meshd import config as config_mod
from meshd.shm import KIND_CONTROL, KIND_WORKER, STATE_SERVING, Region, SlotRecord, region_path

# Ports free_port handed out lately (a test asks for several before binding any: the
# kernel may give the same free port twice). One set per test process, bounded; with
# several test processes at once (pytest -n), also a registry file shared by all of them.
_GIVEN: dict[int, None] = {}
_GIVEN_MAX = 4096


def _below_ephemeral() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by
    default), where bind(port 0) and outgoing connections never land."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (max(1024, low - 12768), max(1025, low - 1))


_UNASSIGNED = _below_ephemeral()
_REGISTRY = os.path.join(os.environ.get("TMPDIR", "/tmp"), "meshd-test-ports")
_REGISTRY_KEEP = 600.0  # seconds a port stays reserved for the process that was given it


def _shared_reserve(candidates: Callable[[], int]) -> int:
    """A port from ``candidates`` that no test process was given in the last
    _REGISTRY_KEEP seconds, recorded in the registry under an exclusive lock."""
    import fcntl
    fd = os.open(_REGISTRY, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+") as f:
            now = time.time()
            recent: dict[int, float] = {}
            for line in f.read().split("\n"):
                port_s, _, when_s = line.partition(" ")
                try:
                    when = float(when_s)
                    if now - when < _REGISTRY_KEEP:
                        recent[int(port_s)] = when
                except ValueError:
                    continue
            port = candidates()
            for _ in range(100):
                if port not in recent:
                    break
                port = candidates()
            recent[port] = now
            f.seek(0)
            f.truncate()
            f.write("".join(f"{p} {w}\n" for p, w in recent.items()))
    finally:
        os.close(fd)  # releases the lock
    return port


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on ``host``, never one this process (or, under pytest -n, another
    test process) was given lately."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def candidate() -> int:
        # Below the kernel's ephemeral range: a port the kernel hands to a socket bound to
        # port 0 (a backend, a client's connection) in this or another test process cannot
        # take it between now and the bind it is meant for.
        low, high = _UNASSIGNED
        port = 0
        for _ in range(200):
            port = random.randint(low, high)
            if port in _GIVEN:
                continue
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            return port
        with socket.socket(family, socket.SOCK_STREAM) as s:  # a crowded range: any free
            s.bind((host, 0))
            return int(s.getsockname()[1])

    port = _shared_reserve(candidate) if os.environ.get("PYTEST_XDIST_WORKER") else candidate()
    _GIVEN[port] = None
    if len(_GIVEN) > _GIVEN_MAX:
        del _GIVEN[next(iter(_GIVEN))]
    return port


def require_tool(name: str) -> str:
    """The path of a command a test drives; an AssertionError (never a skip) when it is
    missing: `make test` installs the tools the suite needs."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (`make test` installs it: make tools)"
    return path


def require_root(why: str) -> None:
    """An AssertionError (never a skip) unless this process is root: CI runs as root."""
    assert os.geteuid() == 0, f"this test needs root ({why}); make test runs as root in CI"


@contextlib.contextmanager
def immutable(path: str | Path) -> Iterator[None]:
    """``chattr +i`` for the block: nothing can be created in, renamed into or written to
    ``path``, not even by root (a real EPERM for the code under test). Needs root."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def read_head(sock: socket.socket, until: bytes = b"\r\n\r\n") -> bytes:
    """Bytes read from ``sock`` until ``until`` is among them, or until EOF (then what
    came so far). Reads in chunks: bytes after the marker may be in the result too."""
    data = b""
    while until not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def tcp_sockets(pid: int) -> list[tuple[int, int, str]]:
    """The IPv4 TCP sockets process ``pid`` holds: (local port, remote port, state as
    /proc/net/tcp writes it: "0A" listening, "01" established)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[9] in inodes:
                found.append((int(parts[1].split(":")[1], 16), int(parts[2].split(":")[1], 16),
                              parts[3]))
    return found


def process_usage(pid: int) -> tuple[float, float]:
    """(resident MiB, CPU seconds used so far) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss_kb = int(next(line for line in f if line.startswith("VmRSS")).split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Backend:
    """The test backend (meshd.testing.backend) in its own process."""

    def __init__(self, name: str, port: int | None = None, host: str = "127.0.0.1",
                 tls: tuple[str, str] | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls  # (certificate file, key file): HTTPS
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Backend:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshd.testing.backend", "--listen", self.address,
             "--name", self.name,
             *(["--tls-cert", self.tls[0], "--tls-key", self.tls[1]] if self.tls else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.host, self.port), what=f"backend {self.name}")
        return self

    def stop(self) -> None:
        terminate(self.proc)


class Meshd:
    """`meshd run` on a config file, stderr captured to a log file."""

    def __init__(self, config_path: Path, log_path: Path, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, admin: str | None = None,
                 shm_dir: str | None = None, instance: str | None = None,
                 preexec_fn: Callable[[], None] | None = None,
                 pass_fds: Sequence[int] = ()) -> None:
        """``shm_dir`` and ``instance`` (where :meth:`region` looks) default to the
        config's, as meshd itself resolves them (with this process's environment)."""
        self.config_path = config_path
        self.log_path = log_path
        self.args = list(args)
        self.env = env
        self.admin = admin
        self._shm_dir = shm_dir
        self._instance = instance
        self.preexec_fn = preexec_fn
        self.pass_fds = tuple(pass_fds)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> Meshd:
        self.shm_path  # noqa: B018 -- resolved now: a test may rewrite the config later
        self._log = open(self.log_path, "ab")
        env = dict(os.environ if self.env is None else self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshd", "run", "-c", str(self.config_path), *self.args],
            stdout=self._log, stderr=self._log, env=env, preexec_fn=self.preexec_fn,
            pass_fds=self.pass_fds,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def shm_path(self) -> str:
        """The region's file: ``{shm_dir}/meshd-{instance}.shm``."""
        if self._shm_dir is None or self._instance is None:
            cfg = config_mod.load(str(self.config_path), self.env)
            self._shm_dir = self._shm_dir or cfg.shm_dir
            self._instance = self._instance or cfg.instance
        return region_path(self._shm_dir, self._instance)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.admin is not None, "wait_ready needs the admin address"
        host, _, port = self.admin.rpartition(":")

        last = b""

        def ready() -> bool:
            nonlocal last
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, last = http_get(host, int(port), "/ready", timeout=1)
            except OSError:
                return False
            return status == 200
        try:
            wait_for(ready, timeout, what="meshd /ready")
        except TimeoutError as e:
            raise TimeoutError(f"{e} (last answer: {last!r})") from None

    def metric(self, name: str, labels: str = "") -> float:
        """The samples of ``name`` on the admin /metrics whose line contains ``labels``,
        summed (0 when there are none)."""
        assert self.admin is not None, "metric needs the admin address"
        host, _, port = self.admin.rpartition(":")
        body = http_get(host, int(port), "/metrics")[2]
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                   if (line.startswith(name + "{") or line.startswith(name + " "))
                   and labels in line)

    def wait_metric(self, name: str, labels: str = "", at_least: float = 1,
                    timeout: float = 20.0) -> float:
        """Wait until :meth:`metric` reaches ``at_least``; return its value. The barrier a
        test takes before asserting that something did NOT happen: e.g. the listener's
        ``tcp_close_total`` counting the client's connection means meshd is done with it."""
        value = 0.0

        def reached() -> bool:
            nonlocal value
            value = self.metric(name, labels)
            return value >= at_least
        wait_for(reached, timeout, what=f"{name}{{{labels}}} >= {at_least} (last {value})")
        return value

    def wait_idle(self, listener: str, timeout: float = 20.0) -> None:
        """Wait until meshd holds no client connection of ``listener`` (its
        ``tcp_open_connections`` is 0): every connection the test closed or meshd closed
        has been handled to the end, whatever it was going to send upstream is sent. The
        barrier before asserting that an upstream saw nothing; the test must have
        closed its own connections to that listener first."""
        wait_for(lambda: self.metric("tcp_open_connections", f'listener="{listener}"') == 0,
                 timeout, what=f"no open client connection on {listener}")

    def published_seq(self) -> int:
        """The seq of the endpoint snapshot the control process published last."""
        assert self.admin is not None, "published_seq needs the admin address"
        host, _, port = self.admin.rpartition(":")
        status, _, body = http_get(host, int(port), "/endpoints")
        assert status == 200, (status, body)
        return int(json.loads(body)["published"]["seq"])

    def wait_snapshot_loaded(self, seq: int | None = None, timeout: float = 20.0) -> int:
        """Wait until every serving worker has loaded snapshot ``seq`` (default: the one
        the control process published last) or a later one; returns that seq. Instead of
        sleeping a few of the workers' snapshot polls."""
        target = self.published_seq() if seq is None else seq

        def loaded() -> bool:
            workers = [s for s in self.slots(KIND_WORKER) if s.state == STATE_SERVING]
            return bool(workers) and all(s.snapshot_seq >= target for s in workers)
        wait_for(loaded, timeout, what=f"every serving worker on snapshot {target}")
        return target

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @contextlib.contextmanager
    def region(self) -> Iterator[Region]:
        r = Region.attach(self.shm_path)
        try:
            yield r
        finally:
            r.close()

    def slots(self, kind: int | None = None) -> list[SlotRecord]:
        """The processes the master's table lists now (of one kind, if given)."""
        with self.region() as r:
            return [s for s in r.slots_in_use() if s.pid > 0 and (kind is None or s.kind == kind)]

    def worker_pids(self, state: int | None = None) -> list[int]:
        return sorted(s.pid for s in self.slots(KIND_WORKER) if state is None or s.state == state)

    def control_pids(self) -> list[int]:
        return sorted(s.pid for s in self.slots(KIND_CONTROL))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


class KeepAliveLoad:
    """N client threads, each with one keep-alive connection, sending GETs in a loop until
    stopped (or ``max_seconds`` pass). A client reconnects only when the server said
    ``Connection: close``; any other error counts as a failure (and which connection
    failed is recorded), so a proxy that drops a kept-alive connection is caught."""

    def __init__(self, host: str, port: int, connections: int, path: str = "/",
                 headers: dict[str, str] | None = None, max_seconds: float = 60.0) -> None:
        self.host, self.port, self.path = host, port, path
        self.headers = headers or {}
        self.connections = connections
        self.max_seconds = max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self.failed_connections: set[int] = set()
        self.reconnects = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> KeepAliveLoad:
        for i in range(self.connections):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, index: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", self.path, headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
                with self._lock:
                    self.ok += 1
                if resp.will_close:
                    with self._lock:
                        self.reconnects += 1
            except Exception as e:
                with self._lock:
                    self.failures.append(f"conn {index}: {type(e).__name__}: {e}")
                    self.failed_connections.add(index)
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                time.sleep(0.01)
        conn.close()

    def stop(self) -> KeepAliveLoad:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        return self


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """TERM a child process this test started, KILL it when it has not gone in 5 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
