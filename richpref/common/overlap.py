"""Keep the accelerator busy: the CPU work around each model batch runs on a thread pool while the
model computes (the next batch is prepared, the previous one finished, during the current one).

Image decoding and encoding (Pillow), resizes, NumPy and OpenCV release the GIL, so the pool's
threads run beside the model's thread. Results come back in batch order, each batch computed by the
same functions on the same inputs as without the pool: outputs are identical, only the wall time
changes. `RICHPREF_CPU_THREADS=0` runs everything on the caller's thread (for comparisons).
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

B = TypeVar("B")
P = TypeVar("P")
R = TypeVar("R")
F = TypeVar("F")


def cpu_threads() -> int:
    """Threads for the CPU work around model batches (RICHPREF_CPU_THREADS; default 2, 0 = none)."""
    return int(os.environ.get("RICHPREF_CPU_THREADS", "2"))


@dataclass
class OverlapStats:
    """Seconds spent in the model calls and in the CPU work around them, and the wall time."""

    model_s: float = 0.0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    batches: int = 0


_collectors: list[OverlapStats] = []
_lock = threading.Lock()


@contextmanager
def measure() -> Iterator[OverlapStats]:
    """Collect the stats of every `pipelined` call made inside the block (used by the benchmarks)."""
    stats = OverlapStats()
    _collectors.append(stats)
    try:
        yield stats
    finally:
        _collectors.remove(stats)


def _add(field: str, seconds: float) -> None:
    if _collectors:
        with _lock:
            for c in _collectors:
                setattr(c, field, getattr(c, field) + seconds)


def _timed(field: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            _add(field, time.perf_counter() - t0)

    return run


class _Inline:
    """The executor interface, run at once on the caller's thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised by .result(), as a pool would
            fut.set_exception(exc)
        return fut

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def pipelined(batches: Sequence[B], run: Callable[[P], R], *, prepare: Callable[[B], P] | None = None,
              finish: Callable[[B, P, R], F] | None = None, threads: int | None = None) -> list[F]:
    """For each batch: `prepare(batch)` on the pool (one batch ahead), `run(prepared)` on this thread
    (the model), `finish(batch, prepared, result)` on the pool while the next batch runs.

    Returns the finished batches in order. An exception in any step is raised here, after the
    batches already submitted have settled (nothing is left running on the pool).
    """
    prepare = prepare or (lambda b: b)  # type: ignore[assignment, return-value]
    finish = finish or (lambda b, p, r: r)  # type: ignore[assignment, return-value]
    threads = cpu_threads() if threads is None else threads
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="richpref-cpu") if threads > 0 else _Inline()
    prep, fin, model = _timed("cpu_s", prepare), _timed("cpu_s", finish), _timed("model_s", run)
    finished: list[Future] = []
    with pool:
        ahead = pool.submit(prep, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            prepared = ahead.result()  # type: ignore[union-attr]
            ahead = pool.submit(prep, batches[i + 1]) if i + 1 < len(batches) else None
            result = model(prepared)
            finished.append(pool.submit(fin, batch, prepared, result))
    _add("wall_s", time.perf_counter() - t0)
    _add("batches", len(batches))
    return [f.result() for f in finished]


def chunks(items: Sequence[B], size: int) -> list[Sequence[B]]:
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


class Memo:
    """A pure function of an image, computed ahead for a batch (`fill`, from a `prepare` step on the
    pool) and looked up when the model's code calls it. Unknown inputs are computed on the spot, so a
    miss costs time, never correctness; `drop` forgets a finished batch's values."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self._values: dict[Any, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(image: Any) -> Any:
        return (image.mode, image.size, image.tobytes())

    def fill(self, images: Sequence[Any]) -> None:
        for im in images:
            k = self.key(im)
            with self._lock:
                if k in self._values:
                    continue
            value = self.fn(im)
            with self._lock:
                self._values[k] = value

    def drop(self, images: Sequence[Any]) -> None:
        with self._lock:
            for im in images:
                self._values.pop(self.key(im), None)

    def __call__(self, image: Any) -> Any:
        with self._lock:
            k = self.key(image)
            if k in self._values:
                return self._values[k]
        return self.fn(image)

    def __getattr__(self, name: str) -> Any:  # the wrapped function's attributes (a detector's kind, ...)
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)
