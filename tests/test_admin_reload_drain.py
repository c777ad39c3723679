"""The admin and probe listeners across reloads: a control process told to stop closes
its listening sockets at once (only the next generation's control process accepts from
then on) and lets the connections it already accepted finish: a request begun before
the stop is answered whole, never reset; /tap streams end cleanly with it."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from collections import Counter

from meshd.testing.harness import free_port, http_get, read_head, tcp_sockets, wait_for

LISTENING = "0A"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _stopped_accepting(pid: int, port: int) -> bool:
    """The control process ``pid`` holds no listening socket on ``port`` (or is gone)."""
    try:
        return (port, 0, LISTENING) not in tcp_sockets(pid)
    except FileNotFoundError:
        return True


def _with_probe(mesh, services: dict[str, list[str]], **kwargs):
    probe = free_port()
    text, ports = mesh.config(services, **kwargs)
    text = text.replace("[admin]\n", f'[admin]\nprobe_listen = "127.0.0.1:{probe}"\n', 1)
    ports["probe"] = probe
    return mesh.start(text, ports)


def _wait_serving(m, generation: int) -> None:
    """The master counts ``generation`` serving: a HUP now retires it once the next one
    serves (a HUP before that supersedes it at once, as a booting one)."""
    wait_for(lambda: f"generation {generation} serving" in m.log(), timeout=60,
             what=f"generation {generation} serving")


def _hup_and_wait_retired(m, generation: int) -> int:
    """HUP; return once generation ``generation`` alone is left and the previous control
    process has exited. Returns that process's pid."""
    _wait_serving(m, generation - 1)
    old = m.control_pids()
    assert len(old) == 1, old
    m.signal(signal.SIGHUP)
    wait_for(lambda: {s.generation for s in m.slots()} == {generation}, timeout=60,
             what=f"generation {generation} alone in the process table")
    wait_for(lambda: not _alive(old[0]), timeout=30, what=f"old control process {old[0]} gone")
    return old[0]


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """A whole HTTP/1.1 response with a Content-Length, read from ``sock``."""
    data = read_head(sock)
    assert b"\r\n\r\n" in data, f"no whole response head: {data!r}"
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the body ended after {len(body)} of {length} bytes"
        body += chunk
    return status, headers, body


def test_a_request_begun_before_the_reload_is_answered_whole(mesh, backends):
    """A request head half sent to the old control process when it is told to stop: it
    stops listening (the new one takes new connections), yet answers this request."""
    a = backends("a")
    m = _with_probe(mesh, {"web": [a.address]}, workers=1)
    _wait_serving(m, 1)
    old = m.control_pids()
    assert len(old) == 1, old
    admin_port, probe_port = m.ports["admin"], m.ports["probe"]
    held = []
    try:
        # Only generation 1 listens: it accepts both. Half of each head is sent.
        for port, path in ((admin_port, "/status"), (probe_port, "/ready")):
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n".encode())
            held.append(s)
        m.signal(signal.SIGHUP)
        wait_for(lambda: _stopped_accepting(old[0], admin_port)
                 and _stopped_accepting(old[0], probe_port), timeout=60,
                 what=f"old control process {old[0]} no longer listening")
        for s in held:
            s.sendall(b"Accept: */*\r\n\r\n")
        status, headers, body = _response(held[0])
        assert status == 200 and b'"generation": 1' in body, (status, body[:200])
        assert headers.get("connection") == "close", headers   # the client goes elsewhere next
        status, headers, body = _response(held[1])
        assert status in (200, 503) and body.startswith((b"ready", b"not ready")), (status, body)
        assert headers.get("connection") == "close", headers
        assert held[0].recv(1) == b""   # then closed, not reset
    finally:
        for s in held:
            s.close()
    wait_for(lambda: not _alive(old[0]), timeout=30, what=f"old control process {old[0]} gone")
    # the new generation answers
    wait_for(lambda: b'"generation": 2' in http_get("127.0.0.1", admin_port, "/status")[2],
             timeout=30, what="generation 2 answering /status")


CLIENTS = ("probe", "admin", "kept-alive")


def test_hups_under_admin_and_probe_load_reset_nothing(mesh, backends):
    """New connections to /ready on the probe port and to /status on admin, and one
    kept-alive admin connection, in a loop across three reloads: every answer is a whole
    HTTP response (the old control process never resets what it accepted)."""
    a = backends("a")
    m = _with_probe(mesh, {"web": [a.address]}, workers=1)
    admin_port, probe_port = m.ports["admin"], m.ports["probe"]
    stop = threading.Event()
    errors: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    deadline = time.monotonic() + 240

    def fresh(port: int, path: str, name: str) -> None:
        for _ in range(100000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                status, _, body = http_get("127.0.0.1", port, path, timeout=20)
                statuses[name, status] += 1
                if not body:
                    errors.append(f"{name}: {status} with no body")
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
            time.sleep(0.002)

    def kept_alive() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=20)
        try:
            for _ in range(100000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    conn.request("GET", "/live")
                    resp = conn.getresponse()
                    body = resp.read()
                    statuses["kept-alive", resp.status] += 1
                    if body != b"live\n":
                        errors.append(f"kept-alive: {resp.status} {body!r}")
                except (OSError, http.client.HTTPException) as e:
                    errors.append(f"kept-alive: {type(e).__name__}: {e}")
                    conn.close()
                time.sleep(0.002)
        finally:
            conn.close()

    def answers(name: str) -> int:
        return sum(n for (who, _), n in list(statuses.items()) if who == name)

    threads = [threading.Thread(target=fresh, args=(probe_port, "/ready", "probe")),
               threading.Thread(target=fresh, args=(admin_port, "/status", "admin")),
               threading.Thread(target=kept_alive)]
    for t in threads:
        t.start()
    try:
        for generation in (2, 3, 4):
            before = sum(statuses.values())
            wait_for(lambda b=before: sum(statuses.values()) >= b + 30, timeout=60,
                     what="answers before the reload")
            _hup_and_wait_retired(m, generation)
            # every client got answers after this reload too (how many depends on the
            # machine's speed: the test counts none, it waits for each to move on)
            after = {name: answers(name) for name in CLIENTS}
            wait_for(lambda a=after: all(answers(n) >= a[n] + 3 for n in CLIENTS),
                     timeout=60, what="answers to every client after the reload")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == [], (errors[:10], len(errors), dict(statuses))
    assert {status for _, status in statuses} <= {200, 503}, dict(statuses)


def test_a_tap_stream_ends_cleanly_with_its_generation(mesh, backends):
    """A /tap stream open on the old control process ends with the stream's last chunk
    when that process stops: the tap client sees the end, not a cut."""
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    with socket.create_connection(("127.0.0.1", m.ports["admin"]), timeout=30) as s:
        s.sendall(b"GET /tap HTTP/1.1\r\nHost: t\r\n\r\n")
        data = read_head(s)   # once the workers tap
        assert data.startswith(b"HTTP/1.1 200 ") and b"chunked" in data.lower(), data
        _hup_and_wait_retired(m, 2)
        for _ in range(1000):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.endswith(b"\r\n0\r\n\r\n"), data[-200:]   # the last chunk: a clean end
    with socket.create_connection(("127.0.0.1", m.ports["admin"]), timeout=30) as s:
        s.sendall(b"GET /tap HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_head(s).startswith(b"HTTP/1.1 200 ")   # the next generation taps
