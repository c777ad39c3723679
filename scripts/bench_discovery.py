"""Discovery cost in the control process: 1,000 services x 10 endpoints, against 10.

For each size, in one run: write an endpoints file for the static plugin's file mode,
start meshd (1 worker) on it, wait for /ready, then read the control process's RSS
(VmRSS in /proc/PID/status) and CPU (utime+stime in /proc/PID/stat) at rest for
``--rest`` seconds. Then rewrite the file ``--cycles`` times, ``--spacing`` s apart,
changing every endpoint of every service each time, and report the control process's
CPU per change cycle (net of its rest rate) and the time from the file's rename to the
first answer from the new backend of service ``s0`` (its one real endpoint flips
between two test backends; the other endpoints have weight 0). One more cycle then
polls /endpoints until the last service shows its new endpoints (that polling costs
the control process CPU, so it is kept out of the CPU figures).

    .venv/bin/python scripts/bench_discovery.py [--services 1000] [--baseline 10]

The control process is found through the harness (``Meshd.control_pids()``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from meshd.testing.harness import Backend, Meshd, free_port, http_get, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")
ENDPOINTS = 10


@dataclass
class Result:
    services: int
    ready_s: float
    rss_mib: float
    rest_cpu_pct: float
    cycle_cpu_ms: float          # per change cycle, gross
    cycle_net_ms: float          # per change cycle, net of the rest rate
    traffic_ms: list[float]      # file renamed -> first answer from the new s0 backend
    all_visible_ms: float        # file renamed -> /endpoints shows the last service changed
    file_kib: float


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime, stime (fields 14, 15)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def write_file(path: Path, services: int, cycle: int, real: Backend) -> None:
    """Every endpoint's address depends on ``cycle``; s0's first one is ``real``."""
    lines = []
    for i in range(services):
        eps = [f'"10.{cycle % 250}.{i // 250}.{i % 250}:{8000 + j}"' for j in range(ENDPOINTS)]
        if i == 0:
            eps = [f'"{real.address}"'] + [f"{{ address = {e}, weight = 0 }}" for e in eps[1:]]
        lines.append(f"s{i} = [{', '.join(eps)}]\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def who(port: int) -> str:
    try:
        status, headers, _ = http_get("127.0.0.1", port, "/", {"Host": "s0"}, timeout=2)
    except OSError:
        return "error"
    return headers.get("x-backend", f"status {status}")


def run(services: int, args: argparse.Namespace, a: Backend, b: Backend, work: Path) -> Result:
    path = work / f"endpoints-{services}.toml"
    write_file(path, services, 0, a)
    outbound, admin = free_port(), free_port()
    instance = f"bench-disc-{os.getpid()}-{services}"
    config = work / f"meshd-{services}.toml"
    config.write_text(textwrap.dedent(f"""\
        workers = 1
        instance = "{instance}"
        state_dir = "{work}/state"
        metric_rows = {max(1024, 2 * services + 64)}
        [admin]
        listen = "127.0.0.1:{admin}"
        [[discovery]]
        name = "file"
        plugin = "static"
        file = "{path}"
        interval = "{args.interval}"
        [[listener]]
        name = "outbound"
        listen = "127.0.0.1:{outbound}"
        direction = "outbound"
        protocol = "http"
        """))
    m = Meshd(config, work / f"meshd-{services}.log", admin=f"127.0.0.1:{admin}",
              instance=instance)
    started = time.monotonic()
    m.start(timeout=120)
    try:
        ready_s = time.monotonic() - started
        pid = wait_for(lambda: (m.control_pids() or [0])[0], 10, what="the control process")
        wait_for(lambda: who(outbound) == "a", 10, what="traffic to s0")
        time.sleep(2.0)                          # let the first persist and publish settle
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(args.rest)
        rest_rate = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        rss = rss_mib(pid)

        traffic: list[float] = []
        c0, t0 = cpu_seconds(pid), time.monotonic()
        for cycle in range(1, args.cycles + 1):
            target = b if cycle % 2 else a
            write_file(path, services, cycle, target)
            written = time.monotonic()
            name = target.name
            wait_for(lambda: who(outbound) == name, 10, interval=0.005,  # noqa: B023
                     what=f"s0 to move to {name}")
            traffic.append((time.monotonic() - written) * 1000)
            time.sleep(max(0.0, written + args.spacing - time.monotonic()))
        elapsed = time.monotonic() - t0
        cycle_cpu = (cpu_seconds(pid) - c0) / args.cycles
        cycle_net = cycle_cpu - rest_rate * elapsed / args.cycles

        cycle = args.cycles + 1
        write_file(path, services, cycle, b if cycle % 2 else a)
        written = time.monotonic()
        last, want = f"s{services - 1}", f"10.{cycle % 250}."

        def visible() -> bool:
            _, _, raw = http_get("127.0.0.1", admin, "/endpoints", timeout=10)
            eps = json.loads(raw)["services"][last]["endpoints"]
            return bool(eps) and all(e["address"].startswith(want) for e in eps)
        wait_for(visible, 20, interval=0.02, what=f"{last} in /endpoints")
        all_visible = (time.monotonic() - written) * 1000
        return Result(services, ready_s, rss, rest_rate * 100, cycle_cpu * 1000, cycle_net * 1000, traffic,
                      all_visible, path.stat().st_size / 1024)
    finally:
        m.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--baseline", type=int, default=10)
    p.add_argument("--rest", type=float, default=10.0, help="seconds measured at rest")
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--spacing", type=float, default=2.0, help="seconds between rewrites")
    p.add_argument("--interval", default="1s", help="the static plugin's file poll interval")
    args = p.parse_args()

    a, b = Backend("a").start(), Backend("b").start()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-discovery-") as tmp:
            for n in (args.baseline, args.services):
                results.append(run(n, args, a, b, Path(tmp)))
    finally:
        a.stop()
        b.stop()

    exe = os.path.relpath(sys.executable)
    print(f"\n$ {shlex.join([sys.executable if exe.startswith('..') else exe, *sys.argv])}")
    print(f"control process of meshd (1 worker), static file mode, {ENDPOINTS} endpoints per "
          f"service, interval {args.interval}, {args.cycles} rewrites {args.spacing:g}s apart\n")
    head = ("services", "file KiB", "ready s", "RSS MiB", "rest CPU %", "CPU ms/cycle", "net",
            "s0 traffic ms (each cycle)", "all in /endpoints ms")
    rows = [(str(r.services), f"{r.file_kib:.0f}", f"{r.ready_s:.1f}", f"{r.rss_mib:.1f}",
             f"{r.rest_cpu_pct:.2f}", f"{r.cycle_cpu_ms:.0f}", f"{r.cycle_net_ms:.0f}",
             " ".join(f"{t:.0f}" for t in r.traffic_ms), f"{r.all_visible_ms:.0f}")
            for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for row in (head, *rows):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
