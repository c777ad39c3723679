"""Profile meshd's HTTP/1.1 keep-alive path per request (issue 17).

Starts the bench's nginx backend and a meshd with one worker (``bench.procs``), puts
wrk load on it and measures one of:

- ``cpu``: the worker's own CPU µs per request (utime+stime from /proc around a wrk run),
  the most stable figure on a shared machine; ``--rounds`` runs, each printed;
- ``strace``: ``strace -c -f`` on the worker during a wrk run: system calls per request;
  ``trace``: every call of a one-second run, to read;
- ``pyspy``: ``py-spy record`` of the worker under load (a flamegraph SVG and the raw
  collapsed stacks), ``--native`` to see C frames too; py-spy samples wall time, so on a
  busy machine a ``send`` preempted by the peer it woke looks expensive: read CPU from
  ``cpu``;
- ``perf``: ``perf record -g`` of the worker (interpreter and kernel C functions);
- ``cprofile``: exact Python calls per request (and cProfile's distorted times), the
  workers profiling themselves through ``profile_site/sitecustomize.py``.

``--tcp``: the same through an opaque TCP listener (``protocol = "tcp"``, the tunnel's
path) instead of the HTTP one.

Output goes to ``--out`` (default bench-results/profile). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CLK_TCK, RESULTS
from bench.load import parse_wrk
from bench.procs import backend_nginx, own_ticks, process_tree, start_meshd
from meshd.shm import STATE_SERVING
from meshd.testing.harness import free_port, wait_for


def wrk(port: int, duration: float, connections: int, threads: int = 1) -> tuple[int, float]:
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s",
                          "--latency", "-H", "Host: bench", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=duration + 30, check=True)
    rps, requests, *_rest, non_2xx, errors = parse_wrk(out.stdout)
    if non_2xx or errors:
        print(f"warning: non-2xx {non_2xx}, socket errors {errors}", file=sys.stderr)
    return requests, rps


def user_sys(pids: list[int]) -> tuple[int, int]:
    """utime and stime (clock ticks) summed over ``pids``."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("cpu", "strace", "trace", "pyspy", "perf", "cprofile"))
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--out", type=Path, default=RESULTS / "profile")
    ap.add_argument("--tag", default="")
    ap.add_argument("--extra", default="", help="more meshd config (e.g. [access_log])")
    ap.add_argument("--tcp", action="store_true",
                    help="an opaque TCP listener (protocol tcp, service bench) instead of HTTP")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    if args.mode == "cprofile":  # the workers profile themselves (profile_site/)
        os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parent / "profile_site")
        os.environ["MESHD_CPROFILE"] = str(args.out.resolve())
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshd-prof-")))
        backend_port, port = free_port(), free_port()
        backend = backend_nginx(workdir, backend_port).start()
        stack.callback(backend.stop)
        listeners = (f'[[listener]]\nname = "tcp"\nlisten = "127.0.0.1:{port}"\n'
                     f'direction = "outbound"\nprotocol = "tcp"\nservice = "bench"\n\n'
                     if args.tcp else None)
        meshd = start_meshd(workdir, args.workers, port, backend_port, name=f"prof{os.getpid()}",
                            listeners=listeners, extra=args.extra)
        stack.callback(meshd.stop)
        workers = []
        for _ in range(100):
            workers = meshd.worker_pids(STATE_SERVING)
            if len(workers) >= args.workers:
                break
            time.sleep(0.1)
        if not workers:
            print("no worker found", file=sys.stderr)
            return 1
        wrk(port, 1, args.connections)  # warm-up
        if args.mode == "cpu":
            for i in range(args.rounds):
                others = [p for p in process_tree(meshd.pid) if p not in workers]
                o0 = own_ticks(others)
                u0, s0 = user_sys(workers)
                requests, rps = wrk(port, args.duration, args.connections)
                u1, s1 = user_sys(workers)
                o1 = own_ticks(others)
                rest = {p: (o1[p] - o0.get(p, 0)) * 1e6 / CLK_TCK / requests for p in o1}
                print("  master/control µs/req: " + ", ".join(f"{p}: {v:.1f}" for p, v in rest.items()))
                per = 1e6 / CLK_TCK / requests
                print(f"round {i}: {requests} requests, {rps:,.0f} req/s, worker CPU "
                      f"{(u1 - u0 + s1 - s0) * per:.1f} µs/req (user {(u1 - u0) * per:.1f}, "
                      f"sys {(s1 - s0) * per:.1f})")
        elif args.mode == "trace":  # every call of a short run, for reading
            out = args.out / f"strace-calls{tag}.txt"
            proc = subprocess.Popen(["strace", "-f", "-tt", "-o", str(out),
                                     *(a for w in workers for a in ("-p", str(w)))])
            time.sleep(1.0)
            requests, rps = wrk(port, 1, 2)
            proc.send_signal(2)
            proc.wait(10)
            print(f"{requests} requests; {out}")
        elif args.mode == "strace":
            out = args.out / f"strace{tag}.txt"
            proc = subprocess.Popen(["strace", "-c", "-f", "-o", str(out),
                                     *(a for w in workers for a in ("-p", str(w)))])
            time.sleep(1.0)
            requests, rps = wrk(port, args.duration, args.connections)
            proc.send_signal(2)
            proc.wait(10)
            text = out.read_text()
            lines = [f"# {requests} requests ({rps:,.0f} req/s under strace), "
                     f"{args.connections} connections"]
            for line in text.splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)$", line)
                if m:
                    calls, errs, name = int(m[1]), int(m[2] or 0), m[3]
                    lines.append(f"{name:20s} {calls / requests:7.3f}/req  errors "
                                 f"{errs / requests:.3f}/req")
                elif "total" in line:
                    m2 = re.search(r"\s(\d+)\s+(\d+)?\s*total", line)
                    if m2:
                        lines.append(f"{'total':20s} {int(m2[1]) / requests:7.3f}/req")
            summary = "\n".join(lines)
            (args.out / f"strace{tag}-per-request.txt").write_text(summary + "\n\n" + text)
            print(summary)
        elif args.mode == "cprofile":  # exact call counts per request
            stats_file = args.out / f"{workers[0]}.prof"
            ignored = args.out / "ignored.prof"
            stats_file.unlink(missing_ok=True)
            os.kill(workers[0], signal.SIGUSR1)  # what the warm-up ran: subtracted below
            wait_for(stats_file.exists, 10)
            time.sleep(0.5)
            stats_file.rename(ignored)
            requests, rps = wrk(port, args.duration, args.connections)
            os.kill(workers[0], signal.SIGUSR1)
            wait_for(stats_file.exists, 10)
            time.sleep(0.5)
            st = pstats.Stats(str(stats_file))
            text = io.StringIO()
            base = pstats.Stats(str(ignored)).stats  # type: ignore[attr-defined]
            rows = []
            total_calls = 0
            for key, (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
                b = base.get(key, (0, 0, 0.0, 0.0, {}))
                ncalls, tot = nc - b[1], tt - b[2]
                total_calls += ncalls
                rows.append((ncalls, tot, key))
            rows.sort(key=lambda r: -r[1])
            text.write(f"# {requests} requests; {total_calls / requests:.1f} Python-visible "
                       f"calls/request\n# calls/req  tottime µs/req  function\n")
            for ncalls, tot, (file, line, fn) in rows[:120]:
                text.write(f"{ncalls / requests:9.2f} {tot * 1e6 / requests:9.2f}  "
                           f"{fn} ({file.split('site-packages/')[-1]}:{line})\n")
            out = args.out / f"cprofile{tag}.txt"
            out.write_text(text.getvalue())
            print(text.getvalue()[:400])
            print(out)
        elif args.mode == "perf":  # the interpreter's C functions and the kernel's
            data = args.out / f"perf{tag}.data"
            proc = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(data),
                                     "-p", ",".join(map(str, workers))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            requests, rps = wrk(port, args.duration, args.connections)
            proc.send_signal(2)
            proc.wait(30)
            report = subprocess.run(["perf", "report", "-i", str(data), "--no-children",
                                     "--sort", "dso,sym", "--stdio", "-g", "none"],
                                    capture_output=True, text=True).stdout
            (args.out / f"perf{tag}.txt").write_text(f"# {requests} requests\n" + report)
            print(f"{requests} requests; {args.out / f'perf{tag}.txt'}")
        else:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            svg = args.out / f"flame{tag}.svg"
            raw = args.out / f"flame{tag}.txt"
            common = ["-p", str(workers[0]), "-d", str(int(args.duration)), "-r", str(args.rate),
                      "--nonblocking"] + (["--native"] if args.native else [])
            p1 = subprocess.Popen([spy, "record", "-o", str(svg), *common],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            p2 = subprocess.Popen([spy, "record", "-f", "raw", "-o", str(raw), *common],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            requests, rps = wrk(port, args.duration + 1, args.connections)
            p1.wait(30)
            p2.wait(30)
            print(f"{requests} requests, {rps:,.0f} req/s; {svg}, {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
