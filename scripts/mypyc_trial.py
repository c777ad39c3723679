"""Would compiling meshd's pure-CPU modules with mypyc pay? (issue 17; docs/perf/mypyc.md)

Copies the tree's ``meshd`` package into a temporary directory, compiles ``--modules``
there with mypyc (part of mypy; needs gcc and the Python headers), then times the
per-request functions of those modules on the bench's path (one HTTP/1.1 request through
one endpoint), pure and compiled in alternating child processes, best of ``--rounds``,
``time.process_time``. The table's last line weighs each function by its calls per
request (``perf_profile cprofile``), which is what compiling would save per request.

    .venv/bin/python scripts/mypyc_trial.py                  # compile, time, print
    .venv/bin/python scripts/mypyc_trial.py --tests tests/test_http1.py ...
    .venv/bin/python scripts/mypyc_trial.py --whole 3        # perf_profile cpu, alternated
    .venv/bin/python scripts/mypyc_trial.py --keep /tmp/b --reuse --no-bench --whole 3

``--tests`` runs pytest files against the compiled copy (its meshd processes too: they
start in the copy's directory); ``--whole N`` alternates N pairs of ``perf_profile cpu``
runs (the worker's CPU µs per request, pure and compiled; ``--together`` runs each pair
at once, so both see the same load). ``--keep DIR`` builds in DIR
and leaves it. Not part of the test suite; nothing here is installed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Pure-CPU modules on the request path, no gevent. Left out: meshd/errors.py (mypyc turns
# class attributes into instance defaults, and ``Forbidden.reason`` / ``type(err).reason``
# read them from the class), and every module that waits on gevent sockets.
MODULES = ("meshd/proto/http1.py", "meshd/proto/translate.py", "meshd/balance/ewma.py",
           "meshd/balance/p2c.py", "meshd/balance/ejection.py", "meshd/shm.py",
           "meshd/decisions.py", "meshd/rowkeys.py", "meshd/snapshot.py",
           "meshd/worker/balancer.py", "meshd/worker/decisions.py",
           "meshd/worker/routing.py", "meshd/metrics.py")

MYPY_INI = "[mypy]\npython_version = 3.11\nignore_missing_imports = True\n"

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"  # what wrk sends in the bench
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 08 Dec 2026 00:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n")

# Calls per request on the bench's path (perf_profile cprofile, one endpoint).
PER_REQUEST = {"parse_request_head": 1, "parse_response_head": 1, "strip_hop_by_hop": 2,
               "serialize_request_head": 1, "serialize_response_head": 1,
               "balancer.pick (1 endpoint)": 1, "balancer.started/finished": 1,
               "stripe.add+record_response": 1, "DecisionRing.record": 1,
               "balancer.pick (3 endpoints)": 0}


def compile_modules(dest: Path, modules: tuple[str, ...]) -> Path:
    """A copy of meshd in ``dest`` with ``modules`` compiled in place; returns the log."""
    shutil.copytree(ROOT / "meshd", dest / "meshd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (dest / "mypy.ini").write_text(MYPY_INI)
    log = dest / "mypyc-build.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "mypyc", *modules], cwd=dest,
                              stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode:
        sys.exit(f"mypyc failed (exit {proc.returncode}); see {log}:\n"
                 + "\n".join(line for line in log.read_text().splitlines()
                             if ": error:" in line or "Error" in line))
    missing = [m for m in modules if not list((dest / m).parent.glob(Path(m).stem + ".*.so"))]
    if missing:
        sys.exit(f"no extension built for {missing}; see {log}")
    return log


def child_env(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT)])
    return env


def check_compiled(build: Path, modules: tuple[str, ...]) -> None:
    """Fail unless the copy's processes import the extensions, not the sources."""
    names = [m[:-3].replace("/", ".") for m in modules]
    code = ("import importlib, sys\n"
            f"bad = [n for n in {names!r} if not importlib.import_module(n).__file__"
            ".endswith('.so')]\n"
            "sys.exit(f'not compiled: {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], cwd=build, env=child_env(build),
                   check=True, timeout=120)


# -- the timed cases (run in a child: --bench-child) ------------------------------------

def _cases() -> dict[str, Callable[[], object]]:
    import random

    from meshd import decisions as fmt
    from meshd.config import ServiceConfig
    from meshd.discovery.api import Endpoint
    from meshd.proto import http1
    from meshd.shm import F_REQUESTS, KIND_WORKER, Region
    from meshd.worker.balancer import SharedBalancer
    from meshd.worker.decisions import DecisionRing

    tmp = tempfile.mkdtemp(prefix="mypyc-trial-")
    region = Region.create(os.path.join(tmp, "r.shm"), 16, 8, endpoint_rows=64)
    for s in range(2):
        region.claim_slot(s, 1, KIND_WORKER)
        region.set_pid(s, 1000 + s)
    svc = ServiceConfig(name="web")
    stripe = region.stripe(0)
    req = http1.parse_request_head(REQUEST)
    resp = http1.parse_response_head(RESPONSE)
    cases: dict[str, Callable[[], object]] = {
        "parse_request_head": lambda: http1.parse_request_head(REQUEST),
        "parse_response_head": lambda: http1.parse_response_head(RESPONSE),
        "strip_hop_by_hop": lambda: http1.strip_hop_by_hop(req.headers, req.connection_tokens),
        "serialize_request_head": lambda: http1.serialize_request_head(
            b"GET", b"/", req.headers, [(b"x-forwarded-for", b"127.0.0.1")]),
        "serialize_response_head": lambda: http1.serialize_response_head(
            200, b"OK", resp.headers, [(b"content-length", b"100")]),
    }
    balancers = {}
    for n in (1, 3):
        eps = tuple(Endpoint(f"10.0.0.{i}", 80) for i in range(n))
        rows = {str(e): i for i, e in enumerate(eps)}
        bal = balancers[n] = SharedBalancer(region, 0, rng=random.Random(1))
        bal.pick("web", eps, rows, svc)
        cases[f"balancer.pick ({n} endpoint{'s' if n > 1 else ''})"] = functools.partial(
            bal.pick, "web", eps, rows, svc)

    def started_finished(bal: SharedBalancer = balancers[1]) -> None:
        bal.started(0)
        bal.connection_delta(0, 1)
        bal.connection_delta(0, -1)
        bal.finished(0, 0.0005, False, svc)

    cases["balancer.started/finished"] = started_finished
    def counted() -> None:
        stripe.add(3, F_REQUESTS)
        stripe.record_response(3, 200, 0.0005, False)

    cases["stripe.add+record_response"] = counted
    fd, path = tempfile.mkstemp(dir=tmp)
    os.close(fd)
    ring = DecisionRing(fmt.create(path, 0, 1, 1), path)
    seen = balancers[1].last
    cases["DecisionRing.record"] = lambda: ring.record(b"web", b"", 1, False, 200, 0.001,
                                                       b"ok", b"", b"", seen)
    return cases


