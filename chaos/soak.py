"""The soak: sustained mixed load on one meshd (2 workers, 3 endpoints from the Consul
test server) -- HTTP/1.1 GETs and POSTs and opaque TCP with connection churn, an HTTP/2
client, and h2load bursts (3 s, -c8 -m4) every ``burst_every`` s -- while the RSS and fd
count of every meshd process are sampled every second.

Aims: no process's RSS grows more than 10 % from just after the warm-up (the first 20 %
of the run, at most 60 s) to the end of the load (means of 5 s of samples each); fds of
every process, 3 s after the load stops, what they were before it started (pooled
upstream connections idle past ``idle_timeout``, 1 s here, closed). Writes
``soak.csv`` (t, pid, role, rss_kib, fds), ``soak.json``, ``soak.txt`` under ``out`` and,
when matplotlib is importable, a PNG at ``plot``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from chaos.load import Load
from chaos.procs import Topology, rss_and_fds, stop_pid
from meshd.testing.harness import tcp_sockets

GROWTH_AIM = 0.10
FDS_AFTER = 3.0       # the aim: fds back this long after the load stops
FDS_WAIT_MAX = 15.0   # how long we keep looking, to tell when (if ever) they came back
BURST = 3.0


def run_soak(seconds: float, out: Path, plot: Path | None = None,
             burst_every: float = 30.0, pace: float = 0.005,
             fds_wait: float = FDS_WAIT_MAX) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    topo = Topology("one", idle_timeout="1s", workdir=out / "work-soak")
    samples: list[tuple[float, int, str, int, int]] = []
    bursts: list[float] = []
    stop = threading.Event()
    load: Load | None = None
    try:
        topo.start()
        mesh = topo.a
        time.sleep(1.0)
        t0 = time.monotonic()
        before = _fds(mesh.processes())

        def sample() -> None:
            for _ in range(int(seconds + FDS_WAIT_MAX + 60) + 1):
                now = time.monotonic() - t0
                for pid, role in mesh.processes().items():
                    got = rss_and_fds(pid)
                    if got is not None:
                        samples.append((round(now, 2), pid, role, got[0], got[1]))
                if stop.wait(1.0):
                    return
        sampler = threading.Thread(target=sample, daemon=True, name="soak-sampler")
        sampler.start()
        load = Load("127.0.0.1", topo.http_port, topo.tcp_port, n_get=4, n_post=1, n_h2=1,
                    n_tcp=2, pace=pace, churn=20, keep_records=False,
                    max_seconds=seconds + 30).start()
        load_start = time.monotonic()
        h2load = shutil.which("h2load")
        next_burst = load_start + min(burst_every, seconds / 3)
        while time.monotonic() < load_start + seconds:
            if h2load and time.monotonic() >= next_burst and \
                    time.monotonic() + BURST < load_start + seconds - 1:
                bursts.append(round(time.monotonic() - t0, 2))
                _burst(h2load, topo.http_port)
                next_burst += burst_every
            time.sleep(0.2)
        load_end = time.monotonic()
        load.stop()
        stopped = time.monotonic()
        # fds: the aim is FDS_AFTER s; watch a little longer to tell when they came back
        after: dict[int, int] = {}
        back_at: float | None = None
        while time.monotonic() - stopped < max(fds_wait, FDS_AFTER):
            after = _fds(mesh.processes())
            if all(after.get(pid) == n for pid, n in before.items()):
                back_at = time.monotonic() - stopped
                break
            time.sleep(0.1)
        back_in_time = back_at is not None and back_at <= FDS_AFTER
        stop.set()
        sampler.join(5)
        result = _result(samples, before, after, back_at, back_in_time, t0, load_start,
                         load_end, seconds, load, bursts, mesh.processes(),
                         max(fds_wait, FDS_AFTER))
        peers = {ep.port: f"endpoint {ep.name}" for ep in topo.endpoints}
        if topo.echo is not None:
            peers[topo.echo.port] = "echo"
        result["extra_sockets"] = {
            str(pid): _sockets(pid, peers) for pid, n in before.items() if after.get(pid) != n}
    finally:
        stop.set()
        if load is not None:
            load.stop()
        topo.stop()
    _write_csv(out / "soak.csv", samples)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "soak.txt").write_text(render_soak(result) + "\n")
    if plot is not None:
        result["plot"] = _plot(samples, bursts, plot)
    return result


STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN",
          "04": "FIN_WAIT1", "05": "FIN_WAIT2", "09": "LAST_ACK", "07": "CLOSE"}


def _sockets(pid: int, peers: dict[int, str]) -> dict[str, int]:
    """The TCP sockets ``pid`` holds, counted by peer (endpoint, echo, other) and state:
    what the fds a process did not give back are."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for _, remote, state in tcp_sockets(pid):
            key = f"{peers.get(remote, 'other' if remote else 'listening')} " \
                  f"{STATES.get(state, state)}"
            out[key] = out.get(key, 0) + 1
    return out


