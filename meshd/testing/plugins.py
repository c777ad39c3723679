"""Installing a throwaway plugin distribution (discovery, or identity with ``group``) for a test.

``make_distribution(root, "my-plugin", {"mine": "my_module:Backend"}, source)`` writes
``my_module.py`` and a ``my_plugin-0.0.1.dist-info`` (METADATA, entry_points.txt) under
``root``; with ``root`` on PYTHONPATH (or sys.path) the plugin is found through the
``meshd.discovery`` entry-point group exactly as an installed one is.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_distribution(root: Path, dist: str, entry_points: dict[str, str], module: str,
                      source: str, version: str = "0.0.1",
                      group: str = "meshd.discovery") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    (info / "top_level.txt").write_text(f"{module}\n")
    return root
