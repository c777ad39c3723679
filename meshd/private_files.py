"""meshd's own files: the private directories it keeps them in, and how each one is
created and read.

Two directories: ``shm_dir`` (the shared-memory region, endpoint snapshots, control
sockets; tmpfs) and ``state_dir`` (the last good endpoints). Both must be writable by
meshd's uid alone, because every name in them is predictable
(``meshd-{instance}-{pid}-g{N}.snap``): in a directory another user can write, that user
could plant the next generation's snapshot and receive a service's traffic, or squat the
region's name so meshd cannot start. So:

- a directory is created by meshd with mode 0700; one that already exists must be a
  directory owned by meshd's effective uid and writable by no one else, or meshd refuses
  to start (exit 2, naming the config key). Symbolic links to such a directory are
  followed: systemd's ``DynamicUser=`` makes ``/var/lib/meshd`` one.
- a file is created exclusively (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600) at an
  unpredictable temporary name in that directory, then renamed into place, so a reader
  sees the old file or the new one, whole.
- a file is opened without following a symbolic link and checked before a byte is used:
  a regular file, owned by the expected uid (meshd's own; for root running ``meshd
  stat``, the directory's owner) and writable by no one else.

``shm_dir`` defaults to ``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``), else
``/run/meshd`` for root, else ``$XDG_RUNTIME_DIR/meshd``; with none of them there is no
safe default and ``meshd run`` asks for ``shm_dir`` (:func:`prepare_dir`).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping

from meshd.errors import ConfigError

# Longest path a unix socket can bind (sun_path is 108 bytes with its NUL).
UNIX_PATH_MAX = 107


class UntrustedFile(PermissionError):
    """A file meshd was about to read is not one meshd wrote: a symbolic link, not a
    regular file, owned by another uid, or writable by others. An OSError, so every
    reader that already copes with an unreadable file copes with this one too."""


def default_shm_dir(env: Mapping[str, str], euid: int) -> str:
    """The default ``shm_dir``, or "" when there is no safe one (non-root, no
    ``$RUNTIME_DIRECTORY``, no ``$XDG_RUNTIME_DIR``)."""
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]   # several: ':'-separated
    if runtime:
        return runtime
    if euid == 0:
        return "/run/meshd"
    xdg = env.get("XDG_RUNTIME_DIR", "")
    return os.path.join(xdg, "meshd") if xdg else ""


def prepare_dir(path: str, key: str, optional: bool = False) -> bool:
    """Create ``path`` (mode 0700, parents as needed) or check the one there: a directory
    owned by this uid and writable by no other. Raises ``ConfigError`` naming ``key``;
    when ``optional``, a directory that cannot be created is only reported (False)."""
    euid = os.geteuid()
    if not path:
        raise ConfigError([(key, f"not set, and there is no safe default for uid {euid}: "
                                 "neither $RUNTIME_DIRECTORY nor $XDG_RUNTIME_DIR is set; set "
                                 f"{key} to a directory meshd may create (it will be mode 0700)")])
    try:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        if optional:
            return False
        raise ConfigError([(key, f"cannot create {path}: {e.strerror}")]) from None
    problem = dir_problem(path, euid)
    if problem:
        raise ConfigError([(key, f"{problem}; meshd keeps its files in a directory only its own "
                                 f"uid can write: remove it, or set {key} to another path")])
    return True


def dir_problem(path: str, uid: int) -> str:
    """Why ``path`` is not a directory only ``uid`` can write, or "" when it is one."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not meshd's uid {uid}"
    if st.st_mode & 0o022:
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def reader_uid(path: str) -> int:
    """The uid whose files a reader outside meshd (the CLI) trusts in the directory
    ``path``: its own; for root, the directory's owner (meshd may run as a service user),
    provided no one else can write the directory. Raises ``UntrustedFile``."""
    euid = os.geteuid()
    if euid != 0:
        return euid
    st = os.stat(path)
    problem = dir_problem(path, st.st_uid)
    if problem:
        raise UntrustedFile(problem)
    return st.st_uid


def open_trusted(path: str, flags: int = os.O_RDONLY, uid: int | None = None) -> int:
    """An fd for ``path``, a regular file owned by ``uid`` (default: this process's) that
    no one else can write, opened without following a symbolic link. The check is on the
    open file (fstat), so the file cannot be swapped between check and use."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        want = os.geteuid() if uid is None else uid
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile(f"{path}: not a regular file")
        if st.st_uid != want:
            raise UntrustedFile(f"{path}: owned by uid {st.st_uid}, not {want}; not trusted")
        if st.st_mode & 0o022:
            raise UntrustedFile(f"{path}: writable by other users (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}); not trusted")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_trusted(path: str, uid: int | None = None) -> bytes:
    """The whole of a file :func:`open_trusted` accepts."""
    with os.fdopen(open_trusted(path, uid=uid), "rb") as f:
        return f.read()


def create_temp(path: str) -> tuple[int, str]:
    """(fd, name) of a new file beside ``path``: mode 0600, created exclusively at an
    unpredictable name (``tempfile.mkstemp``: O_CREAT|O_EXCL|O_NOFOLLOW)."""
    return tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                            dir=os.path.dirname(path) or ".")


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: a 0600 file written at a temporary name, then
    renamed over ``path``. Raises OSError (nothing is left behind)."""
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
