"""`python -m bench.decisions`: what the balancer decisions ring costs a worker per attempt.

Three figures, process CPU time per call (timeit with ``time.process_time``, the best of
``--repeat`` runs, so other processes on a busy machine weigh less), on a real region
and ring file in a temporary directory:
- ``pick``: ``SharedBalancer.pick`` over three healthy endpoints, as built (P2C noting
  its two candidates for the record);
- ``pick, nothing noted``: the same with the note (``_seen``) replaced by an empty tuple;
- ``record``: ``meshd.worker.decisions.attempt_ended``, one record packed into the ring.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from bench.micro import best
from meshd.discovery.api import Endpoint
from meshd.shm import Region
from meshd.worker.balancer import SharedBalancer
from meshd.worker.decisions import DecisionRing, attempt_ended


class _Policy:
    route = "api"


class _Call:
    """What ``attempt_ended`` reads of a ``Call``."""

    pick: Any = None
    policy = _Policy()
    service = "web"
    tried = [0]
    status = 200
    kind = ""
    error = None
    no_retry = ""
    sent_at = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decisions")
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        region = Region.create(os.path.join(d, "r.shm"), 16, 16, 16)
        eps = tuple(Endpoint("127.0.0.1", 8001 + i) for i in range(3))
        rows = {str(e): i for i, e in enumerate(eps)}
        built = SharedBalancer(region, 0)
        bare = SharedBalancer(region, 0)
        bare._seen = lambda *a: ()  # type: ignore[method-assign]
        ring = DecisionRing.open(d, "bench", 1, 0, os.getpid(), 1)
        assert ring is not None
        built.pick("web", eps, rows)
        call, worker = _Call(), type("W", (), {"decisions": ring})()
        seen = built.last

        def record() -> None:
            call.pick = seen
            attempt_ended(worker, call, False)  # type: ignore[arg-type]
        for name, fn in (("pick", lambda: built.pick("web", eps, rows)),
                         ("pick, nothing noted", lambda: bare.pick("web", eps, rows)),
                         ("record", record)):
            print(f"{name:22s} {best(fn, args.number, args.repeat) * 1e6:6.2f} us")
        region.close()


if __name__ == "__main__":
    main()