def _burst(h2load: str, port: int) -> None:
    proc = subprocess.Popen(
        [h2load, "-c8", "-m4", "-D", str(int(BURST)), "-H", ":authority: web",
         f"http://127.0.0.1:{port}/burst"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(BURST + 15)
    except subprocess.TimeoutExpired:
        stop_pid(proc.pid)
        proc.wait(5)


def _fds(processes: dict[int, str]) -> dict[int, int]:
    out = {}
    for pid in processes:
        got = rss_and_fds(pid)
        if got is not None:
            out[pid] = got[1]
    return out


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def _result(samples: list[tuple[float, int, str, int, int]], before: dict[int, int],
            after: dict[int, int], back_at: float | None, back_in_time: bool, t0: float,
            load_start: float, load_end: float, seconds: float, load: Load,
            bursts: list[float], processes: dict[int, str], waited: float) -> dict[str, Any]:
    warm = (load_start - t0) + min(60.0, seconds * 0.2)
    end = load_end - t0
    growth: dict[str, dict[str, Any]] = {}
    for pid, role in processes.items():
        early = [s[3] for s in samples if s[1] == pid and warm <= s[0] < warm + 5]
        late = [s[3] for s in samples if s[1] == pid and end - 5 <= s[0] < end]
        if early and late:
            growth[str(pid)] = {"role": role, "rss_after_warmup_kib": round(_mean(early)),
                                "rss_end_kib": round(_mean(late)),
                                "growth_pct": round(100 * (_mean(late) / _mean(early) - 1), 1)}
    missed = [f"{v['role']} {pid} grew {v['growth_pct']} %" for pid, v in growth.items()
              if v["growth_pct"] > 100 * GROWTH_AIM]
    fds = {str(pid): {"before": n, "after": after.get(pid)} for pid, n in before.items()}
    if not back_in_time:
        missed.append("fds not back to their pre-load count " + (
            f"{FDS_AFTER:g} s after the load stopped (back after {back_at:.1f} s)"
            if back_at is not None else f"within {waited:g} s: {fds}"))
    return {"seconds": seconds, "requests": load.sent, "failed": load.failed,
            "failures": [f"{r.kind}: {r.status} {r.error}" for r in load.records[:20]],
            "stale_retries": load.stats.stale_retries, "connections": load.stats.reconnects,
            "h2load_bursts_at_s": bursts, "warmup_s": round(warm, 1), "rss": growth,
            "fds": fds, "fds_back_after_s": None if back_at is None else round(back_at, 2),
            "aims_missed": missed}


def render_soak(r: dict[str, Any]) -> str:
    lines = [f"soak: {r['seconds']:g}s, {r['requests']} requests (+ h2load bursts at "
             f"{r['h2load_bursts_at_s']}), {r['failed']} failed, {r['connections']} "
             f"client connections, warm-up {r['warmup_s']} s"]
    for pid, v in r["rss"].items():
        lines.append(f"  {v['role']:<8}{pid:>8}  RSS {v['rss_after_warmup_kib'] / 1024:.1f} -> "
                     f"{v['rss_end_kib'] / 1024:.1f} MiB ({v['growth_pct']:+.1f} %)")
    for pid, v in r["fds"].items():
        lines.append(f"  fds {pid:>8}: {v['before']} before the load, {v['after']} after")
    lines.append(f"  fds back after {r['fds_back_after_s']} s")
    for pid, socks in r.get("extra_sockets", {}).items():
        lines.append(f"  {pid} still holds TCP sockets: {socks}")
    for f in r["failures"][:5]:
        lines.append(f"  failure: {f}")
    if r.get("plot"):
        lines.append(f"  plot: {r['plot']}")
    lines.append("aims: " + ("met" if not r["aims_missed"] else
                            "MISSED: " + "; ".join(r["aims_missed"])))
    return "\n".join(lines)


def _write_csv(path: Path, samples: list[tuple[float, int, str, int, int]]) -> None:
    with path.open("w") as f:
        f.write("t_s,pid,role,rss_kib,fds\n")
        for s in samples:
            f.write(",".join(map(str, s)) + "\n")


def _plot(samples: list[tuple[float, int, str, int, int]], bursts: list[float],
          path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (make soak installs it)"
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for pid in sorted({s[1] for s in samples}):
        mine = [s for s in samples if s[1] == pid]
        label = f"{mine[0][2]} {pid}"
        ax1.plot([s[0] for s in mine], [s[3] / 1024 for s in mine], label=label)
        ax2.plot([s[0] for s in mine], [s[4] for s in mine], label=label)
    for b in bursts:
        for ax in (ax1, ax2):
            ax.axvspan(b, b + BURST, color="0.85")
    ax1.set_ylabel("RSS (MiB)")
    ax2.set_ylabel("open fds")
    ax2.set_xlabel("seconds (grey: h2load bursts)")
    ax1.legend(fontsize="small")
    ax1.set_title("meshd soak: RSS and fds per process")
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
