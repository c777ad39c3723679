"""For ``scripts/perf_profile.py cprofile`` and ``gc`` only (put on PYTHONPATH by it):
with MESHD_CPROFILE set to a directory, every forked child (meshd's workers) runs under
cProfile and dumps its stats to DIR/<pid>.prof on SIGUSR1, then goes on profiling.
Greenlet switches are counted by a ``greenlet.settrace`` hook (cProfile does not see
it) and written with the stats, to DIR/<pid>.switches. With MESHD_GCSTATS set to a
directory, every forked child counts its garbage collections (per generation: how many,
objects collected, CPU time inside them, from ``gc.callbacks``) and writes them to
DIR/<pid>.gc.json on SIGUSR1."""

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

_gc_dir = os.environ.get("MESHD_GCSTATS")
if _gc_dir:
    import gc
    import json
    import signal
    import time

    _counts = {"collections": [0, 0, 0], "collected": [0, 0, 0], "cpu_s": [0.0, 0.0, 0.0]}
    _began = [0.0]

    def _gc_callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _began[0] = time.process_time()
            return
        gen = info["generation"]
        _counts["collections"][gen] += 1
        _counts["collected"][gen] += info["collected"]
        _counts["cpu_s"][gen] += time.process_time() - _began[0]

    def _gc_dump(signum: int, frame: FrameType | None) -> None:
        assert _gc_dir is not None
        path = os.path.join(_gc_dir, f"{os.getpid()}.gc.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_counts | {"thresholds": gc.get_threshold()}, f)
        os.rename(path + ".tmp", path)

    def _gc_start() -> None:
        gc.callbacks.append(_gc_callback)
        signal.signal(signal.SIGUSR1, _gc_dump)

    os.register_at_fork(after_in_child=_gc_start)
