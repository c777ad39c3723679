"""Profile meshd's HTTP/1.1 keep-alive path per request (issue 17).

Starts the bench's nginx backend and a meshd with one worker (``bench.procs``), puts
wrk load on it (``--h2``: h2load, HTTP/2 with prior knowledge, ``--connections`` x
``--streams`` concurrent streams, as the bench's h2 scenario) and measures one of:

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
  workers profiling themselves through ``profile_site/sitecustomize.py``;
- ``gc``: the worker's garbage collections per request, by generation, and the CPU time
  spent in them (``gc.callbacks``, through ``profile_site/sitecustomize.py`` too).

``--access-log text|json`` adds an ``[access_log]`` writing to a file in the run's
temporary directory (what it costs: docs/perf/access-log.md).

``--tcp``: the same through an opaque TCP listener (``protocol = "tcp"``, the tunnel's
path) instead of the HTTP one.

Output goes to ``--out`` (default bench-results/profile). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
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


def h2load(port: int, duration: float, connections: int, streams: int,
           rps: int = 0) -> tuple[int, float]:
    """A timed h2load run (h2c, prior knowledge): requests that succeeded and their rate.
    ``rps``: a fixed rate per connection (the same load whatever the code's speed, so
    the same number of streams served per loop iteration), else as fast as it goes."""
    out = subprocess.run(["h2load", f"-c{connections}", f"-m{streams}", "-t1",
                          f"-D{duration:g}", "-H", ":authority: bench",
                          *([f"--rps={rps}"] if rps else []),
                          f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=duration + 30, check=True)
    m = re.search(r"^requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed",
                  out.stdout, re.M)
    took = re.search(r"^finished in ([\d.]+)s", out.stdout, re.M)
    if m is None or took is None:
        raise RuntimeError(f"h2load: {out.stdout}{out.stderr}")
    if int(m[2]):
        print(f"warning: {m[2]} requests failed", file=sys.stderr)
    return int(m[1]), int(m[1]) / float(took[1])


def user_sys(pids: list[int]) -> tuple[int, int]:
    """utime and stime (clock ticks) summed over ``pids``."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def gc_stats(out: Path, worker: int) -> dict[str, list[float]]:
    """The worker's garbage collection counts so far (profile_site/sitecustomize.py)."""
    path = out / f"{worker}.gc.json"
    path.unlink(missing_ok=True)
    os.kill(worker, signal.SIGUSR1)
    wait_for(path.exists, 10)
    data: dict[str, list[float]] = json.loads(path.read_text())
    return data


