"""The mTLS half of scenario two-hop: a second pair of meshds with ``[identity]`` (the
``files`` provider, certificates from ``meshd.identity.ca``), whose hop is mTLS, and the
rate of new mTLS connections one worker of the inbound meshd sustains (``openssl
s_time -new``: a fresh TLS 1.3 handshake with a client certificate and one GET each)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import CLK_TCK, BenchError
from bench.procs import cpu_ticks, start_meshd
from meshd.identity import ca
from meshd.testing.harness import Meshd, free_port

TD = "bench.local"
SERVER_ID = f"spiffe://{TD}/service/web"
CLIENT_ID = f"spiffe://{TD}/service/client"


def _identity(workdir: Path, name: str, authority: ca.Issued, spiffe_id: str) -> tuple[str, Path]:
    """The [identity] table of a files provider holding a fresh leaf for ``spiffe_id``,
    and the PEM (certificate then key) a client may present."""
    folder = workdir / f"identity-{name}"
    folder.mkdir(mode=0o700)
    leaf = ca.issue(authority, spiffe_id)
    for file, data in (("tls.crt", leaf.cert_pem), ("tls.key", leaf.key_pem),
                       ("ca.crt", authority.cert_pem)):
        (folder / file).write_bytes(data)
        (folder / file).chmod(0o600)
    both = folder / "client.pem"
    both.write_bytes(leaf.cert_pem + leaf.key_pem)
    both.chmod(0o600)
    return (f'[identity]\nprovider = "files"\ntrust_domain = "{TD}"\n'
            f'cert_file = "{folder}/tls.crt"\nkey_file = "{folder}/tls.key"\n'
            f'ca_file = "{folder}/ca.crt"\n'), both


@dataclass
class MtlsPair:
    a: Meshd
    b: Meshd
    a_port: int        # A's outbound listener ("web" is meshed behind B, over mTLS)
    b_port: int        # B's strict inbound listener
    ca_file: Path
    client_pem: Path   # a certificate + key B accepts (for the new-connection loop)


def start_pair(workdir: Path, workers: int, backend_port: int,
               stack: contextlib.ExitStack) -> MtlsPair:
    authority = ca.new_ca(TD)
    ca_file = workdir / "bench-ca.pem"
    ca_file.write_bytes(authority.cert_pem)
    b_identity, _ = _identity(workdir, "hop-b-mtls", authority, SERVER_ID)
    a_identity, client_pem = _identity(workdir, "hop-a-mtls", authority, CLIENT_ID)
    b_port = free_port()
    b = start_meshd(workdir, workers, 0, backend_port, name="hop-b-mtls", extra=b_identity,
                    listeners=(
        f'[[listener]]\nname = "inbound"\nlisten = "127.0.0.1:{b_port}"\n'
        f'direction = "inbound"\nprotocol = "auto"\nforward = "127.0.0.1:{backend_port}"\n'
        f'mtls = "strict"\n\n'))
    stack.callback(b.stop)
    a_port = free_port()
    a = start_meshd(workdir, workers, a_port, backend_port, name="hop-a-mtls", extra=a_identity,
                    services=(f'web = [{{ address = "127.0.0.1:{backend_port}", meshed = true, '
                              f'inbound_port = {b_port}, identity = "{SERVER_ID}" }}]\n'))
    stack.callback(a.stop)
    return MtlsPair(a, b, a_port, b_port, ca_file, client_pem)


@dataclass
class NewConnections:
    seconds: float
    connections: int
    per_second: float            # achieved by the client (openssl s_time, one process)
    worker_cpu_us_per_conn: float  # meshd B's CPU (all its processes) per connection
    one_worker_ceiling: float    # 1e6 / that: connections/s one worker would sustain at 100 %

    @property
    def command(self) -> str:
        return ("openssl s_time -connect 127.0.0.1:B -new -tls1_3 -cert client.pem "
                f"-CAfile ca.pem -www / -time {self.seconds:g}")


def new_connections(pair: MtlsPair, seconds: float) -> NewConnections:
    """Fresh mTLS connections to B's inbound port for ``seconds``, one request each."""
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{pair.b_port}", "-new", "-tls1_3",
           "-cert", str(pair.client_pem), "-CAfile", str(pair.ca_file), "-www", "/",
           "-time", f"{max(1, round(seconds))}"]
    before, started = cpu_ticks(pair.b.pid), time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"openssl s_time failed: {e}") from None
    after, wall = cpu_ticks(pair.b.pid), time.monotonic() - started
    m = re.search(r"^(\d+) connections in ([\d.]+)s; ([\d.]+) connections/user sec",
                  out.stdout, re.M)
    real = re.search(r"^(\d+) connections in (\d+) real seconds", out.stdout, re.M)
    if m is None or real is None or int(real[1]) == 0:
        raise BenchError(f"openssl s_time: no connections:\n{out.stdout}{out.stderr}")
    conns = int(real[1])
    cpu = (after - before) / CLK_TCK * 1e6 / conns
    return NewConnections(seconds, conns, conns / max(int(real[2]), wall),
                          cpu, 1e6 / cpu if cpu else 0.0)
