"""One chaos run: the topology up, the load on, the seeded faults injected, the report
written (``chaos-results/chaos-TOPOLOGY.{json,txt}`` unless told otherwise).

    python -m chaos run --seconds 120 --seed 1 --topology one|two --out chaos-results
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from chaos.faults import GAP, HOLD, Scheduler
from chaos.load import Load
from chaos.procs import Topology, WorkerMapper
from chaos.report import analyse, write, write_requests
from chaos.scrape import Scraper

log = logging.getLogger("chaos")

BASELINE = 5.0     # seconds of load before the first fault


def run_chaos(seconds: float, seed: int, topology: str = "one", out: Path | None = None,
              kinds: tuple[str, ...] | None = None, outage: float | None = None,
              pace: float = 0.01, clients: dict[str, Any] | None = None,
              hold: float = HOLD, gap: float = GAP, ordered: bool = False,
              baseline: float = BASELINE, allow_documented: bool = False) -> dict[str, Any]:
    """Run for about ``seconds`` (faults in all but the first ``baseline`` and the last
    ``gap`` s); returns the report (also written under ``out`` when given). ``kinds``,
    ``hold``, ``gap``, ``ordered``: see ``chaos.faults.Scheduler``."""
    topo = Topology(topology, workdir=out / f"work-{topology}" if out else None)
    scrapers: list[Scraper] = []
    load: Load | None = None
    mapper: WorkerMapper | None = None
    try:
        topo.start()
        load = Load("127.0.0.1", topo.http_port, topo.tcp_port, pace=pace,
                    **{"n_ws": 2, **(clients or {})})
        mapper = WorkerMapper(topo.a, {topo.http_port, topo.tcp_port}, load.open_conns)
        scrapers = [Scraper(name, m.admin_port).start() for name, m in topo.meshes.items()]
        t0 = time.monotonic()
        load.start()
        mapper.start()
        time.sleep(min(baseline, seconds / 4))
        scheduler = Scheduler(
            topo, seed, max(0.0, seconds - (time.monotonic() - t0) - gap), kinds=kinds,
            outage=outage if outage is not None else min(30.0, max(3.0, seconds / 8)),
            before_worker_fault=mapper.refresh, hold=hold, gap=gap, ordered=ordered)
        thread = threading.Thread(target=scheduler.run, daemon=True, name="faults")
        thread.start()
        thread.join(seconds + 120)
        scheduler.stop()
        thread.join(60)
        rest = seconds - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        t_end = time.monotonic()
        load.stop()
        mapper.stop()
        for s in scrapers:
            s.stop()
            s.scrape_once()
        report = analyse(
            load.records, load.conns, scheduler.faults, scrapers, t0, t_end,
            topology=topology, seed=seed, seconds=seconds,
            endpoints={e.name: e.address for e in topo.endpoints},
            posts_files=[e.posts for e in topo.endpoints],
            extra={"stale_retries": load.stats.stale_retries,
                   "refused_retries": load.stats.refused_retries,
                   "connections": len(load.conns),
                   "scheduler_errors": scheduler.errors,
                   "masters": {n: m.masters for n, m in topo.meshes.items()}},
            allow_documented=allow_documented)
        if out is not None:
            write(report, out, f"chaos-{topology}")
            write_requests(out / f"chaos-{topology}-requests.csv", load.records, load.conns, t0)
        return report
    finally:
        if load is not None:
            load.stop()
        if mapper is not None:
            mapper.stop()
        for s in scrapers:
            s.stop()
        topo.stop()
