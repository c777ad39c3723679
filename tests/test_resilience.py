"""Acceptance tests of the balancing issue (#4) against real meshd processes and real
backends on loopback: GETs survive a dead or failing endpoint, POSTs are never retried,
a failing endpoint is ejected within its failure accrual, probed and returned, and the
retry budget shared by all workers holds when everything fails.

Requests are counted twice: by the clients here (status, ``meshd-error`` and
``x-backend`` of every failure) and at the backends (``/_counts`` of
``meshd.testing.backend``), so a request meshd sent twice, or never, shows.
Every loop is bounded by a request count or a duration, and by a deadline; no
assertion is about speed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from meshd.testing.harness import Backend, free_port, http_get, wait_for

WEB = {"Host": "web"}
CLIENTS = 8            # concurrent keep-alive clients
RECONNECT_EVERY = 50   # a client opens a new connection after this many requests, so that
#                        both workers (which accept from one shared socket) get clients
ACCRUAL = 7            # failure_accrual's default: consecutive failures that eject
# A client has at most one request in flight, so when the failure that ejects an
# endpoint is counted, at most CLIENTS - 1 other requests can already be on their way
# to it: the in-flight allowance on top of ACCRUAL.


@dataclass
class Outcome:
    sent: int = 0
    ok: int = 0
    by_backend: Counter[str] = field(default_factory=Counter)  # 200s by x-backend
    # each failure: (status or exception name, meshd-error, x-backend, path)
    failures: list[tuple[object, str, str, str]] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def summary(self) -> Counter[tuple[object, str, str]]:
        """Failures by (status, meshd-error, x-backend)."""
        return Counter(f[:3] for f in self.failures)


class Load:
    """``clients`` threads, each over a keep-alive connection, sending ``method path``
    until it has sent ``per_client`` requests or ``seconds`` passed (60 s at most), or
    ``stop``. Every answer but a 200 is recorded as a failure, with its details.
    ``conns``: connections opened beforehand, one per client, never replaced (unless
    the server closes one)."""

    def __init__(self, port: int, *, clients: int = CLIENTS, per_client: int | None = None,
                 seconds: float | None = None, method: str = "GET", path: str = "/",
                 body: bytes | None = None,
                 conns: list[http.client.HTTPConnection] | None = None) -> None:
        assert per_client or seconds
        self.port = port
        self.conns = conns
        self.clients = len(conns) if conns else clients
        self.per_client = per_client or 1 << 30
        self.seconds = min(seconds or 60.0, 60.0)
        self.method, self.path, self.body = method, path, body
        self.out = Outcome()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)

    def start(self) -> Load:
        self.out.started = time.monotonic()
        for i in range(self.clients):
            conn = self.conns[i] if self.conns else self._connect()
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, conn: http.client.HTTPConnection) -> None:
        deadline = time.monotonic() + self.seconds
        headers = dict(WEB)
        if self.body is not None:
            headers["Content-Type"] = "application/octet-stream"
        n = 0
        while n < self.per_client and time.monotonic() < deadline and not self._stop.is_set():
            n += 1
            if not self.conns and n % RECONNECT_EVERY == 0:
                conn.close()
                conn = self._connect()
            try:
                conn.request(self.method, self.path, body=self.body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status: object = resp.status
                error = resp.getheader("meshd-error") or ""
                backend = resp.getheader("x-backend") or ""
                if resp.will_close:
                    conn.close()
                    conn = self._connect()
            except Exception as e:  # every failure is recorded
                status, error, backend = type(e).__name__, str(e), ""
                conn.close()
                conn = self._connect()
            with self._lock:
                self.out.sent += 1
                if status == 200:
                    self.out.ok += 1
                    self.out.by_backend[backend] += 1
                else:
                    self.out.failures.append((status, error, backend, self.path))
                self.out.ended = time.monotonic()
        conn.close()

    def served(self) -> Counter[str]:
        """A copy of the successes by backend so far."""
        with self._lock:
            return Counter(self.out.by_backend)

    def stop(self) -> Load:
        self._stop.set()
        return self.join()

    def join(self) -> Load:
        for t in self._threads:
            t.join(75)
        assert not any(t.is_alive() for t in self._threads), "a client is stuck"
        return self

    def run(self) -> Outcome:
        return self.start().join().out


def _counts(b: Backend) -> Counter[str]:
    """Requests the backend received, by "METHOD /path"."""
    status, _, raw = http_get(b.host, b.port, "/_counts")
    assert status == 200
    return Counter(json.loads(raw))


def _endpoint(m, address: str, service: str = "web") -> dict:
    _, _, raw = http_get("127.0.0.1", m.ports["admin"], "/endpoints")
    eps = json.loads(raw)["services"][service]["endpoints"]
    return next(e for e in eps if e["address"] == address)


def _probes(ep: dict) -> int:
    """Probes granted so far: each failed probe ejected the endpoint again, and one may
    be out now."""
    return max(ep["ejections"] - 1, 0) + (ep["state"] == "probing")


def _dead_address() -> str:
    """A loopback port nothing listens on: connecting to it is refused."""
    return f"127.0.0.1:{free_port()}"


def _report(out: Outcome, m) -> str:
    warnings = [line for line in m.log().splitlines() if "WARNING" in line or "ERROR" in line]
    return (f"{out.ok}/{out.sent} ok; failures by (status, meshd-error, x-backend): "
            f"{dict(out.summary)}\nfirst failures: {out.failures[:5]}\n"
            "log (warnings, last 15):\n" + "\n".join(warnings[-15:]))


def _pinned(m, per_worker: int) -> list[list[http.client.HTTPConnection]]:
    """Keep-alive connections, ``per_worker`` accepted by each worker (a list per
    worker): while one worker accepts, the others are stopped, and an answered request
    (a GET / to web) proves the accept."""
    pids = m.worker_pids()
    pinned = []
    for pid in pids:
        others = [p for p in pids if p != pid]
        conns = []
        for p in others:
            os.kill(p, signal.SIGSTOP)
        try:
            for _ in range(per_worker):
                conn = http.client.HTTPConnection("127.0.0.1", m.ports["outbound"], timeout=15)
                conn.request("GET", "/", headers=WEB)
                resp = conn.getresponse()
                resp.read()
                assert not resp.will_close
                conns.append(conn)
        finally:
            for p in others:
                os.kill(p, signal.SIGCONT)
        pinned.append(conns)
    return pinned


# -- 1. GETs survive one bad endpoint of three ------------------------------------------


def test_gets_succeed_with_one_endpoint_refusing_connections(mesh, backends):
    a, b = backends("a"), backends("b")
    dead = _dead_address()
    m = mesh.run({"web": [a.address, b.address, dead]}, workers=2)
    out = Load(m.ports["outbound"], per_client=400).run()
    assert out.sent >= 3000
    assert out.ok >= 0.999 * out.sent, _report(out, m)
    assert _endpoint(m, dead)["state"] in ("ejected", "probing")


def test_gets_succeed_with_one_endpoint_answering_503(mesh, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    http_get(c.host, c.port, "/_fail?code=503")
    m = mesh.run({"web": [a.address, b.address, c.address]}, workers=2)
    out = Load(m.ports["outbound"], per_client=400).run()
    assert out.sent >= 3000
    assert out.ok >= 0.999 * out.sent, _report(out, m)
    assert _counts(c)["GET /"] >= ACCRUAL  # c was tried: that many failures eject it
    assert _endpoint(m, c.address)["state"] in ("ejected", "probing")


# -- 2. POSTs are never retried ------------------------------------------------------------


def test_posts_reach_exactly_one_endpoint_and_are_not_retried(mesh, backends):
    a, b, c = backends("a"), backends("b"), backends("c")
    http_get(c.host, c.port, "/_fail?code=503")
    m = mesh.run({"web": [a.address, b.address, c.address]}, workers=2)
    out = Load(m.ports["outbound"], per_client=100, method="POST", path="/post",
               body=b"p" * 64).run()
    got = {x.name: _counts(x)["POST /post"] for x in (a, b, c)}
    ep = _endpoint(m, c.address)
    detail = f"received {got}; {_report(out, m)}; c: {ep}"
    # Every POST reached exactly one endpoint: none was sent twice, none lost.
    assert sum(got.values()) == out.sent == 800, detail
    # The client saw c's own 503 for each POST c received, and nothing else failed.
    assert out.summary == Counter({(503, "", "c"): got["c"]}), detail
    assert out.ok == got["a"] + got["b"], detail
    # c's share is what it took before its ejection (and any probe after it). Each
    # worker stops sending to c after ACCRUAL failures of its own, so with two workers
    # that is up to 2 x ACCRUAL (see test_accrual_counts_the_failures_of_all_workers).
    assert ep["ejections"] >= 1, detail
    assert ACCRUAL <= got["c"] <= 2 * ACCRUAL + CLIENTS - 1 + _probes(ep), detail
    assert m.metric("retry_total", 'service="web"') == 0
    assert m.metric("retry_budget_exhausted_total", 'service="web"') == 0  # not even asked
    assert m.metric("request_total", 'service="web"') == out.sent


# -- 3. ejection, probes, return -----------------------------------------------------------


def test_failing_endpoint_is_ejected_within_its_accrual_probed_and_returns(mesh, backends):
    """One worker: its own run of failures trips c at once (the control process, which
    ejects on its 100 ms tick, takes over), so c receives ACCRUAL requests plus those
    already on their way (CLIENTS - 1 at most), then only probes."""
    a, b, c = backends("a"), backends("b"), backends("c")
    http_get(c.host, c.port, "/_fail?code=503")
    m = mesh.run({"web": [a.address, b.address, c.address]}, workers=1)
    load = Load(m.ports["outbound"], seconds=40).start()
    try:
        wait_for(lambda: _endpoint(m, c.address)["state"] != "healthy", timeout=10,
                 interval=0.02, what="c ejected")
        at_ejection = _counts(c)["GET /"]
        assert ACCRUAL <= at_ejection <= ACCRUAL + CLIENTS - 1, _endpoint(m, c.address)

        # Probed later: a probe fails and ejects c again (with a doubled backoff).
        wait_for(lambda: _endpoint(m, c.address)["ejections"] >= 2, timeout=10,
                 what="a failed probe")
        received = _counts(c)["GET /"]
        ep = _endpoint(m, c.address)  # read after the count: it knows every probe counted
        assert ACCRUAL + 1 <= received <= ACCRUAL + CLIENTS - 1 + _probes(ep), ep
        assert load.served()["c"] == 0

        # Healthy again: the next probe succeeds and c gets its share back.
        http_get(c.host, c.port, "/_fail?code=0")
        wait = (_endpoint(m, c.address)["ejected_for_s"] or 0.0) + 5.0
        wait_for(lambda: _endpoint(m, c.address)["state"] == "healthy", timeout=wait,
                 what="c back after a successful probe")
        before = load.served()
        time.sleep(1.0)
        share = load.served() - before
    finally:
        load.stop()
    assert share["c"] > 0.1 * sum(share.values()), share
    assert "endpoint " + c.address + " ejected" in m.log()


def test_accrual_counts_the_failures_of_all_workers(mesh, backends):
    """Two workers, two clients on each, c failing fast. The control process is paused
    meanwhile: it stands for its own 100 ms tick, within which fast failures already
    reach 7 on each worker (without the pause the outcome is the same, only not every
    time). Ejection is about failures, not timing: meshd as a whole sends c ACCRUAL
    failing requests, plus those already on their way."""
    a, b, c = backends("a"), backends("b"), backends("c")
    m = mesh.run({"web": [a.address, b.address, c.address]}, workers=2)
    conns = [conn for worker in _pinned(m, per_worker=2) for conn in worker]
    http_get(c.host, c.port, "/_counts?reset=1")  # the pinning requests
    http_get(c.host, c.port, "/_fail?code=503")
    control = m.control_pids()[0]
    os.kill(control, signal.SIGSTOP)
    try:
        out = Load(m.ports["outbound"], seconds=1.0, conns=conns).run()
    finally:
        os.kill(control, signal.SIGCONT)
    received = _counts(c)["GET /"]
    assert out.sent > 20 * ACCRUAL  # plenty of chances to pick c on both workers
    assert ACCRUAL <= received <= ACCRUAL + len(conns) - 1, received


# -- 4. the retry budget -------------------------------------------------------------------


def _failing_everywhere(mesh, backends):
    """meshd (2 workers, nothing ejected) before web's three endpoints, with 4
    connections pinned to each worker; then every endpoint answers 503."""
    eps = [backends(n) for n in "abc"]
    m = mesh.run({"web": [x.address for x in eps]}, workers=2,
                 extra="[service.web]\nfailure_accrual = 0\n")
    pinned = _pinned(m, per_worker=CLIENTS // 2)
    for x in eps:
        http_get(x.host, x.port, "/_counts?reset=1")
        http_get(x.host, x.port, "/_fail?code=503")
    return m, eps, pinned


def _check_budget(m, eps, loads: list[Load], pinned: int) -> None:
    """Budget: in any 10 s window, retries <= 20 % of the window's requests + 10/s x
    10 s (the reserve: Finagle's and tower's minRetriesPerSec x ttl), summed over all
    workers. The runs here are shorter than a window, so their reserve is 100 from the
    start. Allowance: 10 retries (10/s x the 1 s sampling period of
    meshd/worker/retries.py: a worker's window starts at its first sample, which can
    miss what the other worker spent just before). A budget per worker would allow
    about 2 x 100 over the ratio part."""
    elapsed = max(x.out.ended for x in loads) - min(x.out.started for x in loads)
    requests = sum(x.out.sent for x in loads)
    answers = sum((x.out.summary for x in loads), Counter())
    received = sum(_counts(x)["GET /"] for x in eps)
    retries = m.metric("retry_total", 'service="web"')
    refused = m.metric("retry_budget_exhausted_total", 'service="web"')
    detail = (f"{requests} requests in {elapsed:.1f}s, {received} received, {retries} "
              f"retries, {refused} refused; answers {dict(answers)}")
    assert elapsed < 10.0  # one window
    # Every answer was an endpoint's own 503 (none of meshd's).
    assert set(answers) <= {(503, "", "a"), (503, "", "b"), (503, "", "c")}, detail
    assert sum(x.out.ok for x in loads) == 0, detail
    assert m.metric("request_total", 'service="web"') == requests + pinned, detail
    # Every attempt reached a backend: what they received beyond the requests is retries.
    assert received - requests == retries, detail
    assert 0 < retries <= 0.2 * requests + 10 * 10 + 10, detail
    assert refused > 0, detail


def test_retry_budget_holds_across_workers_when_every_endpoint_fails(mesh, backends):
    m, eps, pinned = _failing_everywhere(mesh, backends)
    conns = [conn for worker in pinned for conn in worker]
    load = Load(m.ports["outbound"], seconds=5.0, conns=conns)
    load.run()
    _check_budget(m, eps, [load], len(conns))


def test_retry_budget_holds_when_the_load_moves_to_another_worker(mesh, backends):
    """As above, but the clients of worker 1 send for 1 s, then those of worker 2 for
    2.5 s (traffic moving between workers, as when one is replaced): all of it inside one
    window, whose reserve worker 1 spent; worker 2 may only add its 20 %."""
    m, eps, pinned = _failing_everywhere(mesh, backends)
    first = Load(m.ports["outbound"], seconds=1.0, conns=pinned[0])
    first.run()
    second = Load(m.ports["outbound"], seconds=2.5, conns=pinned[1])
    second.run()
    _check_budget(m, eps, [first, second], sum(len(c) for c in pinned))

