"""`make bench`: meshd against nginx over HTTP/1.1 and HTTP/2, the cost of balancing, a
slow endpoint, and the latency meshd hops add, on loopback.

Five scenarios, each selectable with ``--only`` (default: all of them):

``direct``, ``nginx``, ``meshd-1w``, ``meshd-2w`` (together: ``http1``)
    An nginx backend answering ~100 bytes, the proxies under test in front of it (nginx
    with 2 workers and upstream keepalive, meshd with 1 and with 2 workers), and the
    backend directly, all driven with the same wrk command. Ratios to nginx.

``balancing``
    The cost of the balancing features: meshd (2 workers) in front of three healthy
    endpoints of one service (three ports of the one-worker nginx backend), once with the defaults (balancer = "p2c" peak-EWMA
    from shared memory, retries = 1 within the shared budget, failure_accrual = 7), once
    as the foundation balanced (balancer = "round_robin", retries = 0,
    failure_accrual = 0). Both run side by side and are alternated round by round
    (A B A B ...) so that drift hits them alike; besides the ratio of the median rounds,
    the median of the per-round ratios (each pair measured back to back) is reported.

``slow-endpoint``
    One endpoint out of three answers 50 ms late (a tiny gevent server in its own process,
    ``--serve-slow``; the two fast ones are nginx): p99 through nginx's round robin and
    least_conn (2 workers, upstream keepalive, a shared ``zone``) and through meshd with
    p2c and with round robin (the two configurations of ``balancing``), under a fixed,
    modest load (``--slow-connections``, default 16). The backends count the requests
    they serve, so each variant's share of requests sent to the slow endpoint is shown.

``h2``
    HTTP/2 with prior knowledge (h2c), ``h2load -c16 -m10`` for ``--duration`` s after a
    1 s warm-up, against three targets: ``direct-h2`` (a second server block of the nginx
    backend, ``listen ... http2``, answering BODY itself), ``nginx-h2`` (nginx, 2 workers,
    ``listen ... http2``, proxy_pass with keepalive to the HTTP/1.1 backend; the baseline)
    and ``meshd-h2`` (2 workers, h2 from the client, each stream forwarded to the same
    HTTP/1.1 backend). h2load prints only min/max/mean/sd: p50/p90/p99 come from its
    per-request log (``--log-file``). h2load (Debian's nghttp2-client) is installed by
    scripts/ensure-tools.sh when missing.

``two-hop``
    Added latency of meshd hops at a fixed rate (``--rate``, default 1,000 requests/s) of
    HTTP/1.1 GETs from an open-loop generator in this script (``--rate-connections``
    keep-alive connections, one thread each, sending at scheduled times; latency counted
    from the scheduled time, so coordinated omission is corrected), ``--rate-duration`` s
    per round after a 1 s warm-up: ``direct`` to the application (the nginx backend),
    ``one-hop`` through meshd A (service ``bench``: the plain endpoint) and ``two-hop``
    through A and B (service ``web``: the same endpoint marked meshed, so A carries the
    requests over one multiplexed HTTP/2 connection to B's inbound listener, which gives
    the application HTTP/1.1). ``--hop-workers`` workers each (default 1). Medians over
    the rounds of each percentile; added = hop - direct.

Rounds go round-robin over a scenario's targets (each after a 1 s warm-up) so that drift
of a noisy machine hits them alike; the round with the median req/s is reported (median
p99 for ``slow-endpoint``).

Proxy CPU per request = user+sys clock ticks of the proxy's process tree (from
/proc/PID/stat) over the round, divided by the requests wrk completed.

Results go to stdout (a markdown table per scenario, with the load average before and
after it: the machine may be shared) and bench-results/http1.json, balancing.json,
slow-endpoint.json, h2.json, two-hop.json; meshd's logs to bench-results/. Exit 1 only
when a target cannot be started or wrk/h2load fails; a missed aim is just reported.
BENCH_KEEP=1 keeps the temporary directory (configs, nginx logs) for a look afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from meshd.testing.harness import Meshd, free_port, http_get, port_open, wait_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
TARGETS = ("direct", "nginx", "meshd-1w", "meshd-2w")
SCENARIOS = ("balancing", "slow-endpoint", "h2", "two-hop")
CHOICES = (*TARGETS, "http1", *SCENARIOS)
BODY = "meshd bench: a fixed answer of about one hundred bytes from the nginx backend, padded to len\n"
AIM = 0.25  # meshd 2 workers vs nginx req/s, the issue's aim
BALANCING_AIM = 0.10  # the balancing features may cost under 10 % (req/s and CPU per request)
SLOW_MS = 50  # the slow endpoint's added latency
CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}

# [service.bench] policies: the balancing features on (the defaults, spelled out) and the
# foundation's round robin.
POLICIES = {
    "p2c": 'balancer = "p2c"\nretries = 1\nfailure_accrual = 7\n',
    "rr": 'balancer = "round_robin"\nretries = 0\nfailure_accrual = 0\n',
}
BALANCING = ("meshd-p2c", "meshd-rr")  # A, B; the second is the baseline
SLOW_VARIANTS = ("nginx-rr", "nginx-lc", "meshd-p2c", "meshd-rr")  # the first is the baseline
H2_TARGETS = ("direct-h2", "nginx-h2", "meshd-h2")  # nginx-h2 is the baseline
H2_AIM = 0.20  # meshd (2 workers) vs nginx req/s over HTTP/2, the issue's aim
# nginx ends an HTTP/2 connection after keepalive_requests (1,000) requests and h2load does
# not reconnect: the h2c servers allow many more
H2_KEEPALIVE = "    keepalive_requests 100000000;\n"
HOPS = ("direct", "one-hop", "two-hop")  # direct is the baseline
HOP_AIM_MS = 2.0  # two hops may add under 2 ms median at the fixed rate


class BenchError(Exception):
    """A target could not be started or wrk failed: the run is void."""


@dataclass
class Round:
    rps: float
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_us_per_req: float | None  # None for the direct target (no proxy)
    non_2xx: int
    socket_errors: dict[str, int]
    # slow-endpoint only: requests each backend served during the round (after warm-up)
    backend_requests: dict[str, int] = field(default_factory=dict)

    @property
    def slow_share(self) -> float | None:
        total = sum(self.backend_requests.values())
        return self.backend_requests.get("slow", 0) / total if total else None


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

    def __init__(self, name: str, workdir: Path, port: int, workers: int, http_block: str) -> None:
        self.name, self.port = name, port
        self.dir = workdir / name
        self.dir.mkdir()
        temp_paths = "".join(f"  {kind}_temp_path {self.dir}/{kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(
            f"daemon off;\nmaster_process on;\nworker_processes {workers};\n"
            f"error_log {self.dir}/error.log;\npid {self.dir}/nginx.pid;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n{temp_paths}{http_block}}}\n")
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
                listeners: str | None = None) -> Meshd:
    """meshd with ``workers`` workers, one outbound HTTP listener on ``port`` and service
    ``bench`` on ``backend_ports`` (static discovery) with ``policy`` lines added to its
    [service.bench] table; its log is bench-results/meshd-NAME.log (NAME: e.g. ``2w``).
    ``services``: more lines for [discovery.services]; ``listeners``: [[listener]] tables
    that replace the outbound one."""
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
        f'[service.bench]\ntimeout = "5s"\n{policy}')
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
                [sys.executable, str(Path(__file__).resolve()),
                 "--serve-slow", f"{self.port}:{self.delay_ms:g}"],
                stdout=subprocess.DEVNULL, start_new_session=True)
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
    """scripts/ensure-tools.sh, for a direct ``python scripts/bench.py`` run (``make bench``
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


# -- wrk ------------------------------------------------------------------------------------

def wrk_command(port: int, duration: float, connections: int) -> list[str]:
    return ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "--latency",
            "-H", "Host: bench", f"http://127.0.0.1:{port}/"]


