"""`python -m bench.tracing`: what ``[tracing]`` costs a worker per request.

The request path's tracing hook as the client sides run it: ``Tracer.begin`` on the
request's head (a fresh list, as the parser hands it over), then ``Tracer.finish`` when
``begin`` handed back a span start (as ``meshd.worker.observe`` does; before, every
request's start, which ``finish`` dropped unless sampled). Per case, three figures:
- ``us``: process CPU time per hook (timeit with ``time.process_time``, the best of
  ``--repeat`` runs, so other processes on a busy machine weigh less);
- ``calls``: the function calls one hook makes (Python and C, counted with
  ``sys.setprofile``): deterministic, the work itself rather than its time;
- ``+bytes``: what the hook adds to the head the upstream gets.

Cases: ``wrk`` is ``make bench``'s request (Host only), ``browser`` a head of ten fields;
"unsampled" is sample_rate 0 (what 99 % of requests get at 0.01), "sampled" 1 (a span
queued: the queue is emptied between runs, its encoding is the exporter's, not here),
"incoming" a W3C context from the client with its sampled flag.

Runs against whatever ``meshd`` imports: ``cd OTHER_TREE && PYTHONPATH=. python
THIS_TREE/bench/tracing.py`` measures another checkout (same hook, its ``begin``).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.micro import best, calls
from meshd.config import Address, ListenerConfig
from meshd.config_tracing import TracingConfig
from meshd.worker.peer import PLAINTEXT
from meshd.worker.tracing import Tracer

WRK = [(b"Host", b"bench")]
BROWSER = [(b"Host", b"web"), (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
           (b"Accept", b"text/html,*/*;q=0.8"), (b"Accept-Encoding", b"gzip, deflate, br"),
           (b"Accept-Language", b"en-GB,en;q=0.5"), (b"Cookie", b"session=abc; theme=dark"),
           (b"Referer", b"http://web/index"), (b"X-Request-Id", b"7f3e9a"),
           (b"Content-Type", b"text/plain"), (b"Connection", b"keep-alive")]
INCOMING = [*WRK, (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
INCOMING_UNSAMPLED = [*WRK, (b"traceparent",
                             b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]


def _hook(tracer: Tracer, head: list[tuple[bytes, bytes]], listener: ListenerConfig) -> Any:
    def hook() -> list[tuple[bytes, bytes]]:
        out, started = tracer.begin(list(head))
        if started is not None:
            tracer.finish(started, listener, "web", None, b"GET", b"bench", b"/", 200,
                          None, PLAINTEXT)
            tracer.queue.clear()
        return out
    return hook


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing")
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    listener = ListenerConfig(name="outbound", listen=Address("127.0.0.1", 1), direction="outbound")
    unsampled = Tracer(TracingConfig(sample_rate=0.0))
    sampled = Tracer(TracingConfig(sample_rate=1.0, queue=10 ** 9))
    cases = [("wrk, unsampled", unsampled, WRK), ("browser, unsampled", unsampled, BROWSER),
             ("wrk, sampled", sampled, WRK), ("incoming, sampled", unsampled, INCOMING),
             ("incoming, unsampled", unsampled, INCOMING_UNSAMPLED)]
    print(f"{'case':22s} {'us':>6s} {'calls':>6s} {'+bytes':>7s}")
    for name, tracer, head in cases:
        hook = _hook(tracer, head, listener)
        hook()  # warm (inject's plan is cached on first use)
        n_calls = calls(hook)
        added = sum(len(k) + len(v) + 4 for k, v in hook()) - sum(len(k) + len(v) + 4
                                                                   for k, v in head)
        print(f"{name:22s} {best(hook, args.number, args.repeat) * 1e6:6.2f} {n_calls:6d} "
              f"{added:+7d}")


if __name__ == "__main__":
    main()