def focus_share(raw: Path, focus: str) -> str:
    """The share of py-spy's samples (the raw collapsed stacks) with a frame of a file
    matching ``focus`` on the stack, and of those the leaf-most such functions: a
    share of the worker's busy time that other load on the machine does not skew as it
    skews CPU time per request."""
    pattern = re.compile(rf"\(\S*(?:{focus})\S*\.py:\d+\)")
    total = hit = 0
    where: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if pattern.search(f)]
        if frames:
            hit += n
            name = frames[-1].split(" (")[0]
            where[name] = where.get(name, 0) + n
    top = sorted(where.items(), key=lambda kv: -kv[1])[:8]
    return (f"{hit} of {total} samples ({hit / max(total, 1):.1%}) in {focus}: "
            + ", ".join(f"{name} {n}" for name, n in top))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("cpu", "strace", "trace", "pyspy", "perf", "cprofile",
                                        "gc"))
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--out", type=Path, default=RESULTS / "profile")
    ap.add_argument("--tag", default="")
    ap.add_argument("--extra", default="", help="more meshd config (e.g. [tracing])")
    ap.add_argument("--focus", default="",
                    help="pyspy: a regex of file names (e.g. 'access_log|observe'): the "
                         "share of the samples with a frame of theirs on the stack")
    ap.add_argument("--access-log", choices=("text", "json"),
                    help="[access_log] in this format, to a file in the temporary directory")
    ap.add_argument("--h2", action="store_true", help="h2load (HTTP/2 clients), not wrk")
    ap.add_argument("--streams", type=int, default=10, help="h2load -m: streams per connection")
    ap.add_argument("--rps", type=int, default=0, help="h2load --rps: requests/s per connection")
    ap.add_argument("--tcp", action="store_true",
                    help="an opaque TCP listener (protocol tcp, service bench) instead of HTTP")
    args = ap.parse_args()
    def load(port: int, duration: float, connections: int) -> tuple[int, float]:
        if args.h2:
            return h2load(port, duration, connections, args.streams, args.rps)
        return wrk(port, duration, connections)

    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    if args.mode == "cprofile":  # the workers profile themselves (profile_site/)
        site = str(Path(__file__).resolve().parent / "profile_site")
        os.environ["PYTHONPATH"] = os.pathsep.join(  # kept: PYTHONPATH=OLD-TREE profiles it
            p for p in (site, os.environ.get("PYTHONPATH")) if p)
        os.environ["MESHD_CPROFILE"] = str(args.out.resolve())
    if args.mode == "gc":
        os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parent / "profile_site")
        os.environ["MESHD_GCSTATS"] = str(args.out.resolve())
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshd-prof-")))
        backend_port, port = free_port(), free_port()
        backend = backend_nginx(workdir, backend_port).start()
        stack.callback(backend.stop)
        extra = args.extra
        if args.access_log:
            extra += (f'\n[access_log]\npath = "{workdir}/access.log"\n'
                      f'format = "{args.access_log}"\n')
        listeners = (f'[[listener]]\nname = "tcp"\nlisten = "127.0.0.1:{port}"\n'
                     f'direction = "outbound"\nprotocol = "tcp"\nservice = "bench"\n\n'
                     if args.tcp else None)
        meshd = start_meshd(workdir, args.workers, port, backend_port, name=f"prof{os.getpid()}",
                            listeners=listeners, extra=extra)
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
        load(port, 1, args.connections)  # warm-up
        if args.mode == "cpu":
            for i in range(args.rounds):
                others = [p for p in process_tree(meshd.pid) if p not in workers]
                o0 = own_ticks(others)
                u0, s0 = user_sys(workers)
                requests, rps = load(port, args.duration, args.connections)
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
            requests, rps = load(port, 1, 2)
            proc.send_signal(2)
            proc.wait(10)
            print(f"{requests} requests; {out}")
        elif args.mode == "strace":
            out = args.out / f"strace{tag}.txt"
            proc = subprocess.Popen(["strace", "-c", "-f", "-o", str(out),
                                     *(a for w in workers for a in ("-p", str(w)))])
            time.sleep(1.0)
            requests, rps = load(port, args.duration, args.connections)
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
            switches_file = args.out / f"{workers[0]}.switches"
            switched = int(switches_file.read_text() or 0)
            requests, rps = load(port, args.duration, args.connections)
            os.kill(workers[0], signal.SIGUSR1)
            wait_for(stats_file.exists, 10)
            time.sleep(0.5)
            switched = int(switches_file.read_text() or 0) - switched
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
                       f"calls/request; {switched / requests:.2f} greenlet switches/request\n"
                       f"# calls/req  tottime µs/req  function\n")
            for ncalls, tot, (file, line, fn) in rows[:120]:
                text.write(f"{ncalls / requests:9.2f} {tot * 1e6 / requests:9.2f}  "
                           f"{fn} ({file.split('site-packages/')[-1]}:{line})\n")
            out = args.out / f"cprofile{tag}.txt"
            out.write_text(text.getvalue())
            print(text.getvalue()[:400])
            print(out)
        elif args.mode == "gc":
            for i in range(args.rounds):
                before = gc_stats(args.out, workers[0])
                requests, rps = load(port, args.duration, args.connections)
                after = gc_stats(args.out, workers[0])
                per = {k: [(b - a) / requests for a, b in zip(before[k], after[k], strict=True)]
                       for k in ("collections", "collected", "cpu_s")}
                print(f"round {i}: {requests} requests, {rps:,.0f} req/s; per 1000 requests "
                      "collections gen0/1/2 "
                      + " / ".join(f"{x * 1000:.2f}" for x in per["collections"])
                      + "; objects collected per request "
                      + " / ".join(f"{x:.3f}" for x in per["collected"])
                      + "; CPU µs/req in gc "
                      + " / ".join(f"{x * 1e6:.2f}" for x in per["cpu_s"])
                      + f" (total {sum(per['cpu_s']) * 1e6:.2f}; thresholds "
                      f"{after['thresholds']})")
        elif args.mode == "perf":  # the interpreter's C functions and the kernel's
            data = args.out / f"perf{tag}.data"
            proc = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", str(data),
                                     "-p", ",".join(map(str, workers))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            requests, rps = load(port, args.duration, args.connections)
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
            requests, rps = load(port, args.duration + 1, args.connections)
            p1.wait(30)
            p2.wait(30)
            print(f"{requests} requests, {rps:,.0f} req/s; {svg}, {raw}")
            if args.focus:
                print(focus_share(raw, args.focus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