def bench_child(count: int, repeat: int) -> None:
    best = {}
    for name, fn in _cases().items():
        fn()
        b = float("inf")
        for _ in range(repeat):
            t = time.process_time()
            for _ in range(count):
                fn()
            b = min(b, time.process_time() - t)
        best[name] = b / count * 1e6
    print(json.dumps(best))


def run_bench(build: Path, rounds: int, count: int) -> None:
    best: dict[str, dict[str, float]] = {"pure": {}, "compiled": {}}
    for r in range(rounds):
        for label, path in (("pure", ROOT), ("compiled", build)):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bench-child",
                                  "--count", str(count)], cwd=path, env=child_env(path),
                                 capture_output=True, text=True, check=True, timeout=600)
            for name, us in json.loads(out.stdout).items():
                best[label][name] = min(best[label].get(name, us), us)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    pure, comp = best["pure"], best["compiled"]
    print("\n| function (bench path) | calls/req | pure µs | compiled µs | ratio |")
    print("|---|---:|---:|---:|---:|")
    saved = total = 0.0
    for name in pure:
        k = PER_REQUEST.get(name, 0)
        saved += k * (pure[name] - comp[name])
        total += k * pure[name]
        print(f"| {name} | {k} | {pure[name]:.2f} | {comp[name]:.2f} | "
              f"{comp[name] / pure[name]:.2f} |")
    print(f"| **per request** (weighted) | | {total:.2f} | {total - saved:.2f} | "
          f"{(total - saved) / total:.2f} |")
    print(f"\nsaved per request: {saved:.2f} µs (of the worker's ~100 µs CPU per request)")


def run_whole(build: Path, pairs: int, duration: float, together: bool) -> None:
    """perf_profile cpu runs, pure from the tree and compiled from the copy: one after the
    other, or with ``together`` both at once (each its own backend, meshd and wrk), so
    that both see the same load from the rest of a shared machine."""
    figures: dict[str, list[float]] = {"pure": [], "compiled": []}
    for i in range(pairs):
        procs = {}
        for label, path in (("pure", ROOT), ("compiled", build)):
            procs[label] = subprocess.Popen(
                [sys.executable, "-m", "scripts.perf_profile", "cpu", "--rounds", "3",
                 "--duration", str(duration)], cwd=path, env=child_env(path),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if not together:
                procs[label].wait(timeout=300)
        for label, proc in procs.items():
            out, _ = proc.communicate(timeout=300)
            got = [float(x) for x in re.findall(r"worker CPU ([0-9.]+)", out)]
            if not got:
                print(out, file=sys.stderr)
            figures[label] += got
            print(f"pair {i + 1} {label}: {got} µs/req (load {os.getloadavg()[0]:.1f})")
    for label, got in figures.items():
        if got:
            print(f"{label}: mean {sum(got) / len(got):.1f}, median {sorted(got)[len(got) // 2]:.1f}"
                  f", min {min(got):.1f} µs/req ({len(got)} rounds)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", nargs="+", default=list(MODULES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--tests", nargs="*", default=[], help="pytest files to run compiled")
    ap.add_argument("--whole", type=int, default=0, help="pairs of perf_profile cpu runs")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--together", action="store_true", help="--whole: both builds at once")
    ap.add_argument("--keep", type=Path, help="build here and keep it")
    ap.add_argument("--reuse", action="store_true", help="use the --keep build if there")
    ap.add_argument("--no-bench", action="store_true", help="skip the per-function table")
    ap.add_argument("--bench-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bench_child:
        bench_child(args.count, 5)
        return 0
    modules = tuple(args.modules)
    with tempfile.TemporaryDirectory(prefix="meshd-mypyc-") as tmp:
        build = args.keep or Path(tmp)
        build.mkdir(parents=True, exist_ok=True)
        if not (args.reuse and (build / "mypyc-build.log").exists()):
            t = time.monotonic()
            log = compile_modules(build, modules)
            print(f"compiled {len(modules)} modules in {time.monotonic() - t:.0f} s ({log})")
        check_compiled(build, modules)
        if not args.no_bench:
            run_bench(build, args.rounds, args.count)
        if args.tests:
            subprocess.run([str(Path(sys.executable).parent / "pytest"), "-q",
                            "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                            "-c", str(ROOT / "pyproject.toml"),
                            *(str(ROOT / f) for f in args.tests)],
                           cwd=build, env=child_env(build), timeout=1800)
        if args.whole:
            run_whole(build, args.whole, args.duration, args.together)
    return 0


if __name__ == "__main__":
    sys.exit(main())
