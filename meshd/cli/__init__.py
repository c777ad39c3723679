"""The `meshd` command: one module per subcommand, registered on one click group."""

from __future__ import annotations

import click

from meshd import __version__
from meshd.cli.ca import ca
from meshd.cli.check import check
from meshd.cli.endpoints import endpoints
from meshd.cli.inject import inject
from meshd.cli.iptables import iptables
from meshd.cli.plugins import plugins
from meshd.cli.run import run
from meshd.cli.stat import stat
from meshd.cli.tap import tap
from meshd.cli.top import top


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """meshd: a service-mesh data plane for VMs and Kubernetes pods."""


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(f"meshd {__version__}")


cli.add_command(run)
cli.add_command(check)
cli.add_command(stat)
cli.add_command(endpoints)
cli.add_command(plugins)
cli.add_command(iptables)
cli.add_command(inject)
cli.add_command(ca)
cli.add_command(tap)
cli.add_command(top)


def main() -> None:
    cli(prog_name="meshd")
