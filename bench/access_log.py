"""`python -m bench.access_log`: what ``[access_log]`` costs a worker per request.

The two halves as a worker runs them: the request path's hook (``observe.request``, as
both client sides call it at a request's end, with the access log on and nothing else
observing), and the writer's turn (``AccessLog.flush`` of what the hook queued: the
lines formatted and written, here to /dev/null). Per case and format, four figures:
- ``hook us`` / ``line us``: process CPU time per request (timeit with
  ``time.process_time``, the best of ``--repeat`` runs, so other processes on a busy
  machine weigh less); ``line us`` is a flush of ``--number`` queued lines divided;
- ``hook calls`` / ``line calls``: the function calls they make (Python and C, counted
  with ``sys.setprofile``): deterministic, the work itself rather than its time.

Cases: ``wrk`` is ``make bench``'s request (Host only, one client, path ``/``) as a
keep-alive load sends it, ``varied`` a browser-like head of ten fields with a W3C
traceparent, 16 clients taking turns and a different path each request.

Only ``observe.request``'s signature and ``AccessLog`` (``queue``, ``fd``, ``flush``)
are used, so it runs against whatever ``meshd`` imports: ``cd OTHER_TREE && PYTHONPATH=.
python THIS_TREE/bench/access_log.py`` measures another checkout (the figures of
docs/perf/access-log.md compare two so).
"""

from __future__ import annotations

import argparse
import os
import time
import timeit
import types
from collections.abc import Callable
from typing import Any

from bench.micro import calls
from meshd.config import Address, ListenerConfig
from meshd.config_access_log import AccessLogConfig
from meshd.discovery.api import Endpoint
from meshd.worker import observe
from meshd.worker.access_log import AccessLog
from meshd.worker.peer import PLAINTEXT

WRK = [(b"Host", b"bench")]
VARIED = [(b"Host", b"web"), (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
          (b"Accept", b"text/html,*/*;q=0.8"), (b"Accept-Encoding", b"gzip, deflate, br"),
          (b"Accept-Language", b"en-GB,en;q=0.5"), (b"Cookie", b"session=abc; theme=dark"),
          (b"Referer", b"http://web/index"), (b"X-Request-Id", b"7f3e9a"),
          (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
          (b"Connection", b"keep-alive")]
CLIENTS = [f"10.0.0.{i}".encode() for i in range(16)]


def _hook(alog: AccessLog, varied: bool) -> Callable[[], None]:
    """One request's end, as a client side calls it (a fresh path each one if ``varied``)."""
    listener = ListenerConfig(name="outbound", listen=Address("127.0.0.1", 1),
                              direction="outbound")
    worker: Any = types.SimpleNamespace(access_log=alog, tap=None, tracer=None)
    call: Any = types.SimpleNamespace(tried=[0], endpoints=(Endpoint("127.0.0.1", 8080),))
    headers = VARIED if varied else WRK
    authority = b"web" if varied else b"bench"
    # made beforehand, so that the hook's figure is the hook's: a client's address is
    # asked of the connection (cached there), a path comes from the parser
    clients = [(lambda c=c: c) for c in (CLIENTS if varied else CLIENTS[:1])] * (1024 // 16)
    paths = ([b"/api/v1/items/%d?page=%d" % (i, i % 7) for i in range(1024)] if varied
             else [b"/"] * 1024)
    started = time.monotonic()
    n = [0]

    def hook() -> None:
        i = n[0] = (n[0] + 1) & 1023
        observe.request(worker, listener, clients[i % len(clients)], PLAINTEXT, "web", None,
                        b"GET", authority, paths[i], 200, call, started, headers, None, None,
                        0, 100)
    return hook


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.access_log")
    parser.add_argument("--number", type=int, default=20_000, help="requests per run")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    null = os.open(os.devnull, os.O_WRONLY)
    print(f"{'case':14s} {'hook us':>8s} {'calls':>6s} {'line us':>8s} {'calls':>6s}")
    for fmt in ("json", "text"):
        for varied in (False, True):
            alog = AccessLog(AccessLogConfig(path=os.devnull, format=fmt, queue=10 ** 9))
            alog.fd = null  # as open() would, without the writer greenlet
            hook = _hook(alog, varied)
            hook()
            alog.flush()  # warm: the listener's and endpoint's texts are made once
            hook_calls = calls(hook)
            alog.queue.clear()
            hook_us = min(timeit.repeat(hook, number=args.number, repeat=args.repeat,
                                        timer=time.process_time)) / args.number * 1e6
            alog.queue.clear()
            best = float("inf")
            for _ in range(args.repeat):
                for _ in range(args.number):
                    hook()
                t0 = time.process_time()
                alog.flush()
                best = min(best, time.process_time() - t0)
            for _ in range(100):
                hook()
            line_calls = calls(alog.flush)
            print(f"{fmt + (', varied' if varied else ', wrk'):14s} {hook_us:8.2f} "
                  f"{hook_calls:6d} {best / args.number * 1e6:8.2f} {line_calls / 100:6.1f}")
    os.close(null)


if __name__ == "__main__":
    main()
