"""`meshd iptables`: the nat rules that send a pod's TCP traffic through its meshd.

What linkerd2-proxy-init installs, under meshd's own chain names: two chains in the nat
table, each hooked into its built-in chain once.

- ``MESHD_INBOUND`` (from PREROUTING): connections arriving at the pod go to the
  inbound listener's port, except the ``--skip-inbound-ports`` (the probe port, ports
  the application serves unproxied).
- ``MESHD_OUTPUT`` (from OUTPUT): connections the pod opens go to the outbound
  listener's port, except those of the proxy's own uid (meshd's upstream connections:
  redirecting them would loop), those leaving through the loopback interface (the pod
  talking to itself, meshd's inbound forward included) and the
  ``--skip-outbound-ports``.

meshd then finds each connection's original destination with SO_ORIGINAL_DST.
``rules`` builds the iptables-restore input (pure); the command prints it
(``--dry-run``) or applies it with ``iptables-restore --noflush``, once: rules already
installed (an init container run again after a pod restart) are left as they are.
"""

from __future__ import annotations

import subprocess
import sys

import click

INBOUND_CHAIN = "MESHD_INBOUND"
OUTPUT_CHAIN = "MESHD_OUTPUT"
MULTIPORT_MAX = 15  # ports one -m multiport match takes (a range counts twice)
RESTORE_TIMEOUT = 30.0  # seconds; the xtables lock is waited for 5 of them


def parse_ports(value: str) -> list[tuple[int, int]]:
    """``"4190,4191,8000-8100"`` as (low, high) ranges. Raises ValueError."""
    out: list[tuple[int, int]] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"expected a port or a range like 8000-8100, got {part!r}")
        lo, hi = int(low), int(high) if sep else int(low)
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"ports are 1..65535, low to high, got {part!r}")
        out.append((lo, hi))
    return out


def _multiport(ranges: list[tuple[int, int]]) -> list[str]:
    """``--dports`` arguments of at most 15 ports each (a range counts twice)."""
    groups: list[str] = []
    current: list[str] = []
    used = 0
    for lo, hi in ranges:
        cost = 1 if lo == hi else 2
        if used + cost > MULTIPORT_MAX:
            groups.append(",".join(current))
            current, used = [], 0
        current.append(str(lo) if lo == hi else f"{lo}:{hi}")
        used += cost
    if current:
        groups.append(",".join(current))
    return groups


def rules(proxy_uid: int, inbound_port: int, outbound_port: int,
          skip_inbound: list[tuple[int, int]] | None = None,
          skip_outbound: list[tuple[int, int]] | None = None,
          inbound: bool = True, outbound: bool = True) -> str:
    """The iptables-restore input (nat table, --noflush) for these settings."""
    lines = [f"# meshd iptables: inbound to :{inbound_port}, outbound to :{outbound_port}, "
             f"uid {proxy_uid} not redirected",
             "*nat"]
    if inbound:
        lines.append(f":{INBOUND_CHAIN} - [0:0]")
    if outbound:
        lines.append(f":{OUTPUT_CHAIN} - [0:0]")
    if inbound:
        for ports in _multiport(skip_inbound or []):
            lines.append(f"-A {INBOUND_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN "
                         f'-m comment --comment "meshd/skip-inbound-ports"')
        lines.append(f"-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {inbound_port} "
                     f'-m comment --comment "meshd/redirect-inbound"')
        lines.append(f"-A PREROUTING -j {INBOUND_CHAIN} "
                     f'-m comment --comment "meshd/install-inbound"')
    if outbound:
        lines.append(f"-A {OUTPUT_CHAIN} -m owner --uid-owner {proxy_uid} -j RETURN "
                     f'-m comment --comment "meshd/ignore-proxy-uid"')
        lines.append(f"-A {OUTPUT_CHAIN} -o lo -j RETURN "
                     f'-m comment --comment "meshd/ignore-loopback"')
        for ports in _multiport(skip_outbound or []):
            lines.append(f"-A {OUTPUT_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN "
                         f'-m comment --comment "meshd/skip-outbound-ports"')
        lines.append(f"-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {outbound_port} "
                     f'-m comment --comment "meshd/redirect-outbound"')
        lines.append(f"-A OUTPUT -j {OUTPUT_CHAIN} "
                     f'-m comment --comment "meshd/install-outbound"')
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def installed(saved: str) -> bool:
    """Whether ``iptables-save -t nat`` output already hooks a meshd chain in."""
    return any(line.startswith(("-A PREROUTING", "-A OUTPUT"))
               and (f"-j {INBOUND_CHAIN}" in line or f"-j {OUTPUT_CHAIN}" in line)
               for line in saved.splitlines())


