"""The command line: options, then the selected scenarios in one run."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.capacity import scenario_idle, scenario_tcp
from bench.common import CHOICES, IDLE_CONNECTIONS, RESULTS, ROOT, SCENARIOS, TARGETS, BenchError
from bench.procs import backend_nginx, distinct_free_ports, serve_slow
from bench.scenarios import (
    scenario_balancing,
    scenario_h2,
    scenario_http1,
    scenario_slow,
    scenario_two_hop,
)

# -- the run --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import bench

    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=(bench.__doc__ or "").split("\n")[0] or None)
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
    parser.add_argument("--idle", type=int, default=IDLE_CONNECTIONS,
                        help="idle: keep-alive client connections held on one worker")
    parser.add_argument("--access-log", choices=("text", "json"),
                        help="http1 scenario: each meshd target also runs as TARGET+alog, "
                             "[access_log] in this format to a file, measured in the same "
                             "rounds; the per-round req/s and CPU/req ratios to the plain "
                             "target are printed")
    parser.add_argument("--tap", action="store_true",
                        help="http1 scenario: beside each meshd target, a twin with one tap "
                             "attached (curl reading admin /tap), measured in the same rounds")
    parser.add_argument("--tracing", nargs="?", const="receiver",
                        choices=("receiver", "dead", "control"),
                        help="http1 scenario: each meshd target also runs as TARGET+tracing, "
                             "[tracing] sample_rate 0.01 exporting to a local OTLP receiver "
                             "(or to a dead endpoint: \"dead\"; \"control\": the twin "
                             "without [tracing], the pairing's own bias); the per-round "
                             "req/s ratio to the plain target is printed")
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
            or args.rate_connections < 1 or args.hop_workers < 1 or args.idle < 1):
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
            if "tcp" in names:
                with contextlib.ExitStack() as own:
                    scenario_tcp(backend_port, workdir, args, own)
            if "idle" in names:
                with contextlib.ExitStack() as own:
                    scenario_idle(backend_port, workdir, args, own)
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
