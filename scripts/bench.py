"""`make bench`: HTTP/1.1 throughput, latency and CPU of meshd against nginx, on loopback.

One run starts an nginx backend answering ~100 bytes, then the proxies under test in
front of it (nginx with 2 workers and upstream keepalive, meshd with 1 and with 2
workers), and drives each target -- plus the backend directly -- with the same wrk
command. Rounds go round-robin over the targets (each after a 1 s warm-up) so that drift
of a noisy machine hits them alike; the round with the median req/s is reported.

Proxy CPU per request = user+sys clock ticks of the proxy's process tree (from
/proc/PID/stat) over the round, divided by the requests wrk completed.

Results go to stdout and bench-results/http1.json; meshd's logs to bench-results/.
Exit 1 only when a target cannot be started or wrk fails; a missed aim is just reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from meshd.testing.harness import Meshd, free_port, http_get, port_open, wait_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results"
TARGETS = ("direct", "nginx", "meshd-1w", "meshd-2w")
BODY = "meshd bench: a fixed answer of about one hundred bytes from the nginx backend, padded to len\n"
AIM = 0.25  # meshd 2 workers vs nginx req/s, the issue's aim
CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


class BenchError(Exception):
    """A target could not be started or wrk failed: the run is void."""


@dataclass
class Round:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float | None  # None for the direct target (no proxy)
    non_2xx: int
    socket_errors: dict[str, int]


# -- /proc --------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the parenthesised comm), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants now, found through the ppid of every process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_ticks(root: int) -> int:
    """utime + stime (fields 14 and 15, clock ticks) summed over ``root``'s process tree."""
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total


# -- the processes under test --------------------------------------------------------------

