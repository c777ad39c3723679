"""Transparent capture for real: two network namespaces joined by a veth pair (addresses
exist only inside them), the rules of `meshd iptables` applied in the application's
namespace, meshd running there as uid 2102, and real clients and servers on both sides.

The application's namespace holds an HTTP application (the test backend on :8080) and
meshd; the peer's namespace an HTTP server on :8080 and two servers that speak first
(a database-like one on 5432, an opaque port, and an SMTP-like one on 2525, which is
not). Cases (one meshd, one test each, in the order they run):

- outbound HTTP/1.1 to IP:port that discovery does not know: to the original
  destination through meshd (503 "unknown service" before);
- outbound HTTP/1.1 naming an unknown host: the same, after discovery said nobody knows it;
- outbound HTTP/1.1 whose Host discovery knows: to that service's endpoints, wherever
  the connection was headed;
- outbound HTTP/2 (prior knowledge) to IP:port: through meshd too;
- an opaque port whose server speaks first: tunneled at once (detection skipped);
- a server-speaks-first protocol on another port: tunneled after the detect timeout;
- inbound: a connection to the application's port passes through the inbound listener;
- a skipped inbound port (the probe port) reaches meshd's probe listener directly, which
  answers /ready but not /endpoints.

Needs root, `ip` and iptables (make tools TOOLS="ip iptables"): missing ones fail the
test, they do not skip it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from meshd.testing.harness import http_get, wait_for

T = TypeVar("T")
PID = os.getpid()
APP_NS, PEER_NS = f"mdapp{PID}", f"mdpeer{PID}"
APP_IP, PEER_IP = "10.123.0.1", "10.123.0.2"
PROXY_UID = 2102
ADMIN, PROBE, OUTBOUND, INBOUND = 4191, 4192, 4140, 4143
CLONE_NEWNET = 0x40000000
STEP_TIMEOUT = 30.0
_libc = ctypes.CDLL(None, use_errno=True)


def _run(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"


def in_ns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = STEP_TIMEOUT) -> T:
    """``fn(*args)`` on a thread that entered the namespace ``ns`` (sockets it creates
    live there, and stay there whichever thread uses them later)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{fn.__name__} in {ns} did not finish in {timeout}s")
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


class SpeaksFirst:
    """A server (in the peer namespace) that greets first, then echoes one line."""

    def __init__(self, port: int, banner: bytes) -> None:
        self.banner = banner
        self.listener = in_ns(PEER_NS, socket.create_server, (PEER_IP, port))
        self.listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    conn.sendall(self.banner)
                    line = b""
                    while not line.endswith(b"\n") and len(line) < 1024:
                        chunk = conn.recv(1024)
                        if not chunk:
                            break
                        line += chunk
                    conn.sendall(b"echo: " + line)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.thread.join(5)


def talk_first_speaker(port: int) -> tuple[bytes, bytes]:
    """(greeting, answer) of the application's client to PEER_IP:port (runs in APP_NS)."""
    with socket.create_connection((PEER_IP, port), timeout=10) as s:
        greeting = s.recv(1024)
        s.sendall(b"ping\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            answer += chunk
        return greeting, answer


def metric(name: str, *labels: str) -> float:
    """The sum of the samples of ``name`` on meshd's /metrics whose line has every label."""
    body = in_ns(APP_NS, http_get, "127.0.0.1", ADMIN, "/metrics")[2].decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name + "{") and all(lb in line for lb in labels))


