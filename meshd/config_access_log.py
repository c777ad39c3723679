"""The config of the access log: ``[access_log]`` (CONTRACT, "Observability").

``path`` is "-" (the worker's stdout) or a file that each worker appends to; its
directory must exist and be writable, checked wherever the config is read (``meshd
check``, start, HUP) so a typo fails before traffic does. ``format`` is "text" or
"json". The table absent: no access log, and no cost on the request path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from meshd.config_table import Problems, Table, choice, integer, string

FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """``[access_log]``: one line per request (``meshd.worker.access_log``)."""
    path: str = "-"          # "-": stdout
    format: str = "text"     # | "json"
    queue: int = 4096        # lines a worker holds for its writer; more are dropped (counted)


def access_log(raw: object, problems: Problems) -> AccessLogConfig | None:
    """``[access_log]``, or None when the table is absent."""
    if raw is None:
        return None
    t = Table(raw, "access_log", problems)
    path = t.field(AccessLogConfig, "path", string())
    fmt = t.field(AccessLogConfig, "format", choice(*FORMATS))
    queue = t.field(AccessLogConfig, "queue", integer(16, 1_000_000))
    t.finish()
    if path != "-":
        if not path:
            problems.append(("access_log.path", 'empty; use "-" for stdout or a file path'))
        else:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                problems.append(("access_log.path", f"directory {directory!r} does not exist"))
            elif not os.access(directory, os.W_OK | os.X_OK):
                problems.append(("access_log.path", f"directory {directory!r} is not writable"))
            elif os.path.isdir(path):
                problems.append(("access_log.path", f"{path!r} is a directory"))
            elif os.path.exists(path) and not os.access(path, os.W_OK):
                problems.append(("access_log.path", f"{path!r} is not writable"))
    return AccessLogConfig(path=path, format=fmt, queue=queue)
