"""Fleet control from Consul: write-to-traffic latency of a split change, and the control
process's cost with many services each having a router and a splitter.

Latency: service ``web`` has two instances (meta version v1 / v2, the test backends
``v1`` and ``v2``) and a ``service-resolver`` with those subsets; a client thread sends
GETs naming ``web`` back to back on one keep-alive connection through meshd (2 workers).
``--changes`` times, a ``service-splitter`` sending 100 % to the other subset is written
to the Consul test server (``meshd.testing.consul_server``, in this process: the write
is a ``PUT /v1/config`` over loopback, as ``consul config write`` does); the latency is
from just before the write to the first answer from the new subset to a request sent
after the write started. p50 / p99 / max over the changes.

Cost (``--services N``, 0 to skip): N services listed by the static plugin, each with a
``service-router`` (two routes) and a ``service-splitter`` in Consul; meshd (1 worker)
starts, /ready, then the control process's RSS and CPU at rest for ``--rest`` s, and its
CPU per write of one splitter (Consul's config table index moves with every write, so
every write is read by the three list queries: the cost grows with N), and the time
from the write to traffic of ``s0`` following it (its splitter sends it all to service
``t``, then back).

    .venv/bin/python scripts/bench_fleet.py [--changes 30] [--services 1000]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from meshd.testing.consul_server import ConsulServer
from meshd.testing.harness import Backend, Meshd, free_port, http_get, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def start_meshd(work: Path, consul: ConsulServer, workers: int, static: str = "") -> tuple[Meshd, int, int]:
    outbound, admin = free_port(), free_port()
    instance = f"bench-fleet-{os.getpid()}-{workers}"
    config = work / f"meshd-{workers}.toml"
    config.write_text(textwrap.dedent(f"""\
        workers = {workers}
        instance = "{instance}"
        state_dir = "{work}/state"
        metric_rows = 8192
        endpoint_rows = 16384
        [admin]
        listen = "127.0.0.1:{admin}"
        """) + static + textwrap.dedent(f"""
        [[discovery]]
        name = "consul"
        plugin = "consul"
        address = "{consul.url}"
        [[config_source]]
        name = "consul"
        plugin = "consul"
        address = "{consul.url}"
        [[listener]]
        name = "outbound"
        listen = "127.0.0.1:{outbound}"
        direction = "outbound"
        protocol = "http"
        """))
    m = Meshd(config, work / f"meshd-{workers}.log", admin=f"127.0.0.1:{admin}", instance=instance)
    m.start(timeout=300)
    return m, outbound, admin


def splitter(name: str, subset: str) -> dict[str, Any]:
    return {"Kind": "service-splitter", "Name": name,
            "Splits": [{"Weight": 100, "ServiceSubset": subset}]}


class Client:
    """Back-to-back GETs naming web; (send time, backend) of every answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[float, str]] = []
        self.failures = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("GET", "/", headers={"Host": "web"})
                resp = conn.getresponse()
                resp.read()
                who = resp.getheader("x-backend") or f"status {resp.status}"
            except (OSError, http.client.HTTPException):
                self.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            with self.lock:
                self.answers.append((sent, who))
                del self.answers[:-1000]

    def first_after(self, t0: float, who: str) -> float | None:
        with self.lock:
            return next((s for s, w in self.answers if s >= t0 and w == who), None)


