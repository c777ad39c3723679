"""A worker process's entry: gevent patches the standard library first, before anything
else imports ``socket``, ``ssl`` or ``threading``; then ``main`` (``meshd.worker.process``)
boots the worker. The master imports this module only in the forked child
(``meshd.master.spawn``); nothing of the data path imports it.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

from meshd.worker.process import main  # noqa: E402

__all__ = ["main"]
