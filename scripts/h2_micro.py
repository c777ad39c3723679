"""The cost of h2 per request, in memory: an h2 client and server connection configured as
meshd's, one request and response through both (client send, server receive, server send,
client receive), with the hpack package's codec and with meshd's (meshd.proto.hpack_codec,
plus the per-frame repr meshd.proto.h2_connection skips). Rounds alternate the two and the
ratio is taken within each round (the machine is shared and noisy).

``--against REV``: meshd's connection class as it is at git revision REV (its module
loaded from git) against the tree's, instead of the hpack package against meshd. Times
are CPU time (``time.process_time``): a preempted phase does not count.

    .venv/bin/python scripts/h2_micro.py [--requests N] [--rounds R] [--against REV]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from typing import Any

import h2.connection
import h2.events

from meshd.proto.h2_connection import H2Connection, configuration

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
           (b":authority", b"web"), (b"user-agent", b"meshd-bench"), (b"accept", b"*/*")]
RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"),
            (b"date", b"Tue, 01 Dec 2026 05:00:00 GMT"), (b"content-type", b"text/plain"),
            (b"content-length", b"93"), (b"last-modified", b"Tue, 01 Dec 2026 04:00:00 GMT")]
BODY = b"x" * 93
PHASES = ("client send", "server receive", "server send", "client receive")


def at_revision(rev: str) -> Any:
    """meshd.proto.h2_connection's H2Connection as it is at git revision ``rev``."""
    path = "meshd/proto/h2_connection.py"
    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType(f"h2_connection_{rev}")
    module.__file__ = path
    exec(compile(source, path, "exec"), module.__dict__)  # the module at REV, from git
    return module.H2Connection


def pair(meshd: bool, cls: Any = H2Connection) -> tuple[h2.connection.H2Connection,
                                                        h2.connection.H2Connection]:
    if meshd:
        client: h2.connection.H2Connection = cls(True, 65536)
        server: h2.connection.H2Connection = cls(False, 65536)
    else:
        client = h2.connection.H2Connection(configuration(True))
        server = h2.connection.H2Connection(configuration(False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.increment_flow_control_window(2**30)
    server.increment_flow_control_window(2**30)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def run(meshd: bool, requests: int, cls: Any = H2Connection) -> list[float]:
    """µs per request in each phase (CPU time)."""
    client, server = pair(meshd, cls)
    spent = [0.0] * 4
    clock = time.process_time
    for _ in range(requests):
        t0 = clock()
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST, end_stream=True)
        wire = client.data_to_send()
        t1 = clock()
        server.receive_data(wire)
        t2 = clock()
        server.send_headers(sid, RESPONSE)
        server.send_data(sid, BODY, end_stream=True)
        wire = server.data_to_send()
        t3 = clock()
        for event in client.receive_data(wire):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, sid)
        client.data_to_send()
        t4 = clock()
        for i, (a, b) in enumerate(((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            spent[i] += b - a
    return [s / requests * 1e6 for s in spent]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", metavar="REV", help="meshd at REV against the tree")
    args = parser.parse_args()
    ratios = []
    last: dict[str, list[float]] = {}
    old = at_revision(args.against) if args.against else None
    for _ in range(args.rounds):
        if old is not None:
            last = {args.against: run(True, args.requests, old),
                    "tree": run(True, args.requests)}
            ratios.append(sum(last["tree"]) / sum(last[args.against]))
            continue
        last = {"hpack": run(False, args.requests), "meshd": run(True, args.requests)}
        ratios.append(sum(last["meshd"]) / sum(last["hpack"]))
    print(f"µs per request, last of {args.rounds} rounds of {args.requests:,}:")
    print("| code | " + " | ".join(PHASES) + " | total |")
    print("|---|" + "---:|" * 5)
    for name, phases in last.items():
        print(f"| {name} | " + " | ".join(f"{p:.1f}" for p in phases) + f" | {sum(phases):.1f} |")
    names = "/".join(reversed(last))
    print(f"\nper-round ratio {names}: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
