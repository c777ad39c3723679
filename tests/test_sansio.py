"""The sans-IO cores import no I/O machinery, and the master never imports gevent.

Each module is imported alone in a fresh interpreter, with an import hook that records who
first imported each I/O module. ``socket`` is allowed to one importer only: meshd.config,
which reads address-family constants from it (``socket`` itself pulls in ``selectors``
and ``select``, so those two are allowed exactly along that path).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import meshd

SANS_IO = [
    "meshd.proto.http1",
    "meshd.proto.detect",
    "meshd.config",
    "meshd.shm",
    "meshd.decisions",
    "meshd.snapshot",
    "meshd.metrics",
    "meshd.discovery.api",
    "meshd.errors",
    "meshd.balance.ewma",
    "meshd.balance.p2c",
    "meshd.balance.ejection",
    "meshd.balance.budget",
    "meshd.balance.retry",
    "meshd.balance.window",
    "meshd.control.state",
    "meshd.tap",
]
IO_MODULES = ("gevent", "ssl", "asyncio", "socket", "selectors", "select")
# Who may import what: the importer of each I/O module that is allowed at all.
ALLOWED = {"socket": "meshd.config", "selectors": "socket", "select": "selectors"}

RECORD_IMPORTERS = """
import json, sys

WATCHED = set(sys.argv[2].split(","))
importers = {}

class Recorder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in WATCHED and name not in importers:
            frame = sys._getframe(1)
            while frame.f_code.co_filename.startswith("<frozen importlib"):
                frame = frame.f_back
            importers[name] = frame.f_globals.get("__name__")
        return None  # let the real finders import it

sys.meta_path.insert(0, Recorder)
__import__(sys.argv[1])
print(json.dumps(importers))
"""


def first_importers(module: str, watched: tuple[str, ...] = IO_MODULES) -> dict[str, str]:
    """{I/O module: the module that first imported it} after importing ``module`` alone."""
    out = subprocess.run(
        [sys.executable, "-c", RECORD_IMPORTERS, module, ",".join(watched)],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_recorder_sees_an_io_import() -> None:
    assert first_importers("meshd.master.sockets")["socket"] == "meshd.master.sockets"


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_module_imports_no_io(module: str) -> None:
    importers = first_importers(module)
    for name in ("gevent", "ssl", "asyncio"):
        assert name not in importers, f"{module} imports {name} (through {importers[name]})"
    for name, importer in importers.items():
        assert ALLOWED.get(name) == importer, f"{module}: {name} imported by {importer}"


@pytest.mark.parametrize("module", ["meshd.proto.http1", "meshd.shm", "meshd.snapshot",
                                    "meshd.discovery.api", "meshd.errors"])
def test_cores_that_need_no_config_import_no_socket(module: str) -> None:
    assert first_importers(module) == {}


@pytest.mark.parametrize("module", SANS_IO)
def test_no_io_import_in_the_source(module: str) -> None:
    """The hook only sees a module's first import; the source shows every one."""
    source = Path(meshd.__file__).parent.joinpath(
        *module.split(".")[1:]).with_suffix(".py").read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    allowed = {"socket"} if module == "meshd.config" else set()
    assert imported & set(IO_MODULES) <= allowed


def test_master_never_imports_gevent() -> None:
    importers = first_importers("meshd.master.arbiter", ("gevent",))
    assert importers == {}, f"gevent imported by {importers.get('gevent')}"