def latency(args: argparse.Namespace, work: Path) -> tuple[list[float], int]:
    a, b = Backend("v1").start(), Backend("v2").start()
    consul = ConsulServer().start()
    try:
        consul.register("web", a.port, address=a.host, meta={"version": "v1"})
        consul.register("web", b.port, address=b.host, meta={"version": "v2"})
        consul.write_config({"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1",
                             "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                                         "v2": {"Filter": "Service.Meta.version == v2"}}})
        consul.write_config(splitter("web", "v1"))
        m, outbound, _ = start_meshd(work, consul, 2)
        client = Client(outbound)
        client.thread.start()
        out: list[float] = []
        try:
            wait_for(lambda: client.first_after(0, "v1") is not None, 10, what="traffic")
            for i in range(args.changes):
                subset = "v2" if i % 2 == 0 else "v1"
                t0 = time.monotonic()
                consul.write_config(splitter("web", subset))
                # the first answer from the new subset to a request sent after t0; the
                # client records send times, so wait for it and take its arrival as the
                # moment its successor was sent (answers are back to back).
                found: list[float] = []

                def seen(subset: str = subset, t0: float = t0, found: list[float] = found) -> bool:
                    with client.lock:
                        idx = next((k for k, (s, w) in enumerate(client.answers)
                                    if s >= t0 and w == subset), None)
                        if idx is None or idx + 1 >= len(client.answers):
                            return False
                        found.append(client.answers[idx + 1][0])
                        return True
                wait_for(seen, 10, interval=0.001, what=f"traffic to {subset}")
                out.append((found[0] - t0) * 1000)
                time.sleep(args.spacing)
        finally:
            client.stop.set()
            client.thread.join(10)
            m.stop()
        return out, client.failures
    finally:
        consul.stop()
        a.stop()
        b.stop()


def cost(args: argparse.Namespace, work: Path) -> dict[str, float]:
    backend, other = Backend("s").start(), Backend("t").start()
    consul = ConsulServer().start()
    n = args.services
    try:
        consul.register("t", other.port, address=other.host, id="t")
        for i in range(n):
            consul.register(f"s{i}", backend.port, address=backend.host, id=f"s{i}")
            consul.write_config({"Kind": "service-router", "Name": f"s{i}", "Routes": [
                {"Match": {"HTTP": {"PathPrefix": "/admin"}},
                 "Destination": {"Service": f"s{i}", "RequestTimeout": "5s"}},
                {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
                 "Destination": {"Service": f"s{i}", "NumRetries": 2}}]})
            consul.write_config({"Kind": "service-splitter", "Name": f"s{i}",
                                 "Splits": [{"Weight": 100, "Service": f"s{i}"}]})
        static = "[[discovery]]\nname = \"list\"\nplugin = \"static\"\n[discovery.services]\n" + \
            "".join(f's{i} = ["127.0.0.1:{backend.port}"]\n' for i in range(n))
        started = time.monotonic()
        m, outbound, _ = start_meshd(work, consul, 1, static)
        ready_s = time.monotonic() - started
        try:
            pid = wait_for(lambda: (m.control_pids() or [0])[0], 10, what="control")
            time.sleep(2.0)
            c0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(args.rest)
            rest = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
            rss = rss_mib(pid)
            writes, visible = 6, []
            c0, t0 = cpu_seconds(pid), time.monotonic()
            for k in range(writes):
                target = "t" if k % 2 == 0 else "s0"   # s0's split: all to t, all back
                w0 = time.monotonic()
                consul.write_config({"Kind": "service-splitter", "Name": "s0",
                                     "Splits": [{"Weight": 100, "Service": target}]})
                want = "t" if target == "t" else "s"

                def moved(want: str = want) -> bool:
                    headers = http_get("127.0.0.1", outbound, "/", {"Host": "s0"}, timeout=10)[1]
                    return headers.get("x-backend") == want
                wait_for(moved, 60, interval=0.005, what=f"s0 to {want}")
                visible.append((time.monotonic() - w0) * 1000)
                time.sleep(1.0)
            per_write = (cpu_seconds(pid) - c0 - rest * (time.monotonic() - t0)) / writes
            return {"services": n, "ready_s": ready_s, "rss_mib": rss, "rest_cpu_pct": rest * 100,
                    "cpu_ms_per_write": per_write * 1000,
                    "visible_ms_p50": statistics.median(visible),
                    "visible_ms_max": max(visible)}
        finally:
            m.stop()
    finally:
        consul.stop()
        backend.stop()
        other.stop()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--spacing", type=float, default=0.3, help="seconds between changes")
    p.add_argument("--services", type=int, default=1000, help="0: skip the cost run")
    p.add_argument("--rest", type=float, default=10.0)
    args = p.parse_args()
    exe = os.path.relpath(sys.executable)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        lat, failures = latency(args, Path(tmp))
        print(f"\n$ {shlex.join([sys.executable if exe.startswith('..') else exe, *sys.argv])}")
        print(f"split change write-to-traffic over {len(lat)} changes (meshd 2 workers): "
              f"p50 {pct(lat, 50):.0f} ms, p99 {pct(lat, 99):.0f} ms, max {max(lat):.0f} ms; "
              f"failed requests: {failures}")
        print("each change (ms):", " ".join(f"{x:.0f}" for x in lat))
        if args.services:
            c = cost(args, Path(tmp))
            print(f"{c['services']:.0f} services with a router and a splitter: ready in "
                  f"{c['ready_s']:.1f} s; control process RSS {c['rss_mib']:.1f} MiB, "
                  f"CPU at rest {c['rest_cpu_pct']:.2f} %, {c['cpu_ms_per_write']:.0f} ms CPU "
                  f"per splitter write; write to traffic p50 {c['visible_ms_p50']:.0f} ms, "
                  f"max {c['visible_ms_max']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
