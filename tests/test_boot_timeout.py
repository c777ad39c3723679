"""A process that has not yet reached serving gets boot_timeout, not worker_timeout
(issue 20): on an overloaded machine imports alone can take longer than worker_timeout,
and the master used to kill such processes before they ever served."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

from conftest import MeshFactory

from meshd.testing.harness import Backend, http_get

WEB = {"Host": "web"}

# A stand-in for gevent, first on PYTHONPATH: only the children import gevent (the master
# imports none), so each child's boot is held up this long without a heartbeat, and then
# the real gevent takes its place.
SLOW_GEVENT = textwrap.dedent("""\
    import importlib, os, sys, time
    time.sleep(float(os.environ["MESHD_TEST_SLOW_BOOT"]))
    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    del sys.modules["gevent"]
    sys.modules["gevent"] = importlib.import_module("gevent")
    """)


def test_a_slow_boot_is_not_killed_by_worker_timeout(
        mesh: MeshFactory, backends: Callable[..., Backend], tmp_path: Path) -> None:
    a = backends("a")
    shim = tmp_path / "slow"
    (shim / "gevent").mkdir(parents=True)
    (shim / "gevent" / "__init__.py").write_text(SLOW_GEVENT)
    env = dict(os.environ, PYTHONPATH=str(shim), MESHD_TEST_SLOW_BOOT="3")
    text, ports = mesh.config({"web": [a.address]}, workers=1)
    text = text.replace('worker_timeout = "5s"', 'worker_timeout = "1s"\nboot_timeout = "30s"')
    m = mesh.start(text, ports, env=env, wait_ready=False)
    m.wait_ready(timeout=60)
    assert http_get("127.0.0.1", ports["outbound"], "/", WEB)[0] == 200
    log = m.log()
    assert "sending ABRT" not in log, log
