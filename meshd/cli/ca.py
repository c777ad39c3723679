"""`meshd ca init|issue|inspect`: a lab CA in a directory, leaf certificates from it, and
what a certificate, chain or key file holds.

This is a lab CA: its key sits on disk in the clear (``D/ca.key``, 0600 in a 0700
directory; ``meshd.identity.ca_dir``). Exit codes (CONTRACT): 0 done; 2 a usage error —
an option's value is wrong (not a SPIFFE ID, another trust domain, a bad duration), or
what an option names cannot be used (no CA in ``--dir``, a key file of the wrong mode, a
file with no certificate or key); 1 the command was refused or failed though its input is
fine (the CA or an output file already exists, the CA expired, a write failed).
"""

from __future__ import annotations

import datetime
import os
import stat
from typing import TYPE_CHECKING

import click

from meshd.config_table import parse_duration
from meshd.identity import spiffe

if TYPE_CHECKING:
    from meshd.identity.ca_dir import CaDir

EXIT_FAILED = 1
EXIT_USAGE = 2
MIN_LEAF_TTL = 60.0
MAX_TTL = 10 * 365 * 24 * 3600.0


def _fail(message: str, code: int) -> None:
    click.echo(f"meshd ca: {message}", err=True)
    raise SystemExit(code)


def _ttl(value: str, option: str, minimum: float) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    if not minimum <= seconds <= MAX_TTL:
        raise click.BadParameter(f"must be between {minimum / 60:g}m and "
                                 f"{MAX_TTL / 3600:g}h, got {value!r}", param_hint=option)
    return seconds


def _load(path: str) -> CaDir:
    # Imported here, as in the other commands: `meshd run` (the master) imports this
    # module and has no use for cryptography.
    from meshd.identity import ca_dir
    try:
        return ca_dir.load(path)
    except ca_dir.CaDirError as e:
        _fail(f"--dir: {e}", EXIT_USAGE)
        raise


@click.group()
def ca() -> None:
    """A lab CA: a trust anchor in a directory and SPIFFE leaf certificates from it.

    The CA key sits on disk in the clear (0600 in a 0700 directory): for labs and
    tests, not for production."""


@ca.command()
@click.option("--dir", "path", required=True, metavar="DIR",
              help="Directory to make the CA in (created 0700; ca.crt, ca.key 0600).")
@click.option("--trust-domain", required=True, metavar="TD",
              help='The trust domain, e.g. "cluster.local" (the CA gets spiffe://TD).')
@click.option("--ttl", default="8760h", show_default=True, metavar="DURATION",
              help="How long the CA certificate is valid (units ms, s, m, h).")
def init(path: str, trust_domain: str, ttl: str) -> None:
    """Make a new CA in DIR. Refuses when DIR already holds one."""
    from meshd.identity import ca_dir
    seconds = _ttl(ttl, "--ttl", 3600.0)
    problem = spiffe.trust_domain_problem(trust_domain)
    if problem:
        raise click.BadParameter(problem, param_hint="--trust-domain")
    if os.path.lexists(path) and not os.path.isdir(path):
        _fail(f"--dir: {path} exists and is not a directory", EXIT_USAGE)
    if any(os.path.lexists(os.path.join(path, n)) for n in (ca_dir.CERT_NAME, ca_dir.KEY_NAME)):
        _fail(f"{path} already holds a CA; init never overwrites one: give another --dir, "
              f"or remove that one first", EXIT_FAILED)
    try:
        made = ca_dir.init(path, trust_domain, ttl=seconds)
    except ca_dir.CaDirError as e:
        _fail(f"--dir: {e}", EXIT_USAGE)
        raise
    except OSError as e:
        _fail(f"cannot write the CA in {path}: {e.strerror or e}", EXIT_FAILED)
        raise
    click.echo(f"{made.cert_path}: CA for spiffe://{made.trust_domain}, valid until "
               f"{made.not_after:%Y-%m-%d %H:%M:%S} UTC")
    click.echo(f"{made.key_path}: its key (0600; a lab CA: the key is on disk in the clear)")


@ca.command()
@click.option("--dir", "path", required=True, metavar="DIR", help="The CA directory.")
@click.option("--identity", required=True, metavar="SPIFFE-ID",
              help="The leaf's SPIFFE ID, in the CA's trust domain "
                   "(spiffe://TD/ns/NS/sa/SA, spiffe://TD/service/NAME).")
