"""The static plugin's endpoints file: reread when it changes, shared by every watch.

One ``EndpointsFile`` per source holds the file's last good content and, while the
file is missing or invalid, why. Watches do not poll on their own: one of them at a
time (whichever finds nobody polling) stats the file every ``interval``; the file is
read only when its (inode, size, mtime, ctime) changed, parsed only when its bytes
differ, and every change of state bumps ``version`` and wakes the watches waiting on it.
With 1,000 services watched that is one ``stat`` per interval, not 1,000.

The format follows the extension: ``.json`` is JSON, anything else TOML. The top level
is ``service = [entries]`` with the entry forms of the inline ``services`` table.
"""

from __future__ import annotations

import json
import os
import threading
import tomllib
from collections.abc import Collection
from typing import NamedTuple

from meshd_static.entries import Problems, Services, parse_services

MAX_PROBLEMS_SHOWN = 5
MAX_FILE_BYTES = 64 << 20   # an endpoints file larger than this is refused, not read


class FileState(NamedTuple):
    version: int
    services: Services | None   # the last good content; None: never read successfully
    error: str | None           # why the current content is not in use (names the file)


class EndpointsFile:
    def __init__(self, path: str, interval: float, closed: threading.Event,
                 inline: Collection[str] = ()) -> None:
        self.path = path
        self.interval = interval
        self.json = path.lower().endswith(".json")
        self._closed = closed
        self._inline = frozenset(inline)
        self._cond = threading.Condition()
        self._io = threading.Lock()        # one reader at a time (services() vs the poller)
        self._version = 0
        self._services: Services | None = None
        self._error: str | None = None
        self._stamp: tuple[int, ...] | None = None
        self._raw: bytes | None = None
        self._data: dict[str, object] = {}    # the last good document, as parsed
        self._polling = False

    def state(self) -> FileState:
        with self._cond:
            return FileState(self._version, self._services, self._error)

    def check(self) -> FileState:
        """Look at the file now; read and parse it only if it changed."""
        with self._io:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if stamp == self._stamp:
                    return self.state()
                if st.st_size > MAX_FILE_BYTES:
                    raise ValueError(f"{self.path}: larger than {MAX_FILE_BYTES >> 20} MiB")
                with open(self.path, "rb") as f:
                    raw = f.read(MAX_FILE_BYTES + 1)
            except OSError as e:
                self._stamp = self._raw = None
                return self._set(None, f"{self.path}: cannot read: {e.strerror or e}")
            except ValueError as e:
                self._stamp = self._raw = None
                return self._set(None, str(e))
            self._stamp = stamp
            if raw == self._raw:
                return self.state()
            self._raw = raw
            try:
                return self._set(self._parse(raw), None)
            except ValueError as e:
                return self._set(None, str(e))

    def _parse(self, raw: bytes) -> Services:
        try:
            data = json.loads(raw) if self.json else tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: invalid JSON: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{self.path}: invalid TOML: {e}") from None
        problems: Problems = []
        if isinstance(data, dict):
            services = self._reparse(data, problems)
        else:
            services = parse_services(data, "", problems)   # reports the top level
        for name in services:
            if name in self._inline:
                problems.append((name, "also given inline under services; give a service "
                                       "in one place"))
        if problems:
            shown = "; ".join(f"{k}: {m}" for k, m in problems[:MAX_PROBLEMS_SHOWN])
            more = len(problems) - MAX_PROBLEMS_SHOWN
            raise ValueError(f"{self.path}: {shown}" + (f"; and {more} more" if more > 0 else ""))
        self._data = data if isinstance(data, dict) else {}
        return services

    def _reparse(self, data: dict[str, object], problems: Problems) -> Services:
        """Entries equal to the last good document's keep their endpoints: an edit of one
        service in a file of thousands costs the file's parse and a comparison."""
        known = self._services or {}
        same = {k for k, v in data.items() if k in known and self._data.get(k) == v}
        fresh = parse_services({k: v for k, v in data.items() if k not in same}, "", problems)
        return {k: known[k] if k in same else fresh[k] for k in data if k in same or k in fresh}

    def _set(self, services: Services | None, error: str | None) -> FileState:
        """A new reading: good content replaces the last good; an error keeps it."""
        with self._cond:
            changed = error != self._error
            if services is not None and services != self._services:
                self._services, changed = services, True
            self._error = error
            if changed:
                self._version += 1
                self._cond.notify_all()
            return FileState(self._version, self._services, self._error)

    def wait(self, seen: int) -> FileState | None:
        """The state once its version is not ``seen``; None once closed. The caller polls
        the file itself when no other watch does."""
        while not self._closed.is_set():
            with self._cond:
                if self._version != seen:
                    return FileState(self._version, self._services, self._error)
                if self._polling:
                    # The poller wakes everyone on a change; the bound lets this watch take
                    # over should the poller's greenlet be killed (meshd dropped its watch).
                    self._cond.wait(self.interval * 4)
                    continue
                self._polling = True
            try:
                while not self._closed.wait(self.interval):
                    state = self.check()
                    if state.version != seen:
                        return state
            finally:
                with self._cond:
                    self._polling = False
                    self._cond.notify()      # another watch takes over the polling
        return None

    def close(self) -> None:
        with self._cond:
            self._cond.notify_all()
