"""For ``scripts/perf_profile.py cprofile`` only (put on PYTHONPATH by it): with
MESHD_CPROFILE set to a directory, every forked child (meshd's workers) runs under
cProfile and dumps its stats to DIR/<pid>.prof on SIGUSR1, then goes on profiling.
Greenlet switches are counted by a ``greenlet.settrace`` hook (cProfile does not see
it) and written with the stats, to DIR/<pid>.switches."""

from __future__ import annotations

import os
from types import FrameType

_dir = os.environ.get("MESHD_CPROFILE")
if _dir:
    import cProfile
    import signal

    _prof: list[cProfile.Profile] = []

    def _dump(signum: int, frame: FrameType | None) -> None:
        assert _dir is not None
        for p in _prof:
            p.disable()
            with open(os.path.join(_dir, f"{os.getpid()}.switches"), "w") as f:
                f.write(str(_switches[0]))
            p.dump_stats(os.path.join(_dir, f"{os.getpid()}.prof"))
            p.enable()

    _switches = [0]

    def _switched(event: str, args: object) -> None:
        _switches[0] += 1

    def _start() -> None:
        import greenlet

        greenlet.settrace(_switched)
        _prof[:] = [cProfile.Profile()]
        signal.signal(signal.SIGUSR1, _dump)
        _prof[0].enable()

    os.register_at_fork(after_in_child=_start)
