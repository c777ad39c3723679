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


# gevent's socket internals, which sockio alone relies on (see its docstring), and the
# standard library's public os._exit.
FOREIGN_PRIVATE = {("meshd.worker.sockio", n) for n in ("_sock", "_wait", "_read_event",
                                                          "_write_event")} | {
    ("meshd.worker.process", "_exit")}


def _private_names_defined(tree: ast.Module) -> set[str]:
    """The private names a module's own code defines: methods and class attributes of
    its classes (Protocols aside: declaring a name there does not make it the module's)
    and attributes its code assigns on ``self``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            if any(isinstance(b, ast.Name) and b.id == "Protocol" or
                   isinstance(b, ast.Subscript) and getattr(b.value, "id", "") == "Protocol"
                   for b in node.bases):
                continue
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    found.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    found.update(t.id for t in item.targets if isinstance(t, ast.Name))
                    if any(isinstance(t, ast.Name) and t.id == "__slots__"
                           for t in item.targets) and isinstance(item.value, ast.Tuple):
                        found.update(e.value for e in item.value.elts
                                     if isinstance(e, ast.Constant))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) \
                        and t.value.id == "self":
                    found.add(t.attr)
    return found


def test_no_module_reaches_for_another_modules_private_names() -> None:
    """``obj._name`` on anything but ``self``/``cls``/``super()`` only for a name the
    module's own classes define: what crosses a module boundary is public (issue 12:
    RequestBody read through HttpConnection._recv_body and wrote its _body_error,
    h2_stream called the server's _ack)."""
    offenders = []
    for name in _modules():
        path = WORKER.parent.parent / Path(*name.split("."))
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(file.read_text())
        own = _private_names_defined(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") \
                    or node.attr.startswith("__"):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "super":
                continue
            if node.attr in own or (name, node.attr) in FOREIGN_PRIVATE:
                continue
            offenders.append(f"{name}:{node.lineno} .{node.attr}")
    assert offenders == []
