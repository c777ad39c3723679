"""The load generators and their parsers: wrk, h2load, and the open-loop generator
at a fixed rate (scenario two-hop)."""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import _UNIT_MS, BODY, CLK_TCK, SLOW_MS, BenchError, Round
from bench.procs import cpu_ticks

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
