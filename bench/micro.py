"""In-process measurement helpers for the ``python -m bench.X`` micro benchmarks: how many
Python calls one call makes (exact, with ``sys.setprofile``), and its best CPU time."""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from typing import Any


def calls(fn: Callable[[], Any]) -> int:
    """Python and C calls ``fn()`` makes, itself not counted."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count - 1  # setprofile(None) itself


def best(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Seconds of CPU per call of ``fn``: the best of ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)) / number
