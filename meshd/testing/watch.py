"""The plugin test kit's runner: drive a discovery backend's ``watch`` and assert on it.

    rec = WatchRecorder(MyBackend("src", {"address": server.url}), "web")
    rec.wait_for(lambda eps: {str(e) for e in eps} == {"10.0.0.1:80"})
    server.add_endpoint(...)
    rec.wait_for(lambda eps: len(eps) == 2, timeout=2)
    rec.close()

The watch runs in a daemon thread (plain blocking code works the same there as in
meshd's gevent-patched control process). Every update is kept in ``updates``; the
endpoint set they add up to is ``endpoints`` (as meshd would compute it); an exception
the watch raised is kept in ``error``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from meshd.discovery.api import Endpoint, NoSuchService, Update, apply


class WatchRecorder:
    def __init__(self, backend: Any, service: str) -> None:
        self.backend = backend
        self.service = service
        self.updates: list[tuple[float, Update]] = []
        self.endpoints: tuple[Endpoint, ...] = ()
        self.exists: bool | None = None
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"watch-{service}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for update in self.backend.watch(self.service):
                with self._cond:
                    self.updates.append((time.monotonic(), update))
                    self.exists = not isinstance(update, NoSuchService)
                    self.endpoints = apply(self.endpoints, update)
                    self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def next(self, timeout: float = 5.0) -> Update:
        """The next update not yet taken with next()."""
        taken = getattr(self, "_taken", 0)
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.updates) > taken or self.error, timeout):
                raise TimeoutError(f"no update for {self.service} within {timeout}s")
            if len(self.updates) <= taken and self.error is not None:
                raise AssertionError(f"watch of {self.service} raised {self.error!r}")
            self._taken = taken + 1
            return self.updates[taken][1]

    def wait_for(self, predicate: Callable[[tuple[Endpoint, ...]], bool],
                 timeout: float = 5.0) -> tuple[Endpoint, ...]:
        """Wait until the endpoint set satisfies ``predicate``; returns it."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.endpoints), timeout):
                raise TimeoutError(f"endpoints of {self.service} never matched within {timeout}s; "
                                   f"last: {[str(e) for e in self.endpoints]}, error: {self.error!r}")
            return self.endpoints

    def wait_error(self, timeout: float = 5.0) -> BaseException:
        with self._cond:
            if not self._cond.wait_for(lambda: self.error is not None, timeout):
                raise TimeoutError(f"the watch of {self.service} did not fail within {timeout}s")
            assert self.error is not None
            return self.error

    def close(self, timeout: float = 5.0) -> None:
        """Ask the backend to stop (its close()) and wait a little for the thread."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self._thread.join(timeout)
