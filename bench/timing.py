"""Timing and inputs shared by the benchmarks (imported as `timing`: a script's own folder is on sys.path)."""
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


def scene(i: int, size: int):
    """Benchmark image `i`: a flat background (its shade varies with i) and a bright ellipse."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (30 + 7 * i % 200, 60, 90))
    ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 200, 40))
    return im
