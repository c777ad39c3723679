"""The admin dashboard (``/`` and its files, ``/status``) through a real meshd, and the
page itself in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven
by selenium) against a meshd under traffic. The screenshot is a test artifact:
``test-artifacts/dashboard.png`` (gitignored), its path printed."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MeshFactory

from meshd.control.dashboard import CSP
from meshd.control.recent_errors import RecentErrors
from meshd.shm import F_CLASS, F_FAILURES, F_STATUS, FIELDS, STATUS_CLASSES, STATUS_CODES
from meshd.testing.harness import (
    Backend,
    KeepAliveLoad,
    Meshd,
    free_port,
    http_get,
    require_tool,
)

DEAD = "127.0.0.1:1"   # nobody listens: connections are refused
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Meshd, Backend, Backend]]:
    """One meshd for the module: service web (a healthy backend), service flaky (a
    backend that answers what it is asked, 503 included) and service half (that backend
    and an address that refuses: failure accrual ejects it)."""
    factory = MeshFactory(tmp_path_factory.mktemp("dash"))
    a, b = Backend("a").start(), Backend("b").start()
    try:
        yield factory.run({"web": [a.address], "flaky": [b.address],
                           "half": [b.address, DEAD]}, workers=2,
                          extra='[service.flaky]\nretries = 0\nfailure_accrual = 0\n'), a, b
    finally:
        for m in factory.started:
            m.stop()
        a.stop()
        b.stop()
        shutil.rmtree(factory.run_dir, ignore_errors=True)


def _get(m: Meshd, path: str, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    host, port = m.admin.rsplit(":", 1)
    return http_get(host, int(port), path, headers)


def test_page_and_files_with_strict_headers(live):
    m, _, _ = live
    for path, ctype in (("/", "text/html; charset=utf-8"),
                        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
                        ("/dashboard/app.css", "text/css; charset=utf-8"),
                        ("/dashboard/favicon.svg", "image/svg+xml")):
        status, headers, body = _get(m, path)
        assert status == 200, (path, body)
        assert headers["content-type"] == ctype
        assert headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-cache"
        assert int(headers["content-length"]) == len(body) > 0
        # nothing from elsewhere: no CDN, no web fonts
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", body.replace(
            b"http://www.w3.org/2000/svg", b"")), path
        # revalidation: the same ETag answers 304 without a body
        status, again, body = _get(m, path, {"If-None-Match": headers["etag"]})
        assert status == 304 and body == b"" and again["etag"] == headers["etag"]
    page = _get(m, "/")[2].decode()
    assert "<style" not in page and " style=" not in page and not re.search(r" on\w+=", page)
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts == ['<script src="/dashboard/app.js" defer>'], scripts
    host, port = m.admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/")
    assert conn.getresponse().status == 405
    conn.close()


def test_status_says_workers_rows_sources_services(live):
    m, a, b = live
    status, headers, body = _get(m, "/status")
    assert status == 200 and headers["content-type"] == "application/json"
    s = json.loads(body)
    assert s["workers"]["serving"] == s["workers"]["desired"] == 2
    assert s["reloads"]["failed_since_start"] == 0
    assert 0 < s["rows"]["metric"]["in_use"] <= s["rows"]["metric"]["capacity"]
    assert s["rows"]["exhausted_total"] == 0
    src = s["discovery"]["local"]
    assert src["plugin"] == "static" and src["services"] == src["synced"] == 3
    assert src["pending"] == [] and src["failing"] == []
    web = s["services"]["web"]
    assert web["balancer"] == "p2c" and web["endpoints"] == web["healthy"] == 1
    assert web["sources"] == {"local": "synced"}
    assert s["services"]["flaky"]["failure_accrual"] == 0
    assert s["identity"] is None
    (ep,) = json.loads(_get(m, "/endpoints")[2])["services"]["web"]["endpoints"]
    assert ep["address"] == a.address and isinstance(ep["connections"], int)


def test_the_probe_listener_serves_no_dashboard(mesh, backends):
    """``[admin] probe_listen`` may face the pod network: it serves /live and /ready only."""
    a = backends("a")
    probe = free_port()
    text, ports = mesh.config({"web": [a.address]}, workers=1)
    text = text.replace("[admin]\n", f'[admin]\nprobe_listen = "127.0.0.1:{probe}"\n', 1)
    m = mesh.start(text, ports)
    for path in ("/", "/dashboard/app.js", "/status"):
        assert http_get("127.0.0.1", probe, path)[0] == 404, path
        assert _get(m, path)[0] == 200, path
    assert http_get("127.0.0.1", probe, "/ready")[0] == 200


def test_recent_errors_show_failed_responses_by_status(live):
    m, _, _ = live
    host, port = "127.0.0.1", m.ports["outbound"]
    for _ in range(3):
        status, _, _ = http_get(host, port, "/status?code=503", {"Host": "flaky"})
        assert status == 503
    m.wait_metric("response_total", 'service="flaky",status_code="503"', 3)

    def seen() -> dict | None:
        errors = json.loads(_get(m, "/status")[2])["recent_errors"]
        return next((e for e in errors if e["kind"] == "response" and e["service"] == "flaky"
                     and e["detail"] == "503" and e["count"] >= 3), None)
    deadline = time.monotonic() + 10
    entry = seen()
    while entry is None and time.monotonic() < deadline:   # the control samples each second
        time.sleep(0.2)
        entry = seen()
    assert entry is not None, _get(m, "/status")[2]
    assert entry["count"] == 3, entry   # merged into one entry, not one per sample


def test_recent_errors_show_an_ejection(live):
    m, _, _ = live
    port = m.ports["outbound"]

    def ejected() -> dict | None:
        errors = json.loads(_get(m, "/status")[2])["recent_errors"]
        return next((e for e in errors if e["kind"] == "ejection" and e["service"] == "half"),
                    None)
    deadline = time.monotonic() + 20
    entry = None
    for _ in range(2000):   # p2c sends some to the refusing address: 7 in a row eject it
        if time.monotonic() > deadline or (entry := ejected()) is not None:
            break
        for _ in range(20):
            assert http_get("127.0.0.1", port, "/", {"Host": "half"})[0] == 200  # retried
        time.sleep(0.1)
    assert entry is not None, _get(m, "/status")[2]
    assert entry["detail"].startswith(f"{DEAD} ejected") and entry["count"] >= 1
    half = json.loads(_get(m, "/status")[2])["services"]["half"]
    assert half["endpoints"] == 2 and half["ejected"] + half["probing"] == 1


def test_recent_errors_ring_merges_and_is_bounded():
    r = RecentErrors(reload_failures=5, size=4)
    i503 = F_STATUS + STATUS_CODES.index(503)
    row = [0] * FIELDS
    r.responses({2: tuple(row)}, {2: "web"}, at=1.0)   # first sight: a baseline only
    assert r.entries() == []
    row[i503] += 2
    row[F_FAILURES] += 5   # two 503s and three failures without a 5xx (gRPC status)
    r.responses({2: tuple(row)}, {2: "web"}, at=2.0)
    row[i503] += 1
    row[F_FAILURES] += 1
    r.responses({2: tuple(row)}, {2: "web"}, at=3.0)
    got = {(e["detail"], e["count"], e["first"][-7:], e["last"][-7:]) for e in r.entries()}
    assert got == {("503", 3, "02.000Z", "03.000Z"),   # merged: one entry, first and last
                   ("failure (no 5xx: gRPC status, reset)", 3, "02.000Z", "02.000Z")}
    row[F_CLASS + STATUS_CLASSES.index("5xx")] += 4   # a 5xx without a field of its own
    row[F_FAILURES] += 4
    r.responses({2: tuple(row)}, {2: "web"}, at=4.0)
    assert r.entries()[0]["detail"] == "5xx (other)" and r.entries()[0]["count"] == 4
    r.reloads(7, at=5.0)
    assert r.reload_base == 5 and r.entries()[0]["kind"] == "reload"
    assert r.entries()[0]["count"] == 2
    for n in range(10):
        r.sources([("web", "consul", n + 1, "connection refused")], at=6.0 + n)
    entries = r.entries()
    assert len(entries) == 4   # bounded: the entry that happened least recently went
    assert [e["kind"] for e in entries] == ["discovery", "reload", "response", "response"]
    assert entries[0]["count"] == 10   # one entry for the repeating failure
    assert {e["detail"] for e in entries[2:]} == {"503", "5xx (other)"}


def test_dashboard_in_headless_chromium(live):
    chromium = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    m, a, _ = live
    load = KeepAliveLoad("127.0.0.1", m.ports["outbound"], 2, headers={"Host": "web"},
                         max_seconds=30).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--hide-scrollbars", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(20)
        driver.get(f"http://{m.admin}/")

        def service_rate(d: webdriver.Chrome) -> float:
            cells = d.find_elements(By.CSS_SELECTOR,
                                    'tr.svc-row[data-service="web"] td[data-field="rps"]')
            return float(cells[0].get_attribute("data-value") or 0) if cells else 0.0
        try:
            WebDriverWait(driver, 20, poll_frequency=0.2).until(lambda d: service_rate(d) > 0)
        except TimeoutException:
            raise AssertionError("no service row with a rate: " + driver.find_element(
                By.TAG_NAME, "body").text) from None
        row = driver.find_element(By.CSS_SELECTOR, f'tr.ep-row[data-endpoint="{a.address}"]')
        assert "healthy" in row.text
        lb = driver.find_element(By.CSS_SELECTOR, 'tr.lb-row[data-service="web"]')
        assert "p2c" in lb.text and "local synced" in lb.text
        assert driver.find_element(By.ID, "ready").text == "ready"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert driver.save_screenshot(str(shot))
        print(f"\ndashboard screenshot: {shot}")
        # The strict CSP let the page work: nothing it loads or runs was refused.
        problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert problems == [], problems
    finally:
        driver.quit()
        load.stop()
    assert load.ok > 0 and not load.failures, load.failures[:3]
