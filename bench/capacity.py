"""The scenarios of issue 17 beyond HTTP: opaque TCP (``tcp``) against nginx's ``stream``
proxy, and what idle keep-alive client connections cost a worker (``idle``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import BODY, TCP_AIM, TCP_TARGETS, BenchError
from bench.load import run_wrk, shown_command, wrk_command
from bench.procs import Nginx, check_answers, ensure_tools, start_meshd
from bench.report import (
    Ports,
    _cpu,
    _header,
    _ratio,
    _rounds_json,
    _save,
    _table,
    _warnings,
    median_rounds,
    ratio_aim,
    rps_ratios,
    wrk_problems,
    wrk_rounds,
)
from meshd.shm import STATE_SERVING
from meshd.testing.harness import free_port, wait_for

STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def stream_nginx(workdir: Path, port: int, backend_port: int) -> Nginx:
    """nginx (2 workers) proxying TCP from ``port`` to ``backend_port`` (``stream``)."""
    top = f"load_module {STREAM_MODULE};\n" if os.path.exists(STREAM_MODULE) else ""
    return Nginx("nginx-tcp", workdir, port, 2, "", top=top, stream_block=(
        f"  upstream u {{ server 127.0.0.1:{backend_port}; }}\n"
        f"  server {{ listen 127.0.0.1:{port}; proxy_pass u; }}\n"))


def scenario_tcp(backend_port: int, workdir: Path, args: argparse.Namespace,
                 stack: contextlib.ExitStack) -> None:
    """wrk's keep-alive HTTP/1.1 through an opaque TCP proxy: nginx ``stream`` (2
    workers) and meshd (2 workers, a ``protocol = "tcp"`` listener of service bench)."""
    ensure_tools("nginx-stream")
    load = os.getloadavg()[0]
    ports: Ports = {}
    nginx = stream_nginx(workdir, free_port(), backend_port).start()
    stack.callback(nginx.stop)
    ports["nginx-tcp"] = (nginx.port, nginx.pid)
    port = free_port()
    meshd = start_meshd(workdir, 2, 0, backend_port, name="tcp", listeners=(
        f'[[listener]]\nname = "tcp"\nlisten = "127.0.0.1:{port}"\n'
        f'direction = "outbound"\nprotocol = "tcp"\nservice = "bench"\n\n'))
    stack.callback(meshd.stop)
    ports["meshd-tcp"] = (port, meshd.pid)
    rounds = wrk_rounds("tcp: ", ports, args)
    results = median_rounds(rounds, lambda r: r.rps)
    command = shown_command(args.duration, args.connections)
    base = results["nginx-tcp"]
    _header("Opaque TCP: wrk's keep-alive HTTP/1.1 through nginx's stream proxy and a meshd "
            "TCP listener (2 workers each)", command, "median by req/s of", args.rounds,
            args.duration, load)
    _table(["target", "req/s", "× nginx", "p50 ms", "p99 ms", "CPU µs/req", "× nginx CPU"],
           [[name, f"{r.rps:,.0f}", _ratio(r.rps, base.rps), f"{r.p50_ms:.2f}",
             f"{r.p99_ms:.2f}", _cpu(r), _ratio(r.cpu_us_per_req, base.cpu_us_per_req)]
            for name, r in results.items()])
    pairs = rps_ratios(rounds, *TCP_TARGETS[::-1])
    lines, met = ratio_aim(pairs, *TCP_TARGETS[::-1], TCP_AIM)
    print(f"\n{lines}")
    _warnings(rounds, wrk_problems)
    _save("tcp.json", command, args, results={n: asdict(r) for n, r in results.items()},
          all_rounds=_rounds_json(rounds), per_round_ratios=pairs,
          aim={"ratio": TCP_AIM, "met": met})


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


def pss_kb(pid: int) -> int:
    """The proportional set size: RSS with each page shared with N processes (the master,
    the other workers: pages inherited at fork and not written since) counted 1/N."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise BenchError(f"no Pss for {pid}")


REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def _one_request(sock: socket.socket) -> None:
    """A GET on ``sock``, its whole response read (the connection stays open)."""
    sock.sendall(REQUEST)
    data = b""
    while not data.endswith(BODY.encode()):
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("meshd closed an idle-scenario connection")
        data += chunk
        if len(data) > 65536:
            raise BenchError(f"unexpected answer: {data[:200]!r}")


def scenario_idle(backend_port: int, workdir: Path, args: argparse.Namespace,
                  stack: contextlib.ExitStack) -> None:
    """One worker: its RSS after wrk load (-c64), then ``args.idle`` keep-alive client
    connections opened and each used for one request, held idle: RSS per connection."""
    load = os.getloadavg()[0]
    n = args.idle
    port = free_port()
    meshd = start_meshd(workdir, 1, 0, backend_port, name="idle", listeners=(
        f'[[listener]]\nname = "outbound"\nlisten = "127.0.0.1:{port}"\n'
        f'direction = "outbound"\nprotocol = "http"\nmax_connections = {n + 100}\n\n'))
    stack.callback(meshd.stop)
    check_answers("meshd-idle", port)
    worker = meshd.worker_pids(STATE_SERVING)[0]
    idle_start, pss_start = rss_kb(worker), pss_kb(worker)
    run_wrk("meshd-idle", wrk_command(port, args.duration, args.connections), args.duration)
    loaded, pss_loaded = rss_kb(worker), pss_kb(worker)
    time.sleep(0.5)  # wrk's connections closed
    before = rss_kb(worker)
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            _one_request(s)
        opened = time.monotonic() - started
        labels = 'listener="outbound"'
        wait_for(lambda: meshd.metric("tcp_open_connections", labels) >= n, 30,
                 what=f"{n} open connections")
        after, pss_after = rss_kb(worker), pss_kb(worker)
        per_conn = (after - before) * 1024 / n
    finally:
        for s in socks:
            s.close()
    command = (f"{n} client connections opened one after another, one GET each, held idle; "
               f"RSS from /proc/PID/status (VmRSS) of the one worker, Pss from "
               f"/proc/PID/smaps_rollup")
    _header(f"Memory: a worker after wrk load, and {n:,} idle keep-alive client connections "
            "on one worker", command, "one run,", 1, args.duration, load, prompt="")
    _table(["worker", "RSS MB", "Pss MB"],
           [["at start", f"{idle_start / 1024:.1f}", f"{pss_start / 1024:.1f}"],
            [f"after wrk -c{args.connections} for {args.duration:g} s", f"{loaded / 1024:.1f}",
             f"{pss_loaded / 1024:.1f}"],
            [f"with {n:,} idle connections", f"{after / 1024:.1f}", f"{pss_after / 1024:.1f}"]])
    print(f"\n{n:,} idle keep-alive connections: {per_conn / 1024:.1f} KB each "
          f"(RSS growth / connections; opened in {opened:.1f} s); aim ≤ 30 KB: "
          f"{'met' if per_conn <= 30 * 1024 else 'not met'}; RSS under load ≤ 40 MB: "
          f"{'met' if loaded <= 40 * 1024 else 'not met'}")
    _save("idle.json", command, args, connections=n, rss_kb={
        "start": idle_start, "after_load": loaded, "before_idle": before, "with_idle": after},
        pss_kb={"start": pss_start, "after_load": pss_loaded, "with_idle": pss_after},
        bytes_per_connection=per_conn, aim={"kb_per_connection": 30, "rss_mb_under_load": 40})
