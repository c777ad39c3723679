"""The cost of h2 per request, in memory: an h2 client and server connection configured as
meshd's, one request and response through both (client send, server receive, server send,
client receive), with the hpack package's codec and with meshd's (meshd.proto.hpack_codec,
plus the per-frame repr meshd.proto.h2_connection skips). Rounds alternate the two and the
ratio is taken within each round (the machine is shared and noisy).

    .venv/bin/python scripts/h2_micro.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

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


def pair(meshd: bool) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    if meshd:
        client: h2.connection.H2Connection = H2Connection(True, 65536)
        server: h2.connection.H2Connection = H2Connection(False, 65536)
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


def run(meshd: bool, requests: int) -> list[float]:
    """µs per request in each phase."""
    client, server = pair(meshd)
    spent = [0.0] * 4
    clock = time.perf_counter
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
    args = parser.parse_args()
    ratios = []
    last: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        last = {"hpack": run(False, args.requests), "meshd": run(True, args.requests)}
        ratios.append(sum(last["meshd"]) / sum(last["hpack"]))
    print(f"µs per request, last of {args.rounds} rounds of {args.requests:,}:")
    print("| codec | " + " | ".join(PHASES) + " | total |")
    print("|---|" + "---:|" * 5)
    for name, phases in last.items():
        print(f"| {name} | " + " | ".join(f"{p:.1f}" for p in phases) + f" | {sum(phases):.1f} |")
    print(f"\nper-round ratio meshd/hpack: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
