"""Certificates and identity files for tests: a CA, leaves (good, expired,
of another pair), and the two layouts a ``files`` provider reads: plain files replaced by
rename, and a Kubernetes Secret volume (files are symbolic links through ``..data``,
swapped atomically as the kubelet does)."""

from __future__ import annotations

import datetime
import itertools
import os
import select
import shutil
import ssl
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import gevent.ssl

from meshd.identity import ca

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"
NAMES = ("tls.crt", "tls.key", "ca.crt")
_swaps = itertools.count(1)


def leaf(authority: ca.Issued, spiffe_id: str = WEB, **kwargs: object) -> ca.Issued:
    return ca.issue(authority, spiffe_id, **kwargs)  # type: ignore[arg-type]


def expired(authority: ca.Issued, spiffe_id: str = WEB) -> ca.Issued:
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    return ca.issue(authority, spiffe_id, ttl=3600, not_before=start)


def files(cert: bytes, key: bytes, roots: bytes) -> dict[str, bytes]:
    return dict(zip(NAMES, (cert, key, roots), strict=True))


def replace_files(folder: Path, contents: dict[str, bytes]) -> None:
    """Each file written beside and renamed over (as most writers do), one after the other."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, folder / name)


def secret_volume(folder: Path, contents: dict[str, bytes]) -> None:
    """What the kubelet does to a Secret volume: the files in a new timestamped
    directory, ``..data_tmp`` pointing to it renamed over ``..data``, the user-visible
    names links through ``..data``, the old directory removed."""
    folder.mkdir(parents=True, exist_ok=True)
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    stamp = folder / f"..2026_12_07_15_00_00.{next(_swaps):09d}"
    stamp.mkdir()
    for name, data in contents.items():
        (stamp / name).write_bytes(data)
    os.symlink(stamp.name, folder / "..data_tmp")
    os.rename(folder / "..data_tmp", folder / "..data")
    for name in contents:
        if not (folder / name).is_symlink():
            os.symlink(f"..data/{name}", folder / name)
    if old is not None:
        shutil.rmtree(folder / old)


def identity_toml(folder: Path, poll: str = "100ms", trust_domain: str = TD) -> str:
    return (f'[identity]\nprovider = "files"\ntrust_domain = "{trust_domain}"\n'
            f'cert_file = "{folder}/tls.crt"\nkey_file = "{folder}/tls.key"\n'
            f'ca_file = "{folder}/ca.crt"\npoll = "{poll}"\n')


def key_lines(key_pem: bytes) -> list[str]:
    """The base64 lines of a PEM key: none of them may appear in a log."""
    return [line for line in key_pem.decode().splitlines() if line and not line.startswith("-----")]


def handshake(server_ctx: Any, client_ctx: Any) -> tuple[Any, Any]:
    """A real handshake over a socket pair, both ends in greenlets: (server, client)
    TLS sockets, or the exception each end raised. ``client_ctx`` None: a client
    without a certificate that verifies nothing."""
    a, b = gevent.socket.socketpair()
    fds = {"server": a.fileno(), "client": b.fileno()}  # wrap_socket detaches a and b

    def serve() -> Any:
        try:
            return server_ctx.wrap_socket(a, server_side=True)
        except (OSError, ssl.SSLError) as e:
            a.close()
            return e

    def connect() -> Any:
        try:
            if client_ctx is None:   # a client without a certificate
                ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                return ctx.wrap_socket(b)
            return client_ctx.wrap_socket(b)
        except (OSError, ssl.SSLError) as e:
            b.close()
            return e
    s, c = gevent.spawn(serve), gevent.spawn(connect)
    gevent.joinall([s, c], timeout=30, raise_error=True)
    if not (s.ready() and c.ready()):  # say which end hung rather than hand back None
        state = _hung_state({"server": s, "client": c}, fds)
        gevent.killall([s, c])
        a.close()
        b.close()
        raise AssertionError(f"TLS handshake over a socket pair not done in 30 s: {state}")
    return s.value, c.value


def _hung_state(ends: dict[str, Any], fds: dict[str, int]) -> str:
    """For each end of a handshake that did not finish: done or not, its fd, whether
    bytes wait on it, and whether the hub's epoll set holds it (/proc/self/fdinfo of the
    epoll fd lists the fds registered). Seen under pytest-xdist (2 of 3 full runs): both
    ends waiting in do_handshake with their read watchers active, nothing delivered."""
    loop = gevent.get_hub().loop
    try:
        with open(f"/proc/self/fdinfo/{loop.fileno()}") as f:
            polled = {int(line.split()[1]) for line in f if line.startswith("tfd:")}
    except (OSError, ValueError, IndexError):
        polled = set()
    out = []
    for name, g in ends.items():
        fd = fds[name]
        try:
            readable = bool(select.select([fd], [], [], 0)[0])
        except (OSError, ValueError):
            readable = None
        out.append(f"{name} finished={g.ready()} value={g.value!r} fd={fd} "
                   f"readable={readable} in_epoll={fd in polled}")
    return "; ".join(out) + f"; loop {loop!r} activecnt={loop.activecnt}"
