"""`meshd plugins`: the discovery plugins installed, found without importing them."""

from __future__ import annotations

import click

from meshd.discovery.registry import available, load
from meshd.errors import PluginError


@click.command()
@click.option("--load/--no-load", "try_load", default=True, show_default=True,
              help="Import each plugin to report load errors.")
def plugins(try_load: bool) -> None:
    """List installed discovery plugins: name, distribution, version, load error.

    STATUS is "ok" only for a plugin imported here; with --no-load it is "not loaded".
    Exits 1 when a plugin fails to load or a name is refused."""
    found, refused = available()
    rows = [("NAME", "DISTRIBUTION", "VERSION", "STATUS")]
    failed = bool(refused)
    for name, info in sorted(found.items()):
        status = "not loaded"
        if try_load:
            try:
                load(name)
                status = "ok"
            except PluginError as e:
                status = f"error: {e}"
                failed = True
        rows.append((name, info.distribution, info.version, status))
    for name, why in sorted(refused.items()):
        rows.append((name, "-", "-", f"refused: {why}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    if failed:
        raise SystemExit(1)
