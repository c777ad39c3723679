"""Two meshd hops as the bench's two-hop scenario builds them (A -> HTTP/2 -> B ->
HTTP/1.1 -> the nginx backend, one worker each), under the bench's open-loop load at
``--rate`` requests/s (issue 17, docs/perf/two-hop.md). Modes:

- ``lat``: direct and two-hop latency alternated, ``--rounds`` times (p50/p90/p99 ms);
- ``cpu``: A's and B's worker CPU (user, sys) µs per request at the rate;
- ``strace``: system calls per request of each worker (``strace -c``);
- ``trace``: every call of each worker with times (``strace -tt -T``), to read;
- ``cprofile``: Python calls per request of each worker, the workers profiling themselves
  (``profile_site``; cProfile's times are inflated, its counts exact).

Run from the tree to measure: ``.venv/bin/python -m scripts.two_hop_profile MODE``.
Output files go to ``--out``. Not part of the test suite."""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import CLK_TCK, RESULTS
from bench.load import open_loop
from bench.procs import backend_nginx, start_meshd
from meshd.shm import STATE_SERVING
from meshd.testing.harness import free_port


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else float("nan")


def ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def dump(pid: int, out: Path) -> Any:
    """The worker's cProfile stats so far (it dumps them on SIGUSR1)."""
    f = out / f"{pid}.prof"
    f.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(100):
        if f.exists():
            break
        time.sleep(0.1)
    time.sleep(0.5)
    stats = pstats.Stats(str(f)).stats  # type: ignore[attr-defined]
    f.unlink()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("lat", "cpu", "strace", "trace", "cprofile"))
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", type=Path, default=RESULTS / "two-hop-profile")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "cprofile":
        here = os.getcwd()
        os.environ["PYTHONPATH"] = f"{here}/scripts/profile_site:{here}"
        os.environ["MESHD_CPROFILE"] = str(out)
    rate, secs, conns = args.rate, args.seconds, args.connections
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshd-hops-")))
        backend_port, b_port, a_port = free_port(), free_port(), free_port()
        backend = backend_nginx(workdir, backend_port).start()
        stack.callback(backend.stop)
        b = start_meshd(workdir, 1, 0, backend_port, name=f"hops-b{os.getpid()}", listeners=(
            f'[[listener]]\nname = "inbound"\nlisten = "127.0.0.1:{b_port}"\n'
            f'direction = "inbound"\nprotocol = "auto"\nforward = "127.0.0.1:{backend_port}"\n\n'))
        stack.callback(b.stop)
        a = start_meshd(workdir, 1, a_port, backend_port, name=f"hops-a{os.getpid()}", services=(
            f'web = [{{ address = "127.0.0.1:{backend_port}", meshed = true, '
            f'inbound_port = {b_port} }}]\n'))
        stack.callback(a.stop)
        pids: dict[str, int] = {}
        for _ in range(100):
            wa, wb = a.worker_pids(STATE_SERVING), b.worker_pids(STATE_SERVING)
            if wa and wb:
                pids = {"A": wa[0], "B": wb[0]}
                break
            time.sleep(0.1)
        open_loop(a_port, "web", rate, 1.0, conns)  # warm-up
        if args.mode == "lat":
            for r in range(args.rounds):
                line = []
                for name, port, host in (("direct", backend_port, "bench"),
                                         ("two-hop", a_port, "web")):
                    t, errors, _wall = open_loop(port, host, rate, secs, conns)
                    line.append(f"{name} p50 {pct(t, 50):.3f} p90 {pct(t, 90):.3f} "
                                f"p99 {pct(t, 99):.3f}" + (f" errors {errors}" if errors else ""))
                print(f"round {r}: " + "; ".join(line), flush=True)
            return 0
        if args.mode == "cpu":
            for r in range(args.rounds):
                before = {k: ticks(p) for k, p in pids.items()}
                t, _errors, _wall = open_loop(a_port, "web", rate, secs, conns)
                after = {k: ticks(p) for k, p in pids.items()}
                per = 1e6 / CLK_TCK / len(t)
                print(f"round {r}: {len(t)} requests, p50 {pct(t, 50):.3f} ms; " + "; ".join(
                    f"{k} user {(after[k][0] - before[k][0]) * per:.0f} sys "
                    f"{(after[k][1] - before[k][1]) * per:.0f} µs/req" for k in pids), flush=True)
            return 0
        if args.mode == "cprofile":
            base = {k: dump(p, out) for k, p in pids.items()}
            t, _errors, _wall = open_loop(a_port, "web", rate, secs, conns)
            n = len(t)
            for k, p in pids.items():
                stats, rows = dump(p, out), []
                for key, (_cc, nc, tt, ct, _callers) in stats.items():
                    x = base[k].get(key, (0, 0, 0.0, 0.0, {}))
                    rows.append((nc - x[1], tt - x[2], ct - x[3], key))
                print(f"-- {k}: {sum(r[0] for r in rows) / n:.0f} Python calls/request; "
                      f"calls/req, tottime and cumtime µs/req (cProfile's, inflated)")
                rows.sort(key=lambda r: -r[1])
                for nc, tt, ct, (file, line, fn) in rows[:args.top]:
                    where = file.split("site-packages/")[-1].replace(os.getcwd() + "/", "")
                    print(f"  {nc / n:7.2f} {tt * 1e6 / n:7.1f} {ct * 1e6 / n:7.1f}  "
                          f"{fn} ({where}:{line})")
            return 0
        procs = []
        for k, p in pids.items():
            cmd = ["strace", "-f", "-o", str(out / f"{args.mode}-{k}.txt"), "-p", str(p)]
            cmd[1:1] = ["-c"] if args.mode == "strace" else ["-tt", "-T"]
            procs.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
        time.sleep(1)
        t, errors, _wall = open_loop(a_port, "web", rate, secs, conns)
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
        n = len(t)
        print(f"{n} requests, errors {errors}, p50 {pct(t, 50):.3f} p99 {pct(t, 99):.3f} ms "
              f"(under strace); files in {out}")
        if args.mode == "strace":
            for k in pids:
                print(f"-- {k}")
                for line in (out / f"strace-{k}.txt").read_text().splitlines():
                    m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)$", line)
                    if m and int(m[1]) / n >= 0.01:
                        print(f"  {m[3]:16s} {int(m[1]) / n:6.2f}/req  errors "
                              f"{int(m[2] or 0) / n:.2f}/req")
    return 0


if __name__ == "__main__":
    sys.exit(main())
