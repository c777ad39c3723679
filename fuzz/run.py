"""Run the fuzz targets under atheris (libFuzzer), one after another, each for a bounded time.

    python -m fuzz.run [--seconds N] [TARGET ...]     # all targets when none is named
    python -m fuzz.run --one TARGET --seconds N       # one target in this process

Each target runs in its own process (atheris instruments meshd's modules as that process
imports them, and a crash ends only that target). libFuzzer starts from the seeds in
``fuzz/corpus/<target>/`` (kept in the repo, never written) and keeps what it finds in
``.fuzz/corpus/<target>/``, so later runs go on from there; a crashing input is written
to ``.fuzz/crashes/<target>-crash-<sha1>`` and the run's log to ``.fuzz/logs/<target>.log``.
Prints executions per target; exits 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

from fuzz import TARGETS

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "corpus"
STATE = ROOT / ".fuzz"


def run_one(name: str, seconds: int, extra: list[str]) -> None:
    import atheris  # only here: the targets themselves never need it

    # startswith/endswith compare feedback. Not "RegEx": atheris 3.0's pattern proxy
    # takes no pos/endpos (http1 calls fullmatch(head, start, eol)) and skips possessive
    # quantifiers, which meshd's patterns use.
    atheris.enabled_hooks.add("str")
    with atheris.instrument_imports(include=["meshd"]):
        target = importlib.import_module(f"fuzz.fuzz_{name}")
    work = STATE / "corpus" / name
    work.mkdir(parents=True, exist_ok=True)
    (STATE / "crashes").mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], str(work), str(SEEDS / name),
            f"-max_total_time={seconds}", f"-max_len={target.MAX_LEN}",
            f"-artifact_prefix={STATE / 'crashes'}/{name}-",
            "-print_final_stats=1", "-timeout=30", "-rss_limit_mb=2048", *extra]
    atheris.Setup(args, target.one_input)
    atheris.Fuzz()


def _stats(log: str) -> dict[str, str]:
    found = dict(re.findall(r"^stat::(\w+):\s*(\d+)", log, re.MULTILINE))
    m = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    if m:
        found["cov"], found["ft"], found["corpus"] = m[-1]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help=f"of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--one", help="run this target in this process")
    parser.add_argument("--libfuzzer", action="append", default=[],
                        help="an extra libFuzzer flag, e.g. --libfuzzer=-jobs=2")
    opts = parser.parse_args()
    if opts.one:
        run_one(opts.one, opts.seconds, opts.libfuzzer)
        return 0
    targets = opts.targets or list(TARGETS)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; known: {', '.join(TARGETS)}")
    (STATE / "logs").mkdir(parents=True, exist_ok=True)
    rows, crashed = [], []
    for name in targets:
        log_path = STATE / "logs" / f"{name}.log"
        started = time.monotonic()
        print(f"fuzz {name}: {opts.seconds}s ...", flush=True)
        with open(log_path, "w") as log_file:
            cmd = [sys.executable, "-m", "fuzz.run", "--one", name, "--seconds", str(opts.seconds),
                   *[f"--libfuzzer={flag}" for flag in opts.libfuzzer]]
            # Bounded even if libFuzzer's own clock fails: its time plus loading the corpus.
            try:
                rc = subprocess.call(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                     timeout=opts.seconds * 2 + 120)
            except subprocess.TimeoutExpired:  # call() has killed it
                rc = -1
        elapsed = time.monotonic() - started
        log = log_path.read_text(errors="replace")
        stats = _stats(log)
        execs = stats.get("number_of_executed_units", "?")
        rate = stats.get("average_exec_per_sec")  # libFuzzer's, over its fuzzing time
        if rate is None and execs.isdigit():
            rate = f"{int(execs) / elapsed:.0f}"  # a crash: no final stats, wall time then
        artifacts = re.findall(r"Test unit written to (\S+)", log)
        if rc != 0 or artifacts:
            crashed.append((name, rc, artifacts, log_path))
        rows.append((name, execs, f"{rate or '?'}/s", stats.get("cov", "?"),
                     stats.get("corpus", "?"),
                     "CRASH" if rc != 0 or artifacts else "ok"))
    print(f"{'target':<12} {'executions':>11} {'rate':>8} {'cov':>6} {'corpus':>7}  result")
    for row in rows:
        print(f"{row[0]:<12} {row[1]:>11} {row[2]:>8} {row[3]:>6} {row[4]:>7}  {row[5]}")
    for name, rc, artifacts, log_path in crashed:
        print(f"{name}: exit {rc}; input(s): {' '.join(artifacts) or '-'}; log: {log_path}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
