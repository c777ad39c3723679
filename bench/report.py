"""Rounds, reports and results: what every scenario shares (round-robin rounds,
medians and ratios, the markdown tables, the JSON files)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TypeVar

from bench.common import RESULTS, Round
from bench.load import Counter, RateRound, measure
from bench.procs import check_answers

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
