"""`meshd plugins`: the discovery plugins and identity providers installed, found
without importing them."""

from __future__ import annotations

import click

from meshd.discovery.registry import REGISTRY as DISCOVERY
from meshd.errors import PluginError
from meshd.identity.registry import REGISTRY as IDENTITY


@click.command()
@click.option("--load/--no-load", "try_load", default=True, show_default=True,
              help="Import each plugin to report load errors.")
def plugins(try_load: bool) -> None:
    """List installed plugins: kind (discovery: [[discovery]] plugin; identity: [identity]
    provider), name, distribution, version, load error.

    STATUS is "ok" only for a plugin imported here; with --no-load it is "not loaded".
    Exits 1 when a plugin fails to load or a name is refused."""
    rows = [("KIND", "NAME", "DISTRIBUTION", "VERSION", "STATUS")]
    failed = False
    for kind, registry in (("discovery", DISCOVERY), ("identity", IDENTITY)):
        found, refused = registry.available()
        failed = failed or bool(refused)
        for name, info in sorted(found.items()):
            status = "not loaded"
            if try_load:
                try:
                    registry.load(name)
                    status = "ok"
                except PluginError as e:
                    status = f"error: {e}"
                    failed = True
            rows.append((kind, name, info.distribution, info.version, status))
        for name, why in sorted(refused.items()):
            rows.append((kind, name, "-", "-", f"refused: {why}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    if failed:
        raise SystemExit(1)