def _port_list(ctx: click.Context, param: click.Parameter, value: str) -> list[tuple[int, int]]:
    try:
        return parse_ports(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option("--dry-run", is_flag=True, help="Print the iptables-restore input, change nothing.")
@click.option("--proxy-uid", type=click.IntRange(0, 2**32 - 2), default=2102, show_default=True,
              help="meshd's uid: its own connections are never redirected.")
@click.option("--inbound-port", type=click.IntRange(1, 65535), default=4143, show_default=True,
              help="The inbound listener's port.")
@click.option("--outbound-port", type=click.IntRange(1, 65535), default=4140, show_default=True,
              help="The outbound listener's port.")
@click.option("--skip-inbound-ports", default="", callback=_port_list, metavar="PORTS",
              help="Inbound ports not redirected: 4192,9000-9100.")
@click.option("--skip-outbound-ports", default="", callback=_port_list, metavar="PORTS",
              help="Outbound destination ports not redirected.")
@click.option("--inbound/--no-inbound", default=True, show_default=True,
              help="Redirect inbound connections.")
@click.option("--outbound/--no-outbound", default=True, show_default=True,
              help="Redirect outbound connections.")
@click.option("--iptables-restore", "restore", default="iptables-restore", show_default=True,
              help="The restore command (iptables-legacy-restore where the node uses legacy).")
def iptables(dry_run: bool, proxy_uid: int, inbound_port: int, outbound_port: int,
             skip_inbound_ports: list[tuple[int, int]],
             skip_outbound_ports: list[tuple[int, int]], inbound: bool, outbound: bool,
             restore: str) -> None:
    """Install the nat rules that redirect the pod's TCP traffic to meshd (needs
    NET_ADMIN and NET_RAW): inbound to --inbound-port, outbound to --outbound-port,
    except meshd's own (--proxy-uid) and loopback."""
    text = rules(proxy_uid, inbound_port, outbound_port, skip_inbound_ports,
                 skip_outbound_ports, inbound, outbound)
    if dry_run:
        click.echo(text, nl=False)
        return
    save = restore.replace("-restore", "-save")
    try:
        current = subprocess.run([save, "-t", "nat"], capture_output=True, text=True,
                                 timeout=RESTORE_TIMEOUT, check=True).stdout
        if installed(current):
            click.echo("meshd iptables: the rules are installed already; leaving them",
                       err=True)
            return
        subprocess.run([restore, "--noflush", "-w", "5"], input=text, capture_output=True,
                       text=True, timeout=RESTORE_TIMEOUT, check=True)
    except FileNotFoundError as e:
        click.echo(f"meshd iptables: {e.filename} not found", err=True)
        sys.exit(1)
    except subprocess.CalledProcessError as e:
        click.echo(f"meshd iptables: {' '.join(e.cmd)} failed (exit {e.returncode}): "
                   f"{(e.stderr or '').strip()}", err=True)
        sys.exit(1)
    except subprocess.TimeoutExpired as e:
        click.echo(f"meshd iptables: {e.cmd[0]} did not finish in {e.timeout:.0f}s", err=True)
        sys.exit(1)
    click.echo(text, nl=False)
