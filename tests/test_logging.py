"""What `meshd run` writes to stderr: text with timestamps, no timestamp of its own and
syslog priorities when stderr is the journal, one JSON object per line with
--log-format json; the level from `log_level`, applied again on HUP."""

from __future__ import annotations

import json
import os
import re
import signal

from meshd.testing.harness import http_get, wait_for

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def _only_generation(m, generation: int) -> bool:
    """Every process meshd lists belongs to ``generation`` (the older ones have gone)."""
    slots = m.slots()
    return bool(slots) and all(s.generation == generation for s in slots)


def test_json_lines_from_master_and_children(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, args=["--log-format", "json"])
    assert http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})[0] == 200
    wait_for(lambda: "generation 1 serving" in m.log(), what="the master's line")
    m.signal(signal.SIGTERM)
    assert m.wait(30) == 0
    lines = m.log().splitlines()
    records = [json.loads(line) for line in lines]   # every line is one object
    assert all(set(r) >= {"ts", "level", "logger", "msg", "pid"} for r in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]) for r in records)
    assert {"meshd.master", "meshd.worker", "meshd.control"} <= {r["logger"] for r in records}
    assert len({r["pid"] for r in records}) >= 3     # master, control process, workers
    assert any(r["msg"].startswith("generation 1 serving") and r["level"] == "info"
               and r["pid"] == m.pid for r in records)


def test_no_timestamp_when_stderr_is_the_journal(mesh, backends, tmp_path):
    a = backends("a")
    text, ports = mesh.config({"web": [a.address]})
    log_path = tmp_path / f"meshd-{mesh.count}.log"
    log_path.touch()
    st = os.stat(log_path)
    # What systemd sets: JOURNAL_STREAM names stderr's device and inode.
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    m = mesh.start(text, ports, env=env)
    wait_for(lambda: "generation 1 serving" in m.log(), what="the master's line")
    m.signal(signal.SIGTERM)
    assert m.wait(30) == 0
    lines = m.log().splitlines()
    assert lines and not any(TIMESTAMP.search(line) for line in lines), lines[:5]
    assert all(re.match(r"<[2-7]>[A-Z]+ \[\d+\] meshd", line) for line in lines), lines[:5]
    assert f"<6>INFO [{m.pid}] meshd.master: generation 1 serving" in m.log()


def test_journal_stream_of_another_file_keeps_timestamps(mesh, backends):
    a = backends("a")
    # Started by systemd, but stderr was redirected since: not the journal.
    m = mesh.run({"web": [a.address]}, env=dict(os.environ, JOURNAL_STREAM="1:1"))
    wait_for(lambda: "generation 1 serving" in m.log(), what="the master's line")
    line = next(line for line in m.log().splitlines() if "generation 1 serving" in line)
    assert TIMESTAMP.match(line) and f"INFO meshd[{m.pid}] meshd.master" in line


def test_log_level_from_config_applied_on_reload(mesh, backends):
    a = backends("a")
    text, ports = mesh.config({"web": [a.address]}, top='log_level = "warning"')
    m = mesh.start(text, ports)
    m.config_path.write_text(text.replace('log_level = "warning"', 'log_level = "debug"'))
    m.signal(signal.SIGHUP)
    wait_for(lambda: _only_generation(m, 2), timeout=30, what="the reload")
    # Applied once accepted: the new generation's INFO lines are written.
    wait_for(lambda: "generation 2 serving" in m.log(), what="an INFO line after the reload")
    m.config_path.write_text(text.replace('log_level = "warning"', 'log_level = "error"'))
    m.signal(signal.SIGHUP)
    wait_for(lambda: _only_generation(m, 3), timeout=30, what="the second reload")
    assert "generation 3 serving" not in m.log()


def test_log_level_option_overrides_the_config_across_reloads(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, top='log_level = "error"', args=["--log-level", "info"])
    wait_for(lambda: "generation 1 serving" in m.log(), what="an INFO line")
    m.signal(signal.SIGHUP)
    wait_for(lambda: _only_generation(m, 2), timeout=30, what="the reload")
    wait_for(lambda: "generation 2 serving" in m.log(), what="an INFO line after the reload")