class Nginx:
    """nginx in the foreground (``daemon off``) on a config generated into its own dir."""

    def __init__(self, name: str, workdir: Path, port: int, workers: int, http_block: str) -> None:
        self.name, self.port = name, port
        self.dir = workdir / name
        self.dir.mkdir()
        temp_paths = "".join(f"  {kind}_temp_path {self.dir}/{kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(
            f"daemon off;\nmaster_process on;\nworker_processes {workers};\n"
            f"error_log {self.dir}/error.log;\npid {self.dir}/nginx.pid;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n{temp_paths}{http_block}}}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Nginx:
        out = open(self.dir / "stderr.log", "wb")
        with out:
            try:
                self.proc = subprocess.Popen(
                    ["nginx", "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                     "-c", str(self.dir / "nginx.conf")],
                    stdout=out, stderr=out, start_new_session=True)
            except OSError as e:
                raise BenchError(f"{self.name}: cannot start nginx: {e}") from None

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.dir / "stderr.log").read_text() + (self.dir / "error.log").read_text()
                raise BenchError(f"{self.name}: nginx exited with {self.proc.returncode}:\n{log}")
            return port_open("127.0.0.1", self.port)
        wait_for(up, 10, what=f"{self.name} on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGKILL):
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue


def backend_nginx(workdir: Path, port: int) -> Nginx:
    body = BODY.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return Nginx("backend", workdir, port, 1, (
        f"  server {{\n    listen 127.0.0.1:{port};\n"
        f'    location / {{ default_type text/plain; return 200 "{body}"; }}\n  }}\n'))


def proxy_nginx(workdir: Path, port: int, backend_port: int) -> Nginx:
    return Nginx("nginx", workdir, port, 2, (
        f"  upstream u {{ server 127.0.0.1:{backend_port}; keepalive 64; }}\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n    location / {{\n"
        f"      proxy_pass http://u;\n      proxy_http_version 1.1;\n"
        f'      proxy_set_header Connection "";\n    }}\n  }}\n'))


def start_meshd(workdir: Path, workers: int, port: int, backend_port: int) -> Meshd:
    instance = f"bench-{os.getpid()}-{workers}w"
    admin = f"127.0.0.1:{free_port()}"
    config = workdir / f"meshd-{workers}w.toml"
    config.write_text(
        f'workers = {workers}\ndrain_timeout = "2s"\nworker_timeout = "10s"\n'
        f'instance = "{instance}"\nstate_dir = "{workdir}/state-{workers}w"\n\n'
        f'[admin]\nlisten = "{admin}"\n\n'
        f'[[discovery]]\nname = "local"\nplugin = "static"\n'
        f'[discovery.services]\nbench = ["127.0.0.1:{backend_port}"]\n\n'
        f'[[listener]]\nname = "outbound"\nlisten = "127.0.0.1:{port}"\n'
        f'direction = "outbound"\nprotocol = "http"\n\n'
        f'[service.bench]\ntimeout = "5s"\n')
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / f"meshd-{workers}w.log"
    log.unlink(missing_ok=True)
    meshd = Meshd(config, log, admin=admin, instance=instance)
    try:
        return meshd.start(timeout=30)
    except (RuntimeError, TimeoutError) as e:
        meshd.stop()
        raise BenchError(f"meshd-{workers}w: {e}") from None


def check_answers(name: str, port: int) -> None:
    try:
        status, _, body = http_get("127.0.0.1", port, "/", {"Host": "bench"})
    except OSError as e:
        raise BenchError(f"{name}: GET / failed: {e}") from None
    if status != 200 or body != BODY.encode():
        raise BenchError(f"{name}: GET / answered {status} {body[:200]!r}")


# -- wrk ------------------------------------------------------------------------------------

def wrk_command(port: int, duration: float, connections: int) -> list[str]:
    return ["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "--latency",
            "-H", "Host: bench", f"http://127.0.0.1:{port}/"]


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


def parse_wrk(text: str) -> tuple[float, int, float, float, int, dict[str, int]]:
    """req/s, requests, p50 ms, p99 ms, non-2xx/3xx responses, socket errors."""
    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text, re.M)
        if m is None:
            raise BenchError(f"cannot find {pattern!r} in wrk's output:\n{text}")
        return m
    requests = int(grab(r"^\s*(\d+) requests in ")[1])
    rps = float(grab(r"^Requests/sec:\s+([\d.]+)")[1])
    p50 = grab(r"^\s*50(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    p99 = grab(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    non_2xx = int(m[1]) if m else 0
    errors: dict[str, int] = {}
    m = re.search(r"Socket errors:(.*)$", text, re.M)
    if m:
        errors = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", m[1])}
    return rps, requests, _ms(*p50.groups()), _ms(*p99.groups()), non_2xx, errors


def measure(name: str, port: int, cpu_root: int | None, args: argparse.Namespace) -> Round:
    run_wrk(name, wrk_command(port, 1, args.connections), 1)  # warm-up
    before = cpu_ticks(cpu_root) if cpu_root else 0
    text = run_wrk(name, wrk_command(port, args.duration, args.connections), args.duration)
    after = cpu_ticks(cpu_root) if cpu_root else 0
    rps, requests, p50, p99, non_2xx, errors = parse_wrk(text)
    cpu = (after - before) / CLK_TCK * 1e6 / requests if cpu_root and requests else None
    return Round(rps, requests, p50, p99, cpu, non_2xx, errors)


# -- the run --------------------------------------------------------------------------------

def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "—"


def report(results: dict[str, Round], command: str, args: argparse.Namespace) -> None:
    base = results.get("nginx")
    base_rps = base.rps if base else None
    base_cpu = base.cpu_us_per_req if base else None
    print(f"\n{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} round(s) by req/s")
    print(f"$ {command}\n")
    print(f"{'target':<10} {'req/s':>9} {'× nginx':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'CPU µs/req':>11} {'× nginx CPU':>12}")
    for name, r in results.items():
        cpu = f"{r.cpu_us_per_req:.1f}" if r.cpu_us_per_req is not None else "—"
        print(f"{name:<10} {r.rps:>9,.0f} {_ratio(r.rps, base_rps):>8} "
              f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {cpu:>11} "
              f"{_ratio(r.cpu_us_per_req, base_cpu):>12}")
    for name, r in results.items():
        errors = {k: v for k, v in r.socket_errors.items() if v}
        if r.non_2xx or errors:
            print(f"warning: {name}: {r.non_2xx} non-2xx/3xx responses, socket errors {errors}")
    if base and "meshd-2w" in results:
        ratio = results["meshd-2w"].rps / base.rps
        print(f"\naim {AIM}x nginx: {'met' if ratio >= AIM else 'not met'} "
              f"(meshd-2w at {ratio:.3f}x)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (median)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--only", default=",".join(TARGETS),
                        help=f"comma list of targets out of {','.join(TARGETS)}")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets or args.rounds < 1 or args.duration <= 0 or args.connections < 2:
        parser.error(f"bad options (unknown targets: {unknown})" if unknown else "bad options")

    started: list[Nginx | Meshd] = []
    workdir = Path(tempfile.mkdtemp(prefix="meshd-bench-"))
    try:
        backend_port = free_port()
        started.append(backend_nginx(workdir, backend_port).start())
        ports: dict[str, tuple[int, int | None]] = {"direct": (backend_port, None)}
        for name in targets:
            port = free_port()
            if name == "nginx":
                proc: Nginx | Meshd = proxy_nginx(workdir, port, backend_port).start()
            elif name.startswith("meshd-"):
                proc = start_meshd(workdir, int(name[6]), port, backend_port)
            else:
                continue
            started.append(proc)
            ports[name] = (port, proc.pid)
        for name in targets:
            check_answers(name, ports[name][0])

        rounds: dict[str, list[Round]] = {name: [] for name in targets}
        for i in range(args.rounds):
            for name in targets:
                port, pid = ports[name]
                print(f"round {i + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                rounds[name].append(measure(name, port, pid, args))
        results = {name: sorted(rs, key=lambda r: r.rps)[(len(rs) - 1) // 2]
                   for name, rs in rounds.items()}

        command = shlex.join(wrk_command(0, args.duration, args.connections)).replace(
            "127.0.0.1:0", "127.0.0.1:PORT")
        report(results, command, args)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "http1.json").write_text(json.dumps({
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command, "cpus": os.cpu_count(), "rounds": args.rounds,
            "results": {name: asdict(r) for name, r in results.items()},
            "all_rounds": {name: [asdict(r) for r in rs] for name, rs in rounds.items()},
            "aim": {"ratio": AIM, "met": results["meshd-2w"].rps >= AIM * results["nginx"].rps}
            if "meshd-2w" in results and "nginx" in results else None,
        }, indent=2) + "\n")
        print(f"results: {(RESULTS / 'http1.json').relative_to(ROOT)}; meshd logs in "
              f"{RESULTS.relative_to(ROOT)}/meshd-*.log")
        return 0
    except (BenchError, TimeoutError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
