"""Timing shared by the benchmarks (imported as `timing`: a script's own folder is on sys.path)."""
from __future__ import annotations

import time
from typing import Callable


def best_of(repeats: int, fn: Callable[[], object], *, warmup: bool = True) -> float:
    """The fastest of `repeats` calls of `fn`, in seconds, after one untimed call (first-call
    allocations, lazy imports) unless `warmup` is False."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