def curl(*args: str) -> tuple[int, str]:
    """(status, body) of curl run by the application (in its namespace, as root)."""
    proc = subprocess.run(["ip", "netns", "exec", APP_NS, "curl", "-sS", "-m", "15",
                           "-o", "-", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    body, _, status = proc.stdout.rpartition("\n")
    return int(status), body


CONFIG = """
workers = 1
state_dir = "{work}/state"
shm_dir = "{work}/shm"
[limits]
detect_timeout = "300ms"
[admin]
listen = "127.0.0.1:{admin}"
probe_listen = "0.0.0.0:{probe}"
[[discovery]]
name = "local"
plugin = "static"
[discovery.services]
web = ["{peer}:8080"]
[[listener]]
name = "outbound"
listen = "127.0.0.1:{outbound}"
direction = "outbound"
protocol = "auto"
[[listener]]
name = "inbound"
listen = "0.0.0.0:{inbound}"
direction = "inbound"
protocol = "auto"
forward = "127.0.0.1:8080"
"""


@pytest.fixture(scope="module")
def pod() -> Iterator[int]:
    """The two namespaces, servers in both, the rules and meshd (uid 2102); yields
    meshd's pid. Everything is torn down in the finally, namespaces last."""
    missing = [t for t in ("ip", "iptables-restore", "iptables-save", "curl", "setpriv")
               if shutil.which(t) is None]
    assert not missing, f"missing tools {missing}: make tools TOOLS=\"ip iptables curl\""
    assert os.geteuid() == 0, "network namespaces and iptables need root"
    work = Path(tempfile.mkdtemp(prefix=f"meshd-capture-{PID}-"))
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[SpeaksFirst] = []
    log_path = work / "meshd.log"
    stack = contextlib.ExitStack()  # the log file, closed after the processes
    try:
        work.chmod(0o755)
        for d in ("state", "shm"):
            (work / d).mkdir()
            os.chown(work / d, PROXY_UID, PROXY_UID)
        config = work / "meshd.toml"
        config.write_text(CONFIG.format(work=work, admin=ADMIN, probe=PROBE, peer=PEER_IP,
                                        outbound=OUTBOUND, inbound=INBOUND))
        config.chmod(0o644)
        veth_a, veth_b = f"mdva{PID}", f"mdvb{PID}"
        _run("ip", "netns", "add", APP_NS)
        _run("ip", "netns", "add", PEER_NS)
        _run("ip", "link", "add", veth_a, "netns", APP_NS, "type", "veth",
             "peer", "name", veth_b, "netns", PEER_NS)
        for ns, dev, ip in ((APP_NS, veth_a, APP_IP), (PEER_NS, veth_b, PEER_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # the rules, from the real command, as the init container applies them
        _run("ip", "netns", "exec", APP_NS, sys.executable, "-m", "meshd", "iptables",
             "--proxy-uid", str(PROXY_UID), "--inbound-port", str(INBOUND),
             "--outbound-port", str(OUTBOUND), "--skip-inbound-ports", str(PROBE))
        log = stack.enter_context(open(log_path, "ab"))
        backend = [sys.executable, "-m", "meshd.testing.backend"]
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", PEER_NS, *backend, "--listen", f"{PEER_IP}:8080",
             "--name", "peer"], stdout=subprocess.DEVNULL, stderr=log))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", APP_NS, *backend, "--listen", "0.0.0.0:8080",
             "--name", "app"], stdout=subprocess.DEVNULL, stderr=log))
        servers.append(SpeaksFirst(5432, b"HELLO db\n"))
        servers.append(SpeaksFirst(2525, b"220 mail ESMTP\n"))
        meshd = subprocess.Popen(
            ["ip", "netns", "exec", APP_NS, "setpriv", f"--reuid={PROXY_UID}",
             f"--regid={PROXY_UID}", "--clear-groups", "--", sys.executable, "-m", "meshd",
             "run", "-c", str(config)], stdout=log, stderr=log)
        procs.append(meshd)

        def ready() -> bool:
            if meshd.poll() is not None:
                raise RuntimeError(f"meshd exited {meshd.returncode}: {log_path.read_text()}")
            try:
                return in_ns(APP_NS, http_get, "127.0.0.1", ADMIN, "/ready", None, 1.0)[0] == 200
            except OSError:
                return False

        def listening(ns: str, host: str, port: int) -> bool:
            try:
                in_ns(ns, socket.create_connection, (host, port), 1.0).close()
                return True
            except OSError:
                return False

        wait_for(ready, 30, 0.2, what="meshd ready in the namespace")
        wait_for(lambda: listening(PEER_NS, PEER_IP, 8080), 20, what="peer backend")
        wait_for(lambda: listening(APP_NS, "127.0.0.1", 8080), 20, what="app backend")
        yield meshd.pid  # ip netns exec and setpriv exec: the pid is meshd's master
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for server in servers:
            server.close()
        stack.close()
        for ns in (APP_NS, PEER_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=STEP_TIMEOUT)
        with contextlib.suppress(OSError):
            shutil.rmtree(work)


OUT = 'listener="outbound"'