@click.option("--out", "prefix", required=True, metavar="PREFIX",
              help="Writes PREFIX.crt (leaf, then the CA) and PREFIX.key (0600).")
@click.option("--ttl", default="24h", show_default=True, metavar="DURATION",
              help="How long the leaf is valid (at least 1m; never past the CA).")
@click.option("--force", is_flag=True, help="Replace PREFIX.crt and PREFIX.key if they exist.")
def issue(path: str, identity: str, prefix: str, ttl: str, force: bool) -> None:
    """Issue a leaf certificate for a SPIFFE ID from the CA in DIR."""
    from cryptography import x509

    from meshd.identity import ca as ca_mod
    from meshd.identity import ca_dir
    seconds = _ttl(ttl, "--ttl", MIN_LEAF_TTL)
    problem = spiffe.problem(identity)
    if problem:
        raise click.BadParameter(problem, param_hint="--identity")
    authority = _load(path)
    if spiffe.trust_domain(identity) != authority.trust_domain:
        raise click.BadParameter(
            f"{identity} is not in the CA's trust domain {authority.trust_domain!r}",
            param_hint="--identity")
    now = datetime.datetime.now(datetime.UTC)
    if not authority.not_before <= now < authority.not_after:
        _fail(f"the CA in {path} is valid from {authority.not_before:%Y-%m-%d %H:%M} to "
              f"{authority.not_after:%Y-%m-%d %H:%M} UTC, not now: make a new one",
              EXIT_FAILED)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(out_dir):
        _fail(f"--out: the directory {out_dir} does not exist", EXIT_USAGE)
    crt_path, key_path = f"{prefix}.crt", f"{prefix}.key"
    existing = [p for p in (crt_path, key_path) if os.path.lexists(p)]
    if existing and not force:
        _fail(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
              f"--force replaces", EXIT_FAILED)
    leaf = ca_mod.issue(authority.signing, identity, ttl=seconds, now=now)
    try:
        ca_dir.write_new(key_path, leaf.key_pem, 0o600, force=force)
        try:
            ca_dir.write_new(crt_path, leaf.cert_pem + authority.signing.cert_pem, 0o644,
                             force=force)
        except BaseException:
            if not force:
                os.unlink(key_path)
            raise
    except FileExistsError as e:
        _fail(f"{e.filename} appeared meanwhile; --force replaces", EXIT_FAILED)
    except OSError as e:
        _fail(f"cannot write {e.filename or prefix}: {e.strerror or e}", EXIT_FAILED)
    not_after = x509.load_pem_x509_certificate(leaf.cert_pem).not_valid_after_utc
    if not_after >= authority.not_after:
        click.echo(f"meshd ca: warning: the leaf ends with the CA at "
                   f"{not_after:%Y-%m-%d %H:%M:%S} UTC, before --ttl {ttl}", err=True)
    click.echo(f"{crt_path}: {identity}, valid until {not_after:%Y-%m-%d %H:%M:%S} UTC "
               f"(leaf, then the CA)")
    click.echo(f"{key_path}: its key (0600)")


@ca.command(name="inspect")
@click.argument("file", metavar="FILE")
def inspect_cmd(file: str) -> None:
    """What FILE holds: each certificate (subject, issuer, SPIFFE ID, validity and time
    left, serial, SHA-256 fingerprint, key type, CA or not) or, for a private key, its
    type and public-key fingerprint only (never the key)."""
    from meshd.identity import inspect
    try:
        with open(file, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(inspect.MAX_BYTES + 1)
    except OSError as e:
        _fail(f"cannot read {file}: {e.strerror or e}", EXIT_USAGE)
        raise
    try:
        lines = inspect.describe(data)
    except inspect.InspectError as e:
        _fail(f"{file}: {e}", EXIT_USAGE)
        raise
    click.echo(f"{file}: {lines[0]}")
    for line in lines[1:]:
        click.echo(line)
    if any(line.startswith("private key") for line in lines) and st.st_mode & 0o077:
        click.echo(f"meshd ca: warning: {file} holds a private key and is mode "
                   f"{stat.S_IMODE(st.st_mode):04o}; keep keys 0600", err=True)
