"""The faults of a chaos run: a seeded schedule, each fault injected, held, undone, and
logged with the pids (worker faults) or the endpoint it owned, so the report can tell
which failures it explains.

Kinds (``KINDS``): ``kill9`` (a worker, SIGKILL), ``sigstop`` (a worker stopped for
``hold`` s, then SIGCONT -- the master may kill it first: ``worker_timeout``),
``hup_storm`` (10 HUPs to the master within 5 s), ``usr2`` (binary upgrade: a new master
takes over, the old one drains and exits), ``control_kill`` (the control process,
SIGKILL), ``endpoint_kill`` (killed, restarted on its port after ``hold`` s),
``endpoint_slow`` (+200 ms), ``endpoint_503``, ``discovery_outage`` (the Consul server
stopped for ``outage`` s, back with a lower index). Worker, master and control faults go
to the target meshd (B, the inbound one, with two meshds).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.procs import Topology, alive, wait_gone

log = logging.getLogger("chaos")

KINDS = ("kill9", "sigstop", "hup_storm", "usr2", "control_kill", "endpoint_kill",
         "endpoint_slow", "endpoint_503", "discovery_outage")
TWO_MESHD_KINDS = ("kill9", "sigstop", "hup_storm", "usr2", "control_kill",
                   "endpoint_slow", "discovery_outage")
HOLD = 4.0        # how long a held fault (stop, slow, 503, endpoint down) lasts
GAP = 5.0         # quiet time after each fault: recovery is measured in it


@dataclass
class Fault:
    kind: str
    start: float               # monotonic, when injected
    end: float = 0.0           # when undone (or the process gone)
    pids: list[int] = field(default_factory=list)     # worker/control/master pids it hit
    endpoint: str = ""         # endpoint name it hit
    detail: str = ""

    def as_dict(self, t0: float) -> dict[str, Any]:
        d = asdict(self)
        d["start"], d["end"] = round(self.start - t0, 3), round(self.end - t0, 3)
        return d


class Scheduler:
    """Injects faults one after another (``gap`` s apart) until ``seconds`` have passed,
    in an order drawn from ``seed`` (``ordered``: the order of ``kinds``, once).
    ``before_worker_fault`` runs just before a worker is hit (the connection mapper
    refreshes there). ``hold``: how long a held fault lasts."""

    def __init__(self, topo: Topology, seed: int, seconds: float, *,
                 kinds: tuple[str, ...] | None = None, outage: float = 10.0,
                 before_worker_fault: Callable[[], None] = lambda: None,
                 hold: float = HOLD, gap: float = GAP, ordered: bool = False) -> None:
        self.topo, self.seconds, self.outage = topo, seconds, outage
        self.hold, self.gap, self.ordered = hold, gap, ordered
        self.rng = random.Random(seed)
        self.kinds = kinds or (KINDS if topo.topology == "one" else TWO_MESHD_KINDS)
        self.before_worker_fault = before_worker_fault
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self._stop = threading.Event()

    def plan(self) -> list[str]:
        """The order: every kind once (shuffled), again and again."""
        if self.ordered:
            return list(self.kinds)
        order: list[str] = []
        for _ in range(50):
            batch = list(self.kinds)
            self.rng.shuffle(batch)
            order.extend(batch)
        return order

    def run(self) -> list[Fault]:
        deadline = time.monotonic() + self.seconds
        for kind in self.plan():
            if self._stop.is_set() or time.monotonic() + self.hold > deadline:
                break
            fault = Fault(kind, time.monotonic())
            try:
                getattr(self, f"_{kind}")(fault)
            except Exception as e:
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
            fault.end = fault.end or time.monotonic()
            self.faults.append(fault)
            log.info("fault %s pids=%s endpoint=%s %.1fs %s", kind, fault.pids,
                     fault.endpoint, fault.end - fault.start, fault.detail)
            self._stop.wait(min(self.gap, max(0.0, deadline - time.monotonic())))
        return self.faults

    def stop(self) -> None:
        self._stop.set()

    # -- meshd processes -----------------------------------------------------------------

    def _worker(self) -> int:
        workers = self.topo.target.workers()
        if not workers:
            raise RuntimeError("no worker to hit")
        self.before_worker_fault()
        return self.rng.choice(workers)

    def _kill9(self, f: Fault) -> None:
        pid = self._worker()
        f.pids, f.start = [pid], time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_gone([pid], 10)
        f.end = time.monotonic()

    def _sigstop(self, f: Fault) -> None:
        pid = self._worker()
        f.pids, f.start = [pid], time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        gone = wait_gone([pid], self.hold)
        if not gone and alive(pid):
            os.kill(pid, signal.SIGCONT)
        f.end = time.monotonic()
        f.detail = "killed by the master while stopped" if gone else "continued"

    def _hup_storm(self, f: Fault) -> None:
        master = self.topo.target.master()
        f.pids = [master, *self.topo.target.workers()]   # the workers it drains
        for _ in range(10):
            os.kill(master, signal.SIGHUP)
            self._stop.wait(0.5)
        f.end = time.monotonic()

    def _usr2(self, f: Fault) -> None:
        mesh = self.topo.target
        old = mesh.master()
        f.pids = [old, *mesh.workers()]
        os.kill(old, signal.SIGUSR2)
        if not wait_gone([old], 60):
            raise RuntimeError(f"old master {old} still there 60 s after USR2")
        new = mesh.master()
        f.detail = f"new master {new}"
        f.end = time.monotonic()

    def _control_kill(self, f: Fault) -> None:
        controls = self.topo.target.controls()
        if not controls:
            raise RuntimeError("no control process")
        f.pids = controls[:1]
        os.kill(controls[0], signal.SIGKILL)
        wait_gone(controls[:1], 10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not self.topo.target.controls():
            self._stop.wait(0.1)
        f.end = time.monotonic()
        f.detail = f"new control {self.topo.target.controls()}"

    # -- endpoints and discovery ---------------------------------------------------------

    def _endpoint(self) -> Any:
        return self.rng.choice(self.topo.endpoints)

    def _endpoint_kill(self, f: Fault) -> None:
        ep = self._endpoint()
        f.endpoint = ep.name
        ep.kill()
        self._stop.wait(self.hold)
        ep.start()
        f.end = time.monotonic()

    def _endpoint_slow(self, f: Fault) -> None:
        ep = self._endpoint()
        f.endpoint = ep.name
        ep.control("/_delay?ms=200")
        self._stop.wait(self.hold)
        ep.control("/_delay?ms=0")
        f.end = time.monotonic()

    def _endpoint_503(self, f: Fault) -> None:
        ep = self._endpoint()
        f.endpoint = ep.name
        ep.control("/_fail?code=503")
        self._stop.wait(self.hold)
        ep.control("/_fail?code=0")
        f.end = time.monotonic()

    def _discovery_outage(self, f: Fault) -> None:
        consul = self.topo.consul
        index = consul._index
        consul.stop()
        self._stop.wait(self.outage)
        consul.restart()
        consul.set_index(max(1, index // 2))
        f.detail = f"index {index} -> {max(1, index // 2)}"
        f.end = time.monotonic()
