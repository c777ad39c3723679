"""Rate-limited log lines for events a client (or a discovery source) can trigger at will.

A malformed stream, a refused tunnel, an unknown service or a refused watch each deserve a
log line, but a client that sends thousands of them must not flood the journal. A
``Throttle`` lets ``burst`` lines per key through in each ``interval``; later lines in
that interval are counted, and the first line after it is preceded by one
``"<key>: N more similar lines suppressed in the last Xs"``. When no line follows (the
burst is over), ``flush_all`` (every process's heartbeat loop calls it once a second)
reports the count once the interval is over, so a burst's size is never lost in the
quiet after it. Keys are chosen by the caller
from configuration (a listener's name and the kind of event), never from client input;
at most ``MAX_KEYS`` are remembered all the same (the oldest is forgotten first).

Sans-IO apart from the logger it writes to: the clock is injectable for tests.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

MAX_KEYS = 1024
BURST = 10        # lines per key per interval
INTERVAL = 10.0   # seconds


class _Window:
    __slots__ = ("start", "passed", "suppressed", "level")

    def __init__(self, start: float) -> None:
        self.start = start
        self.passed = 0
        self.suppressed = 0
        self.level = logging.INFO   # of the lines suppressed last: their report's level


class Throttle:
    """``burst`` lines per key every ``interval`` seconds to ``logger``; the rest counted."""

    def __init__(self, logger: logging.Logger, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        _THROTTLES.add(self)

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its burst; True if logged."""
        now = self.clock()
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(now)
            if len(self._windows) > MAX_KEYS:
                self._windows.popitem(last=False)
        elif now - window.start >= self.interval:
            if window.suppressed:
                self.logger.log(level, "%s: %d more similar lines suppressed in the last %gs",
                                key, window.suppressed, round(now - window.start, 1))
            window.start, window.passed, window.suppressed = now, 0, 0
            self._windows.move_to_end(key)
        if window.passed >= self.burst:
            window.suppressed += 1
            window.level = level
            return False
        window.passed += 1
        self.logger.log(level, msg, *args)
        return True

    def flush(self) -> int:
        """Report the suppressed lines of every key whose interval is over (the next line
        of that key starts a new window); how many keys were reported."""
        now = self.clock()
        due = [(key, w) for key, w in self._windows.items()
               if w.suppressed and now - w.start >= self.interval]
        for key, window in due:
            self.logger.log(window.level, "%s: %d more similar lines suppressed in the last %gs",
                            key, window.suppressed, round(now - window.start, 1))
            window.start, window.passed, window.suppressed = now, 0, 0
        return len(due)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)


# Every throttle of the process (most are module globals), for flush_all: weak, so a
# throttle's owner going away takes it off the list.
_THROTTLES: weakref.WeakSet[Throttle] = weakref.WeakSet()


def flush_all() -> int:
    """``flush`` every throttle of this process (called from its heartbeat loop)."""
    return sum(t.flush() for t in list(_THROTTLES))