def shown_command(duration: float, connections: int) -> str:
    return shlex.join(wrk_command(0, duration, connections)).replace(
        "127.0.0.1:0", "127.0.0.1:PORT")


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def run_wrk(name: str, cmd: list[str], duration: float) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name}: wrk did not finish within {duration + 30:g}s") from None
    except OSError as e:
        raise BenchError(f"{name}: cannot run wrk: {e}") from None
    if out.returncode != 0 or "requests in" not in out.stdout:
        raise BenchError(f"{name}: wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def parse_wrk(text: str) -> tuple[float, int, float, float, float, int, dict[str, int]]:
    """req/s, requests, p50 ms, p90 ms, p99 ms, non-2xx/3xx responses, socket errors."""
    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.M)
        if m is None:
            raise BenchError(f"cannot find {pattern!r} in wrk's output:\n{text}")
        return m
    requests = int(grab(r"^\s*(\d+) requests in ")[1])
    rps = float(grab(r"^Requests/sec:\s+([\d.]+)")[1])
    p50 = grab(r"^\s*50(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    p90 = grab(r"^\s*90(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    p99 = grab(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    non_2xx = int(m[1]) if m else 0
    errors: dict[str, int] = {}
    m = re.search(r"Socket errors:(.*)$", text, re.M)
    if m:
        errors = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", m[1])}
    return (rps, requests, _ms(*p50.groups()), _ms(*p90.groups()), _ms(*p99.groups()),
            non_2xx, errors)


Counter = Callable[[], dict[str, int]]


def measure(name: str, port: int, cpu_root: int | None, args: argparse.Namespace,
            connections: int | None = None, counter: Counter | None = None) -> Round:
    """A 1 s warm-up, then one round of ``args.duration``; ``counter`` (requests served so
    far per backend) is read around the round."""
    connections = connections or args.connections
    run_wrk(name, wrk_command(port, 1, connections), 1)  # warm-up
    if counter:
        time.sleep(2 * SLOW_MS / 1000)  # the warm-up's last requests finish
    counts_before = counter() if counter else {}
    before = cpu_ticks(cpu_root) if cpu_root else 0
    text = run_wrk(name, wrk_command(port, args.duration, connections), args.duration)
    after = cpu_ticks(cpu_root) if cpu_root else 0
    if counter:
        time.sleep(2 * SLOW_MS / 1000)
    counts = {k: v - counts_before[k] for k, v in counter().items()} if counter else {}
    rps, requests, p50, p90, p99, non_2xx, errors = parse_wrk(text)
    cpu = (after - before) / CLK_TCK * 1e6 / requests if cpu_root and requests else None
    return Round(rps, requests, p50, p90, p99, cpu, non_2xx, errors, counts)


# -- h2load (scenario h2) -----------------------------------------------------------------------

def h2load_command(port: int, duration: float, log_file: str | None = None) -> list[str]:
    """h2load, 16 connections x 10 concurrent streams, HTTP/2 with prior knowledge (h2c),
    a timed run; a per-request log for the percentiles."""
    cmd = ["h2load", "-c16", "-m10", "-t1", f"-D{duration:g}", "-H", ":authority: bench"]
    if log_file:
        cmd += ["--log-file", log_file]
    return [*cmd, f"http://127.0.0.1:{port}/"]


def shown_h2load(duration: float) -> str:
    return shlex.join(h2load_command(0, duration, "LOG")).replace(
        "127.0.0.1:0", "127.0.0.1:PORT")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 when it is empty)."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def measure_h2(name: str, port: int, cpu_root: int | None, args: argparse.Namespace,
               workdir: Path) -> Round:
    """A 1 s warm-up, then one h2load round of ``args.duration``; percentiles from its log
    (h2load prints only min/max/mean/sd)."""
    log = workdir / f"h2load-{name}.log"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(h2load_command(port, 1), capture_output=True, timeout=40)
    cmd = h2load_command(port, args.duration, str(log))
    before = cpu_ticks(cpu_root) if cpu_root else 0
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 40)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name}: h2load did not finish within {args.duration + 40:g}s") from None
    except OSError as e:
        raise BenchError(f"{name}: cannot run h2load: {e}") from None
    after = cpu_ticks(cpu_root) if cpu_root else 0
    text = out.stdout
    m = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text, re.M)
    if out.returncode != 0 or m is None:
        raise BenchError(f"{name}: h2load failed ({out.returncode}):\n{text}{out.stderr}")
    succeeded = int(m[4])
    errors = {"failed": int(m[5]), "errored": int(m[6]), "timeout": int(m[7])}
    status = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    non_2xx = int(status[3]) + int(status[4]) if status else 0
    # h2load prints min/max/mean/sd only: its per-request log (start µs, status, µs) gives
    # the percentiles
    times = []
    with contextlib.suppress(FileNotFoundError), open(log) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) == 3:
                times.append(int(parts[2]) / 1000)
    log.unlink(missing_ok=True)
    times.sort()
    if not succeeded or not times:
        raise BenchError(f"{name}: h2load completed no request:\n{text}{out.stderr}")
    took = re.search(r"^finished in ([\d.]+)s", text, re.M)
    rps = succeeded / (float(took[1]) if took else args.duration)
    cpu = (after - before) / CLK_TCK * 1e6 / succeeded if cpu_root else None
    return Round(rps, succeeded, _percentile(times, 50), _percentile(times, 90),
                 _percentile(times, 99), cpu, non_2xx, errors)


