"""The worker package's shape (issue 12): no module of the data path imports the worker
class or the process entry (which monkey-patches on import), so each can be imported,
and driven, in-process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import meshd.worker

WORKER = Path(meshd.worker.__file__).parent
# The process entry and the worker class: the only modules allowed to know of each other.
ENTRY = {"meshd.worker.entry", "meshd.worker.process"}


def _modules() -> list[str]:
    names = []
    for path in sorted(WORKER.rglob("*.py")):
        rel = path.relative_to(WORKER.parent.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _imports(name: str) -> set[str]:
    path = WORKER.parent.parent / Path(*name.split("."))
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_data_path_module_imports_the_worker_class_or_entry() -> None:
    data_path = [m for m in _modules() if m not in ENTRY]
    offenders = {m: sorted(_imports(m) & ENTRY) for m in data_path if _imports(m) & ENTRY}
    assert offenders == {}
    assert "meshd.worker.call" in data_path and "meshd.worker.client.http1" in data_path


def test_data_path_modules_import_without_gevent_patching() -> None:
    """Each module imported in a fresh interpreter leaves the standard library unpatched
    (importing ``meshd.worker.entry`` patches it: the check is real)."""
    data_path = [m for m in _modules() if m not in ENTRY]
    script = (
        "import importlib, sys\n"
        "from gevent import monkey\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
        "    assert not monkey.is_module_patched('socket'), name\n"
        "print('ok', len(sys.argv) - 1)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *data_path], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {len(data_path)}"
    entry = subprocess.run([sys.executable, "-c", script, "meshd.worker.entry"],
                           capture_output=True, text=True, timeout=120)
    assert entry.returncode != 0 and "meshd.worker.entry" in entry.stderr


def test_the_package_tells_the_data_path() -> None:
    doc = meshd.worker.__doc__ or ""
    for name in ("serve_connection", "Call", "UpstreamExchange", "client", "upstream",
                 "context.Context"):
        assert name in doc, name
