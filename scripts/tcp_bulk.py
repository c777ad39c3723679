"""Bulk through a meshd TCP listener (issue 17, docs/perf/tcp.md): MiB megabytes from a
client through one worker to a sink, the worker's CPU per GiB, ``ROUNDS`` times.

Run from the tree to measure (its meshd is started from the current directory):
``.venv/bin/python -m scripts.tcp_bulk [MiB] [ROUNDS]``. Not part of the test suite."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.procs import start_meshd
from meshd.shm import STATE_SERVING
from meshd.testing.harness import free_port


def _sink(lsn: socket.socket) -> None:
    """Each connection read to its end, then told how many bytes came."""
    while True:
        conn, _ = lsn.accept()

        def drain(c: socket.socket = conn) -> None:
            n = 0
            while data := c.recv(1 << 20):
                n += len(data)
            c.sendall(n.to_bytes(8, "big"))
            c.close()
        threading.Thread(target=drain, daemon=True).start()


def _ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def main() -> int:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    lsn = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_sink, args=(lsn,), daemon=True).start()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshd-bulk-")))
        port = free_port()
        meshd = start_meshd(workdir, 1, 0, lsn.getsockname()[1], name=f"bulk{os.getpid()}",
                            listeners=(f'[[listener]]\nname = "tcp"\nlisten = "127.0.0.1:{port}"\n'
                                       f'direction = "outbound"\nprotocol = "tcp"\n'
                                       f'service = "bench"\n\n'))
        stack.callback(meshd.stop)
        workers: list[int] = []
        for _ in range(100):
            if workers := meshd.worker_pids(STATE_SERVING):
                break
            time.sleep(0.1)
        worker = workers[0]
        chunk = b"x" * (1 << 20)
        per = 1e3 / os.sysconf("SC_CLK_TCK") / (size / 1024)
        for r in range(rounds):
            u0, s0 = _ticks(worker)
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
                for _ in range(size):
                    c.sendall(chunk)
                c.shutdown(socket.SHUT_WR)
                got = int.from_bytes(c.recv(8), "big")
            took = time.perf_counter() - t0
            u1, s1 = _ticks(worker)
            if got != size << 20:
                print(f"the sink got {got} bytes of {size << 20}", file=sys.stderr)
                return 1
            print(f"round {r}: {size} MiB in {took:.2f} s ({size / took:,.0f} MiB/s), worker "
                  f"CPU {(u1 - u0 + s1 - s0) * per:.0f} ms/GiB (user {(u1 - u0) * per:.0f}, "
                  f"sys {(s1 - s0) * per:.0f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