def check_h2(name: str, port: int) -> None:
    """One request with h2load (HTTP/2 prior knowledge): it must answer 200 with BODY."""
    try:
        out = subprocess.run(["h2load", "-n1", "-c1", "-H", ":authority: bench",
                              f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"{name}: h2load -n1 failed: {e}") from None
    if "1 succeeded" not in out.stdout or "1 2xx" not in out.stdout or \
            f"({len(BODY)}) data" not in out.stdout:
        raise BenchError(f"{name}: not one 2xx answer of {len(BODY)} bytes over HTTP/2:\n"
                         f"{out.stdout}{out.stderr}")


# -- an open-loop load at a fixed rate (scenario two-hop) ---------------------------------------

@dataclass
class RateRound:
    rate: float  # the rate asked for
    achieved: float  # responses per second over the round
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu_us_per_req: float | None  # the meshd processes' (A, and B for two hops)
    client_cpu_us_per_req: float  # the load generator's own (this process)
    errors: int
    cpu_us_per_req_each: list[float] = field(default_factory=list)  # A, B


def _read_response(sock: socket.socket, buf: bytearray) -> bool:
    """Reads one HTTP/1.1 response (Content-Length or chunked) from ``sock``; what follows
    it stays in ``buf``. True for a 2xx response, False otherwise; OSError on EOF."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise OSError("connection closed")
        buf += data
    head = bytes(buf[:end]).lower()
    ok = head[9:10] == b"2"
    del buf[:end + 4]
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
    if m:
        need = int(m[1])
        while len(buf) < need:
            data = sock.recv(65536)
            if not data:
                raise OSError("connection closed")
            buf += data
        del buf[:need]
    elif b"\r\ntransfer-encoding:" in head:
        while (end := buf.find(b"\r\n0\r\n\r\n")) < 0 and not buf.startswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            if not data:
                raise OSError("connection closed")
            buf += data
        del buf[:5 if buf.startswith(b"0\r\n\r\n") else end + 7]
    return ok


def open_loop(port: int, host: str, rate: float, duration: float,
              connections: int) -> tuple[list[float], int, float]:
    """``rate`` GETs per second for ``duration`` s over ``connections`` keep-alive
    connections (threads), each sending at its own schedule (rate/connections, the
    connections staggered). Open loop: a request's latency is counted from the time it was
    scheduled, so a late answer also delays the requests queued behind it (coordinated
    omission corrected). Returns the latencies (ms), the errors, the wall time."""
    import threading

    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meshd-bench\r\n\r\n".encode()
    interval = connections / rate
    count = int(rate * duration / connections)
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    start = time.perf_counter() + 0.05

    def run(i: int) -> None:
        sock, buf, own = socks[i], bytearray(), latencies[i]
        t0 = start + i * interval / connections
        for k in range(count):
            scheduled = t0 + k * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                sock.sendall(request)
                ok = _read_response(sock, buf)
            except OSError:
                errors[i] += count - k
                return
            own.append((time.perf_counter() - scheduled) * 1000)
            if not ok:
                errors[i] += 1

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 60)
    wall = time.perf_counter() - start
    for s in socks:
        s.close()
    return [x for own in latencies for x in own], sum(errors), wall


def measure_rate(name: str, port: int, host: str, cpu_roots: Sequence[int],
                 args: argparse.Namespace) -> RateRound:
    """A 1 s warm-up at the rate, then one round of ``args.rate_duration`` s."""
    open_loop(port, host, args.rate, 1.0, args.rate_connections)
    before, client = [cpu_ticks(p) for p in cpu_roots], time.process_time()
    times, errors, wall = open_loop(port, host, args.rate, args.rate_duration,
                                    args.rate_connections)
    after, client = [cpu_ticks(p) for p in cpu_roots], time.process_time() - client
    times.sort()
    if not times:
        raise BenchError(f"{name}: no answer at all ({errors} errors)")
    each = [(y - x) / CLK_TCK * 1e6 / len(times) for x, y in zip(before, after, strict=True)]
    cpu = sum(each) if cpu_roots else None
    return RateRound(args.rate, len(times) / wall, len(times), _percentile(times, 50),
                     _percentile(times, 90), _percentile(times, 99), times[-1], cpu,
                     client * 1e6 / len(times), errors, each)


# -- rounds, reports and results: what every scenario shares ---------------------------------

T = TypeVar("T")  # a target: what a scenario needs to measure it (port, pid, ...)
R = TypeVar("R", Round, RateRound)  # one round's figures
Ports = dict[str, tuple[int, int | None]]  # the wrk/h2load targets: port, pid for the CPU


def run_rounds(label: str, targets: Mapping[str, T], args: argparse.Namespace,
               check: Callable[[str, T], None],
               measure_one: Callable[[str, T], R]) -> dict[str, list[R]]:
    """``check`` each target once, then ``args.rounds`` rounds over the targets in turn
    (A B A B ...) so that drift hits them alike, ``measure_one`` measuring one target once.
    Returns each target's rounds."""
    for name, target in targets.items():
        check(name, target)
    rounds: dict[str, list[R]] = {name: [] for name in targets}
    for i in range(args.rounds):
        for name, target in targets.items():
            print(f"{label}round {i + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            rounds[name].append(measure_one(name, target))
    return rounds


def wrk_rounds(label: str, ports: Ports, args: argparse.Namespace,
               connections: int | None = None,
               counter: Counter | None = None) -> dict[str, list[Round]]:
    """``run_rounds`` with wrk over HTTP/1.1 (``measure``), each target checked first."""
    return run_rounds(label, ports, args, lambda name, t: check_answers(name, t[0]),
                      lambda name, t: measure(name, t[0], t[1], args, connections, counter))


def median_rounds(rounds: dict[str, list[Round]],
                  key: Callable[[Round], float]) -> dict[str, Round]:
    """Each target's round with the median ``key`` (the lower middle one of an even count)."""
    return {name: sorted(rs, key=key)[(len(rs) - 1) // 2] for name, rs in rounds.items()}


def rps_ratios(rounds: dict[str, list[Round]], a: str, b: str) -> list[float]:
    """``a``'s req/s over ``b``'s round by round (each pair measured back to back)."""
    return [x.rps / y.rps for x, y in zip(rounds[a], rounds[b], strict=True)]


def ratio_aim(pairs: list[float], a: str, b: str, aim: float) -> tuple[str, bool]:
    """The req/s aim against nginx, judged on the median of the per-round ratios ``pairs``
    (``a``/``b``; nginx's own figure moves by a third between rounds on a shared machine):
    the lines that report it, and whether it is met."""
    ratio = statistics.median(pairs)
    met = ratio >= aim
    return (f"per-round req/s ratio {a}/{b}: {', '.join(f'{x:.3f}' for x in pairs)}\n"
            f"aim {aim}x nginx: {'met' if met else 'not met'} (median of the per-round "
            f"ratios {ratio:.3f}x; the table's column divides the median rounds)", met)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "—"


def _cpu(r: Round) -> str:
    return f"{r.cpu_us_per_req:.1f}" if r.cpu_us_per_req is not None else "—"


def _header(title: str, command: str, how: str, rounds: int, duration: float, load: float,
            prompt: str = "$ ") -> None:
    """A scenario's heading: ``how`` the figures come from the rounds (up to their count,
    e.g. "median by req/s of"), the load average before (``load``) and now, the command."""
    print(f"\n### {title}\n\n{_now()}, {os.cpu_count()} CPUs, {how} {rounds} round(s) of "
          f"{duration:g} s; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after\n"
          f"`{prompt}{command}`\n")


def _table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _warnings(rounds: Mapping[str, list[R]], problems: Callable[[list[R]], list[str]]) -> None:
    """A warning line for each of the ``problems`` of each target's rounds."""
    for name, rs in rounds.items():
        for problem in problems(rs):
            print(f"\nwarning: {name}: {problem}")


def wrk_problems(rs: list[Round]) -> list[str]:
    """Non-2xx/3xx responses and socket errors over all rounds (wrk, h2load)."""
    non_2xx = sum(r.non_2xx for r in rs)
    errors: dict[str, int] = {}
    for r in rs:
        for k, v in r.socket_errors.items():
            if v:
                errors[k] = errors.get(k, 0) + v
    if non_2xx or errors:
        return [f"{non_2xx} non-2xx/3xx responses, socket errors {errors} (over all rounds)"]
    return []


def rate_problems(rs: list[RateRound]) -> list[str]:
    """Failed requests over all rounds and rounds short of the rate (the open loop)."""
    problems = []
    errors = sum(r.errors for r in rs)
    if errors:
        problems.append(f"{errors} failed or non-2xx requests (over all rounds)")
    if any(r.achieved < 0.95 * r.rate for r in rs):
        problems.append(f"a round fell short of the rate "
                        f"({', '.join(f'{r.achieved:.0f}' for r in rs)} req/s)")
    return problems


def _save(file: str, command: str, args: argparse.Namespace, **fields: object) -> None:
    """bench-results/``file``: the fields every result starts with (date, command, cpus,
    rounds), then the scenario's own ``fields``."""
    RESULTS.mkdir(exist_ok=True)
    data = {"date": _now(), "command": command, "cpus": os.cpu_count(), "rounds": args.rounds,
            **fields}
    (RESULTS / file).write_text(json.dumps(data, indent=2) + "\n")


def _rounds_json(rounds: Mapping[str, list[R]]) -> dict[str, list[dict[str, object]]]:
    return {n: [asdict(r) | {"slow_share": r.slow_share}
                if isinstance(r, Round) and r.backend_requests else asdict(r)
                for r in rs] for n, rs in rounds.items()}


# -- the scenarios ----------------------------------------------------------------------------

def scenario_http1(targets: list[str], backend_port: int, workdir: Path,
                   args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    ports: Ports = {}
    for name in targets:
        port = free_port()
        if name == "direct":
            ports[name] = (backend_port, None)
            continue
        if name == "nginx":
            proc: Nginx | Meshd = proxy_nginx(workdir, port, backend_port).start()
        else:
            proc = start_meshd(workdir, int(name[6]), port, backend_port)
        stack.callback(proc.stop)
        ports[name] = (port, proc.pid)
    rounds = wrk_rounds("", ports, args)
    results = median_rounds(rounds, lambda r: r.rps)
    command = shown_command(args.duration, args.connections)
    base = results.get("nginx")
    base_rps = base.rps if base else None
    base_cpu = base.cpu_us_per_req if base else None
    _header("HTTP/1.1 throughput: direct, nginx, meshd", command, "median by req/s of",
            args.rounds, args.duration, load)
    _table(["target", "req/s", "× nginx", "p50 ms", "p99 ms", "CPU µs/req", "× nginx CPU"],
           [[name, f"{r.rps:,.0f}", _ratio(r.rps, base_rps), f"{r.p50_ms:.2f}",
             f"{r.p99_ms:.2f}", _cpu(r), _ratio(r.cpu_us_per_req, base_cpu)]
            for name, r in results.items()])
    # nginx and meshd-2w run back to back in each round: the aim is judged per round
    pairs = (rps_ratios(rounds, "meshd-2w", "nginx")
             if "meshd-2w" in rounds and "nginx" in rounds else [])
    aim = None
    if pairs:
        lines, met = ratio_aim(pairs, "meshd-2w", "nginx", AIM)
        print(f"\n{lines}")
        aim = {"ratio": AIM, "met": met}
    _warnings(rounds, wrk_problems)
    _save("http1.json", command, args,
          results={name: asdict(r) for name, r in results.items()},
          all_rounds=_rounds_json(rounds), per_round_ratios=pairs, aim=aim)


def balancing_summary(rounds: dict[str, list[Round]]) -> dict[str, float | None]:
    """Per-round ratios p2c / rr (each pair measured back to back), their medians."""
    a, b = (rounds[n] for n in BALANCING)
    rps = rps_ratios(rounds, *BALANCING)
    p99 = [x.p99_ms / y.p99_ms for x, y in zip(a, b, strict=True)]
    cpu = [x.cpu_us_per_req / y.cpu_us_per_req for x, y in zip(a, b, strict=True)
           if x.cpu_us_per_req and y.cpu_us_per_req]
    return {"rps_ratio": statistics.median(rps), "p99_ratio": statistics.median(p99),
            "cpu_ratio": statistics.median(cpu) if cpu else None}


def scenario_balancing(backend_ports: list[int], workdir: Path, args: argparse.Namespace,
                       stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    ports: Ports = {}
    for name in BALANCING:
        port = free_port()
        meshd = start_meshd(workdir, 2, port, backend_ports, name=f"bal-{name[6:]}",
                            policy=POLICIES[name[6:]])
        stack.callback(meshd.stop)
        ports[name] = (port, meshd.pid)
    rounds = wrk_rounds("balancing: ", ports, args)
    results = median_rounds(rounds, lambda r: r.rps)
    command = shown_command(args.duration, args.connections)
    base = results["meshd-rr"]
    _header("Balancing features on (p2c, retries 1, failure_accrual 7) vs round robin "
            "(retries 0, failure_accrual 0): meshd 2 workers, 3 healthy backends",
            command, "alternated A B A B, median by req/s of", args.rounds, args.duration,
            load)
    _table(["variant", "req/s", "× rr", "p50 ms", "p99 ms", "× rr p99", "CPU µs/req", "× rr CPU"],
           [[name, f"{r.rps:,.0f}", _ratio(r.rps, base.rps), f"{r.p50_ms:.2f}",
             f"{r.p99_ms:.2f}", _ratio(r.p99_ms, base.p99_ms), _cpu(r),
             _ratio(r.cpu_us_per_req, base.cpu_us_per_req)] for name, r in results.items()])
    s = balancing_summary(rounds)
    pairs = ", ".join(f"{x:.3f}" for x in rps_ratios(rounds, *BALANCING))
    cpu_ratio = s["cpu_ratio"]
    print(f"\nper-round req/s ratio p2c/rr (back-to-back pairs): {pairs}; median "
          f"{s['rps_ratio']:.3f}; median p99 ratio {s['p99_ratio']:.2f}; median CPU/req ratio "
          + (f"{cpu_ratio:.3f}" if cpu_ratio is not None else "—"))
    rps_ratio = s["rps_ratio"] or 0.0
    met = rps_ratio >= 1 - BALANCING_AIM and (cpu_ratio is None or cpu_ratio <= 1 + BALANCING_AIM)
    print(f"aim: cost under {BALANCING_AIM:.0%}: {'met' if met else 'not met'} "
          f"(req/s {rps_ratio - 1:+.1%}, CPU per request "
          + (f"{cpu_ratio - 1:+.1%})" if cpu_ratio is not None else "—)"))
    _warnings(rounds, wrk_problems)
    _save("balancing.json", command, args, policies=POLICIES,
          per_round_median_ratios_p2c_over_rr=s, aim_cost=BALANCING_AIM,
          all_rounds=_rounds_json(rounds))


def scenario_slow(fast: dict[str, tuple[int, Path]], workdir: Path, args: argparse.Namespace,
                  stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    slow = SlowBackend(free_port(), SLOW_MS).start()
    stack.callback(slow.stop)
    backend_ports = [p for p, _ in fast.values()] + [slow.port]

    def counter() -> dict[str, int]:
        counts = {name: log.stat().st_size // 2 if log.exists() else 0
                  for name, (_, log) in fast.items()}
        counts["slow"] = slow.count()
        return counts

    ports: Ports = {}
    for name in SLOW_VARIANTS:
        port = free_port()
        proc: Nginx | Meshd
        if name.startswith("nginx-"):
            method = "least_conn" if name == "nginx-lc" else ""
            proc = balancing_nginx(f"slow-{name}", workdir, port, backend_ports, method).start()
        else:
            proc = start_meshd(workdir, 2, port, backend_ports, name=f"slow-{name[6:]}",
                               policy=POLICIES[name[6:]])
        stack.callback(proc.stop)
        ports[name] = (port, proc.pid)
    rounds = wrk_rounds("slow-endpoint: ", ports, args, args.slow_connections, counter)
    results = median_rounds(rounds, lambda r: r.p99_ms)
    command = shown_command(args.duration, args.slow_connections)
    base = results.get(SLOW_VARIANTS[0])
    _header(f"One slow endpoint (+{SLOW_MS} ms) out of three: nginx round robin / least_conn "
            "vs meshd p2c / round robin (2 workers each)", command, "median by p99 of",
            args.rounds, args.duration, load)
    _table(["variant", "req/s", "p50 ms", "p90 ms", "p99 ms", "× nginx-rr p99",
            "slow endpoint's share", "CPU µs/req"],
           [[name, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
             _ratio(r.p99_ms, base.p99_ms if base else None),
             f"{r.slow_share:.1%}" if r.slow_share is not None else "—", _cpu(r)]
            for name, r in results.items()])
    shares = {n: ", ".join(f"{r.slow_share:.1%}" for r in rs if r.slow_share is not None)
              for n, rs in rounds.items()}
    print("\nslow endpoint's share per round: "
          + "; ".join(f"{n} {s}" for n, s in shares.items()))
    _warnings(rounds, wrk_problems)
    _save("slow-endpoint.json", command, args, slow_ms=SLOW_MS, policies=POLICIES,
          all_rounds=_rounds_json(rounds))


def scenario_h2(direct_port: int, backend_port: int, workdir: Path, args: argparse.Namespace,
                stack: contextlib.ExitStack) -> None:
    ensure_tools("h2load")
    load = os.getloadavg()[0]
    ports: Ports = {"direct-h2": (direct_port, None)}
    nginx = proxy_nginx(workdir, free_port(), backend_port, h2=True).start()
    stack.callback(nginx.stop)
    ports["nginx-h2"] = (nginx.port, nginx.pid)
    port = free_port()
    meshd = start_meshd(workdir, 2, port, backend_port, name="h2")
    stack.callback(meshd.stop)
    ports["meshd-h2"] = (port, meshd.pid)
    shares: list[str] = []  # how meshd's workers shared its CPU, round by round

    def measure_one(name: str, target: tuple[int, int | None]) -> Round:
        if name != "meshd-h2":
            return measure_h2(name, *target, args, workdir)
        workers = meshd.worker_pids()
        before = own_ticks(workers)
        r = measure_h2(name, *target, args, workdir)
        used = {w: t - before.get(w, 0) for w, t in own_ticks(workers).items()}
        total = sum(used.values()) or 1
        shares.append(" / ".join(f"{u / total:.0%}" for u in used.values()))
        return r

    rounds = run_rounds("h2: ", ports, args, lambda name, t: check_h2(name, t[0]), measure_one)
    results = median_rounds(rounds, lambda r: r.rps)
    command = shown_h2load(args.duration)
    base = results["nginx-h2"]
    _header("HTTP/2 (h2c, prior knowledge), 16 connections x 10 streams: direct to an nginx h2c "
            "server, nginx h2c -> HTTP/1.1, meshd (2 workers) h2 -> HTTP/1.1",
            command, "median by req/s of", args.rounds, args.duration, load)
    _table(["target", "req/s", "× nginx", "p50 ms", "p90 ms", "p99 ms", "CPU µs/req",
            "× nginx CPU"],
           [[name, f"{r.rps:,.0f}", _ratio(r.rps, base.rps), f"{r.p50_ms:.2f}",
             f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", _cpu(r),
             _ratio(r.cpu_us_per_req, base.cpu_us_per_req)] for name, r in results.items()])
    # the aim is judged on the ratio within each round (meshd measured right after nginx)
    pairs = rps_ratios(rounds, "meshd-h2", "nginx-h2")
    lines, met = ratio_aim(pairs, "meshd-h2", "nginx-h2", H2_AIM)
    print(f"\nlatency percentiles from h2load's per-request log (--log-file); the backend of "
          f"nginx-h2 and meshd-h2 is the HTTP/1.1 nginx backend\n{lines}\n"
          f"meshd-h2's workers' shares of its workers' CPU, per round: {'; '.join(shares)}")
    _warnings(rounds, wrk_problems)
    _save("h2.json", command, args, results={name: asdict(r) for name, r in results.items()},
          all_rounds=_rounds_json(rounds), per_round_ratios=pairs,
          aim={"ratio": H2_AIM, "met": met})


def _hop_cpu(rs: list[RateRound]) -> str:
    """The meshd processes' CPU per request, median over rounds: total (A / B)."""
    if not rs[0].cpu_us_per_req_each:
        return "—"
    parts = [statistics.median(r.cpu_us_per_req_each[i] for r in rs)
             for i in range(len(rs[0].cpu_us_per_req_each))]
    total = statistics.median(r.cpu_us_per_req or 0 for r in rs)
    return f"{total:.0f}" + (f" ({' / '.join(f'{x:.0f}' for x in parts)})" if len(parts) > 1
                             else "")


def scenario_two_hop(backend_port: int, workdir: Path, args: argparse.Namespace,
                     stack: contextlib.ExitStack) -> None:
    load = os.getloadavg()[0]
    workers = args.hop_workers
    # meshd B: the application's inbound side, HTTP/2 (or HTTP/1.1) in, HTTP/1.1 to the app
    b_port = free_port()
    b = start_meshd(workdir, workers, 0, backend_port, name="hop-b", listeners=(
        f'[[listener]]\nname = "inbound"\nlisten = "127.0.0.1:{b_port}"\n'
        f'direction = "inbound"\nprotocol = "auto"\nforward = "127.0.0.1:{backend_port}"\n\n'))
    stack.callback(b.stop)
    # meshd A: "bench" is the app's plain endpoint (one hop), "web" the same app marked
    # meshed behind B's inbound port (two hops: A -> HTTP/2 -> B -> HTTP/1.1 -> app)
    a_port = free_port()
    a = start_meshd(workdir, workers, a_port, backend_port, name="hop-a", services=(
        f'web = [{{ address = "127.0.0.1:{backend_port}", meshed = true, '
        f'inbound_port = {b_port} }}]\n'))
    stack.callback(a.stop)
    targets: dict[str, tuple[int, str, list[int]]] = {
        "direct": (backend_port, "bench", []),
        "one-hop": (a_port, "bench", [a.pid]),
        "two-hop": (a_port, "web", [a.pid, b.pid]),
    }
    rounds = run_rounds("two-hop: ", targets, args,
                        lambda name, t: check_answers(name, t[0], t[1]),
                        lambda name, t: measure_rate(name, *t, args))

    def med(name: str, key: Callable[[RateRound], float]) -> float:
        return statistics.median(key(r) for r in rounds[name])
    p50 = {n: med(n, lambda r: r.p50_ms) for n in targets}
    p99 = {n: med(n, lambda r: r.p99_ms) for n in targets}
    command = (f"open loop in bench.py: {args.rate:g} GET/s over {args.rate_connections} "
               f"keep-alive HTTP/1.1 connections, {args.rate_duration:g} s per round after a "
               f"1 s warm-up, latency from the scheduled send time")
    _header(f"Added latency of meshd hops at a fixed {args.rate:,.0f} requests/s: direct to "
            f"the app, one hop (A), two hops (A -> HTTP/2 -> B -> app), {workers} worker(s) "
            f"each", command, "medians over", args.rounds, args.rate_duration, load, prompt="")
    _table(["path", "achieved req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
            "added p50 ms", "added p99 ms", "meshd CPU µs/req (A / B)", "client CPU µs/req"],
           [[n, f"{med(n, lambda r: r.achieved):,.0f}", f"{p50[n]:.3f}",
             f"{med(n, lambda r: r.p90_ms):.3f}", f"{p99[n]:.3f}",
             f"{med(n, lambda r: r.max_ms):.3f}",
             "—" if n == "direct" else f"{p50[n] - p50['direct']:+.3f}",
             "—" if n == "direct" else f"{p99[n] - p99['direct']:+.3f}",
             _hop_cpu(rounds[n]),
             f"{med(n, lambda r: r.client_cpu_us_per_req):.0f}"]
            for n in targets])
    added = [x.p50_ms - y.p50_ms for x, y in zip(rounds["two-hop"], rounds["direct"],
                                                 strict=True)]
    added_p50 = statistics.median(added)  # judged per round, as printed
    print("\nper-round added p50 of two hops (vs direct in the same round): "
          + ", ".join(f"{x:+.3f}" for x in added)
          + f" ms\naim: two hops add under {HOP_AIM_MS:g} ms median: "
          f"{'met' if added_p50 < HOP_AIM_MS else 'not met'} ({added_p50:+.3f} ms, the median "
          f"of the per-round figures)")
    _warnings(rounds, rate_problems)
    _save("two-hop.json", command, args,
          workers=workers, rate=args.rate, connections=args.rate_connections,
          medians={n: {"p50_ms": p50[n], "p99_ms": p99[n]} for n in targets},
          added_ms={n: {"p50": p50[n] - p50["direct"], "p99": p99[n] - p99["direct"]}
                    for n in ("one-hop", "two-hop")},
          all_rounds=_rounds_json(rounds),
          aim={"added_p50_ms": HOP_AIM_MS, "met": added_p50 < HOP_AIM_MS})


# -- the run --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (median)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--slow-connections", type=int, default=16,
                        help="wrk connections of the slow-endpoint scenario")
    parser.add_argument("--only", default=",".join((*TARGETS, *SCENARIOS)),
                        help=f"comma list out of {','.join(CHOICES)} (http1: its four targets)")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="two-hop: requests per second (open loop)")
    parser.add_argument("--rate-duration", type=float, default=10.0,
                        help="two-hop: seconds per round")
    parser.add_argument("--rate-connections", type=int, default=16,
                        help="two-hop: keep-alive connections of the open-loop load")
    parser.add_argument("--hop-workers", type=int, default=1,
                        help="two-hop: workers of each meshd")
    parser.add_argument("--serve-slow", metavar="PORT:MS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_slow:
        port, _, ms = args.serve_slow.partition(":")
        serve_slow(int(port), float(ms))
        return 0
    names = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(names) - set(CHOICES))
    if (unknown or not names or args.rounds < 1 or args.duration <= 0 or args.connections < 2
            or args.slow_connections < 2 or args.rate <= 0 or args.rate_duration <= 0
            or args.rate_connections < 1 or args.hop_workers < 1):
        parser.error(f"bad options (unknown targets: {unknown})" if unknown else "bad options")
    targets = [t for t in TARGETS if t in names or "http1" in names]

    workdir = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            backend_port, *healthy, fast1, fast2, direct_h2 = distinct_free_ports(7)
            fast = {f"fast{i}": (p, workdir / f"fast{i}.count")
                    for i, p in ((1, fast1), (2, fast2))}
            backend = backend_nginx(workdir, backend_port, healthy,
                                    {p: log for p, log in fast.values()},
                                    h2_ports=[direct_h2]).start()
            stack.callback(backend.stop)
            if targets:
                with contextlib.ExitStack() as own:
                    scenario_http1(targets, backend_port, workdir, args, own)
            if "balancing" in names:
                with contextlib.ExitStack() as own:
                    scenario_balancing(healthy, workdir, args, own)
            if "slow-endpoint" in names:
                with contextlib.ExitStack() as own:
                    scenario_slow(fast, workdir, args, own)
            if "h2" in names:
                with contextlib.ExitStack() as own:
                    scenario_h2(direct_h2, backend_port, workdir, args, own)
            if "two-hop" in names:
                with contextlib.ExitStack() as own:
                    scenario_two_hop(backend_port, workdir, args, own)
        print(f"\nresults: {RESULTS.relative_to(ROOT)}/*.json; meshd logs in "
              f"{RESULTS.relative_to(ROOT)}/meshd-*.log")
        return 0
    except (BenchError, TimeoutError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
