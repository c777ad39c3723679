"""Where and how `meshd run` logs: one handler on stderr for the master and every child
(children inherit it across fork), in one of three shapes.

- text: ``2026-12-07 12:00:00,123 INFO meshd[1234] meshd.master: message``
- journal, chosen when stderr is systemd's journal stream (``JOURNAL_STREAM`` names the
  device and inode of stderr, as systemd documents): no timestamp of meshd's own (the
  journal stamps each line) and a ``<N>`` syslog priority prefix, so ``journalctl -p
  warning`` filters by level. The pid stays in the text: the journal attributes every
  line of the stream to the master, whichever child wrote it.
- json (``--log-format json``): one object per line, ``ts`` (ISO-8601 UTC), ``level``,
  ``logger``, ``msg``, ``pid``, and ``exc`` for a traceback.

The level comes from ``--log-level`` or else the config's ``log_level``; the master sets
it again on every accepted reload (a new generation's processes inherit it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s meshd[%(process)d] %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s [%(process)d] %(name)s: %(message)s"
# syslog priorities (sd-daemon.h): what journald reads from a "<N>" line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def stderr_is_journal() -> bool:
    """True when stderr is connected to the journal (not merely started by systemd with
    its output redirected elsewhere afterwards): JOURNAL_STREAM is "DEV:INODE" of it."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        # Every line of a traceback gets the prefix too: journald reads each line alone.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(fmt: str = "text", level: str = "info") -> None:
    """Send every log record of this process (and of children forked later) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
