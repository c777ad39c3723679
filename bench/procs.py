"""The processes under test and what measures them: /proc CPU ticks, nginx configs
(backend, proxy, balancing), meshd, the slow backend, ports and tools."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common import BODY, H2_KEEPALIVE, RESULTS, ROOT, BenchError
from meshd.testing.harness import Meshd, free_port, http_get, port_open, wait_for

# -- /proc --------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the parenthesised comm), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants now, found through the ppid of every process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def own_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime + stime of each of ``pids`` alone (not its children)."""
    ticks = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_ticks(root: int) -> int:
    """utime + stime (fields 14 and 15, clock ticks) summed over ``root``'s process tree."""
    return sum(own_ticks(process_tree(root)).values())


# -- the processes under test --------------------------------------------------------------

class Nginx:
    """nginx in the foreground (``daemon off``) on a config generated into its own dir."""

    def __init__(self, name: str, workdir: Path, port: int, workers: int, http_block: str,
                 top: str = "", stream_block: str = "") -> None:
        """``top``: main-context lines (``load_module``); ``stream_block``: a ``stream {}``
        context's lines (TCP proxying), when given."""
        self.name, self.port = name, port
        self.dir = workdir / name
        self.dir.mkdir()
        temp_paths = "".join(f"  {kind}_temp_path {self.dir}/{kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        stream = f"stream {{\n{stream_block}}}\n" if stream_block else ""
        (self.dir / "nginx.conf").write_text(
            f"{top}daemon off;\nmaster_process on;\nworker_processes {workers};\n"
            f"error_log {self.dir}/error.log;\npid {self.dir}/nginx.pid;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n{temp_paths}{http_block}}}\n{stream}")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Nginx:
        out = open(self.dir / "stderr.log", "wb")
        with out:
            try:
                self.proc = subprocess.Popen(
                    ["nginx", "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                     "-c", str(self.dir / "nginx.conf")],
                    stdout=out, stderr=out, start_new_session=True)
            except OSError as e:
                raise BenchError(f"{self.name}: cannot start nginx: {e}") from None

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.dir / "stderr.log").read_text() + (self.dir / "error.log").read_text()
                raise BenchError(f"{self.name}: nginx exited with {self.proc.returncode}:\n{log}")
            return port_open("127.0.0.1", self.port)
        wait_for(up, 10, what=f"{self.name} on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL):
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue


def backend_nginx(workdir: Path, port: int, more_ports: Sequence[int] = (),
                  counted: dict[int, Path] | None = None, h2_ports: Sequence[int] = ()) -> Nginx:
    """One nginx worker answering BODY on ``port`` and on each of ``more_ports``; the ports
    in ``counted`` also log every request as one 2-byte line into the given file; the
    ``h2_ports`` answer BODY over HTTP/2 with prior knowledge (h2c, no TLS)."""
    body = BODY.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    counted = counted or {}
    servers = []
    for p in dict.fromkeys((port, *more_ports, *counted)):
        log = f"    access_log {counted[p]} count;\n" if p in counted else ""
        servers.append(f"  server {{\n    listen 127.0.0.1:{p};\n{log}"
                       f'    location / {{ default_type text/plain; return 200 "{body}"; }}\n  }}\n')
    for p in h2_ports:
        servers.append(f"  server {{\n    listen 127.0.0.1:{p} http2;\n{H2_KEEPALIVE}"
                       f'    location / {{ default_type text/plain; return 200 "{body}"; }}\n  }}\n')
    return Nginx("backend", workdir, port, 1,
                 "  log_format count \"x\";\n" + "".join(servers))


def proxy_nginx(workdir: Path, port: int, backend_port: int, h2: bool = False) -> Nginx:
    """nginx (2 workers, upstream keepalive) in front of ``backend_port`` (HTTP/1.1); with
    ``h2`` its listener speaks HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1."""
    listen = f"127.0.0.1:{port} http2;\n{H2_KEEPALIVE}" if h2 else f"127.0.0.1:{port};\n"
    return Nginx("nginx-h2" if h2 else "nginx", workdir, port, 2, (
        f"  upstream u {{ server 127.0.0.1:{backend_port}; keepalive 64; }}\n"
        f"  server {{\n    listen {listen}    location / {{\n"
        f"      proxy_pass http://u;\n      proxy_http_version 1.1;\n"
        f'      proxy_set_header Connection "";\n    }}\n  }}\n'))


def balancing_nginx(name: str, workdir: Path, port: int, backend_ports: list[int],
                    method: str) -> Nginx:
    """nginx (2 workers) balancing over ``backend_ports`` with ``method`` ("" is round
    robin, or "least_conn"); the zone makes both methods' state shared by the workers."""
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in backend_ports)
    method_line = f"    {method};\n" if method else ""
    return Nginx(name, workdir, port, 2, (
        f"  upstream u {{\n{method_line}    zone u 64k;\n{servers}    keepalive 64;\n  }}\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n"
        f"      proxy_pass http://u;\n      proxy_http_version 1.1;\n"
        f'      proxy_set_header Connection "";\n    }}\n  }}\n'))


def start_meshd(workdir: Path, workers: int, port: int, backend_ports: int | list[int],
                name: str | None = None, policy: str = "", services: str = "",
                listeners: str | None = None, extra: str = "") -> Meshd:
    """meshd with ``workers`` workers, one outbound HTTP listener on ``port`` and service
    ``bench`` on ``backend_ports`` (static discovery) with ``policy`` lines added to its
    [service.bench] table; its log is bench-results/meshd-NAME.log (NAME: e.g. ``2w``).
    ``services``: more lines for [discovery.services]; ``listeners``: [[listener]] tables
    that replace the outbound one; ``extra``: more tables (e.g. [identity])."""
    name = name or f"{workers}w"
    ports = [backend_ports] if isinstance(backend_ports, int) else backend_ports
    endpoints = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    instance = f"bench-{os.getpid()}-{name}"
    admin = f"127.0.0.1:{free_port()}"
    config = workdir / f"meshd-{name}.toml"
    config.write_text(
        f'workers = {workers}\ndrain_timeout = "2s"\nworker_timeout = "10s"\n'
        f'instance = "{instance}"\nstate_dir = "{workdir}/state-{name}"\n\n'
        f'[admin]\nlisten = "{admin}"\n\n'
        f'[[discovery]]\nname = "local"\nplugin = "static"\n'
        f'[discovery.services]\nbench = [{endpoints}]\n{services}\n'
        + (listeners if listeners is not None else
           f'[[listener]]\nname = "outbound"\nlisten = "127.0.0.1:{port}"\n'
           f'direction = "outbound"\nprotocol = "http"\n\n') +
        f'[service.bench]\ntimeout = "5s"\n{policy}\n{extra}')
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / f"meshd-{name}.log"
    log.unlink(missing_ok=True)
    meshd = Meshd(config, log, admin=admin, instance=instance)
    try:
        return meshd.start(timeout=30)
    except (RuntimeError, TimeoutError) as e:
        meshd.stop()
        raise BenchError(f"meshd-{name}: {e}") from None


class SlowBackend:
    """``serve_slow`` in its own process: answers BODY ``delay_ms`` late, counts requests."""

    def __init__(self, port: int, delay_ms: float) -> None:
        self.port, self.delay_ms = port, delay_ms
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SlowBackend:
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench", "--serve-slow", f"{self.port}:{self.delay_ms:g}"],
                stdout=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
        except OSError as e:
            raise BenchError(f"slow backend: cannot start: {e}") from None

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"slow backend exited with {self.proc.returncode}")
            return port_open("127.0.0.1", self.port)
        wait_for(up, 10, what=f"slow backend on port {self.port}")
        return self

    def count(self) -> int:
        status, _, body = http_get("127.0.0.1", self.port, "/_count")
        if status != 200:
            raise BenchError(f"slow backend: /_count answered {status}")
        return int(body)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def serve_slow(port: int, delay_ms: float) -> None:
    """A minimal HTTP/1.1 keep-alive server for bodiless GETs: every request is answered
    with BODY after ``delay_ms``; ``GET /_count`` (not delayed, not counted) answers how
    many requests it has served. Cheap enough that it is never the bottleneck."""
    import gevent
    from gevent.server import StreamServer

    body = BODY.encode()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body), body))
    served = 0
    delay = delay_ms / 1000

    def handle(sock: socket.socket, _address: object) -> None:
        nonlocal served
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                while (end := buf.find(b"\r\n\r\n")) >= 0:
                    head, buf = buf[:end], buf[end + 4:]
                    if head.startswith(b"GET /_count "):
                        n = str(served).encode()
                        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(n), n))
                        continue
                    served += 1
                    gevent.sleep(delay)
                    sock.sendall(answer)
                    if b"\nconnection: close" in head.lower():
                        return

    server = StreamServer(("127.0.0.1", port), handle, backlog=1024)
    server.serve_forever()


def ensure_tools(*tools: str) -> None:
    """scripts/ensure-tools.sh, for a direct ``python -m bench`` run (``make bench``
    installs the tools already)."""
    if subprocess.run(["sh", str(ROOT / "scripts" / "ensure-tools.sh"), *tools]).returncode:
        raise BenchError(f"missing tool(s): {' '.join(tools)}")


def distinct_free_ports(n: int) -> list[int]:
    """``n`` free loopback ports, all different (each held bound until all are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def check_answers(name: str, port: int, host: str = "bench") -> None:
    try:
        status, _, body = http_get("127.0.0.1", port, "/", {"Host": host})
    except OSError as e:
        raise BenchError(f"{name}: GET / failed: {e}") from None
    if status != 200 or body != BODY.encode():
        raise BenchError(f"{name}: GET / answered {status} {body[:200]!r}")