def test_rules_are_in_place_and_meshd_runs_as_the_proxy_uid(pod: int) -> None:
    saved = subprocess.run(["ip", "netns", "exec", APP_NS, "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, timeout=STEP_TIMEOUT).stdout
    hooks = [line for line in saved.splitlines() if line.startswith(("-A OUTPUT", "-A PREROUTING"))]
    assert any("-j MESHD_OUTPUT" in h for h in hooks) and any("-j MESHD_INBOUND" in h for h in hooks)
    assert any(f"--uid-owner {PROXY_UID}" in line and "-j RETURN" in line
               for line in saved.splitlines())
    with open(f"/proc/{pod}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert uids == [str(PROXY_UID)] * 4  # real, effective, saved, file system
    # applying again (an init container run twice) leaves the rules as they are
    _run("ip", "netns", "exec", APP_NS, sys.executable, "-m", "meshd", "iptables")
    again = subprocess.run(["ip", "netns", "exec", APP_NS, "iptables-save", "-t", "nat"],
                           capture_output=True, text=True, timeout=STEP_TIMEOUT).stdout
    assert again.count("-j MESHD_OUTPUT") == saved.count("-j MESHD_OUTPUT")


def test_outbound_http_to_an_address_discovery_does_not_know_goes_to_it(pod: int) -> None:
    before = metric("request_total", OUT, 'service=""')
    status, body = curl(f"http://{PEER_IP}:8080/hello")
    assert (status, body) == (200, "peer /hello\n")
    assert metric("request_total", OUT, 'service=""') == before + 1  # through meshd


def test_outbound_http_to_an_unknown_name_goes_to_the_original_destination(pod: int) -> None:
    before = metric("request_total", OUT, 'service=""')
    for _ in range(2):  # the first asks discovery (nobody knows it), the second knows that
        status, body = curl("-H", "Host: shop.example", f"http://{PEER_IP}:8080/cart")
        assert (status, body) == (200, "peer /cart\n")
    assert metric("request_total", OUT, 'service=""') == before + 2


def test_outbound_http_naming_a_known_service_is_routed_by_discovery(pod: int) -> None:
    before = metric("request_total", OUT, 'service="web"')
    # port 9 of the peer is closed: only discovery's endpoint (:8080) can answer
    status, body = curl("-H", "Host: web", f"http://{PEER_IP}:9/routed")
    assert (status, body) == (200, "peer /routed\n")
    assert metric("request_total", OUT, 'service="web"') == before + 1


def test_outbound_http2_to_an_address_goes_through_meshd(pod: int) -> None:
    before = metric("request_total", OUT, 'service=""')
    status, body = curl("--http2-prior-knowledge", f"http://{PEER_IP}:8080/h2")
    assert (status, body) == (200, "peer /h2\n")
    assert metric("request_total", OUT, 'service=""') == before + 1


def test_opaque_port_server_speaks_first_is_tunneled_at_once(pod: int) -> None:
    before = metric("meshd_protocol_detect_total", OUT, 'result="skipped"')
    greeting, answer = in_ns(APP_NS, talk_first_speaker, 5432)
    assert (greeting, answer) == (b"HELLO db\n", b"echo: ping\n")
    assert metric("meshd_protocol_detect_total", OUT, 'result="skipped"') == before + 1


def test_server_speaks_first_on_another_port_is_tunneled_after_detection(pod: int) -> None:
    before = metric("meshd_protocol_detect_total", OUT, 'result="timeout"')
    greeting, answer = in_ns(APP_NS, talk_first_speaker, 2525)
    assert (greeting, answer) == (b"220 mail ESMTP\n", b"echo: ping\n")
    assert metric("meshd_protocol_detect_total", OUT, 'result="timeout"') == before + 1


def test_inbound_connection_to_the_app_port_passes_the_inbound_listener(pod: int) -> None:
    before = metric("request_total", 'listener="inbound"')
    status, _headers, body = in_ns(PEER_NS, http_get, APP_IP, 8080, "/inbound")
    assert (status, body) == (200, b"app /inbound\n")
    assert metric("request_total", 'listener="inbound"') == before + 1


def test_skipped_inbound_port_reaches_the_probe_listener_directly(pod: int) -> None:
    status, _headers, body = in_ns(PEER_NS, http_get, APP_IP, PROBE, "/ready")
    assert (status, body) == (200, b"ready\n")
    # the probe listener answers nothing else (redirected, the app would have answered)
    assert in_ns(PEER_NS, http_get, APP_IP, PROBE, "/endpoints")[0] == 404
