"""``python -m chaos run|soak ...``: see chaos/__init__.py."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="faults under load; exit 1 when an aim is missed")
    run.add_argument("--seconds", type=float, default=120)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--topology", choices=("one", "two"), default="one")
    run.add_argument("--out", type=Path, default=Path("chaos-results"))
    run.add_argument("--outage", type=float, default=None,
                     help="discovery outage seconds (default: seconds/8, 3..30)")
    run.add_argument("--allow-documented-resets", action="store_true",
                     help="counter resets the README documents (USR2: a new region; a new "
                          "control process's own counters) do not fail the run")
    run.add_argument("--kinds", default="", help="comma-separated fault kinds (default: all)")
    soak = sub.add_parser("soak", help="sustained load; RSS and fds sampled")
    soak.add_argument("--seconds", type=float, default=900)
    soak.add_argument("--out", type=Path, default=Path("chaos-results"))
    soak.add_argument("--plot", type=Path, default=None, help="PNG (needs matplotlib)")
    soak.add_argument("--burst-every", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.cmd == "run":
        from chaos.report import render
        from chaos.run import run_chaos
        report = run_chaos(args.seconds, args.seed, args.topology, args.out,
                           outage=args.outage,
                           kinds=tuple(k for k in args.kinds.split(",") if k) or None,
                           allow_documented=args.allow_documented_resets)
        print(render(report))
        print(f"report: {args.out}/chaos-{args.topology}.json and .txt")
        return 1 if report["aims_missed"] else 0
    from chaos.soak import render_soak, run_soak
    result = run_soak(args.seconds, args.out, plot=args.plot, burst_every=args.burst_every)
    print(render_soak(result))
    return 1 if result["aims_missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
