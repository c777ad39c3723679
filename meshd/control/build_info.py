"""The labels of ``meshd_build_info``: the versions of Python, gevent, h2 and the
OpenSSL the ssl module links, read once in the control process (it renders /metrics; the
master must not import ssl before it forks, ``meshd.master.spawn``, and
``meshd.metrics`` is sans-IO)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform


@functools.cache
def labels() -> tuple[tuple[str, str], ...]:
    import ssl  # here: whoever imports this module may be the master

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return ""
    return (("python", platform.python_version()), ("gevent", dist("gevent")),
            ("h2", dist("h2")), ("openssl", ssl.OPENSSL_VERSION))
