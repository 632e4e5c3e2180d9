"""The final Prefect state of each shard task of a pipelined pass (richpref/run/pipeline.py), and what it
says: its result or the error it ended with.

Each shard task's future is a Dask future whose result, kept on its worker, is the task run's final
Prefect state. Asking each future alone costs a round trip to the Dask scheduler's event loop (1.4 ms a
shard: 3.9 s after the last shard of a 2,816-shard run), and reading each state's result another
0.25 ms. Fetched in one gather at the end, a 2,816-shard pass still spent 1.5 s there with every GPU
idle (docs/benchmarks.md). So the states of finished shards are fetched while the pass runs, a batch
at a time (`add`, from the live dispatch's loop), and only the last batch at the end (`outcomes`).
"""
from __future__ import annotations

from dataclasses import dataclass

BATCH = 64  # finished shard futures per fetch while the pass runs


@dataclass(frozen=True)
class Outcome:
    """A shard task's end: its state (None where the task failed on Dask itself: its future says
    why), and its result or the exception reading it raised (a failed task run's error)."""

    state: object | None
    result: object = None
    error: BaseException | None = None


class FinalStates:
    def __init__(self, batch: int = BATCH):
        self.batch = batch
        self._got: dict[str, Outcome] = {}  # Dask future key -> its shard's outcome
        self._finished: list = []  # finished Dask futures not fetched yet

    def add(self, futures: list) -> None:
        """Prefect futures of shard tasks seen finished; fetched once a batch of them is."""
        self._finished += [f.wrapped_future for f in futures]
        if len(self._finished) >= self.batch:
            self._fetch(self._finished)
            self._finished = []

    def outcomes(self, futures: list, watch=None) -> list[Outcome]:
        """Each future's outcome, in order, once all are done: those not fetched yet in one gather.
        `watch`: fail once no GPU worker is left while waiting."""
        from richpref.run.cluster import wait_watched

        wrapped = [f.wrapped_future for f in futures]
        pending = [f for f in wrapped if f.key not in self._got]
        while pending:
            wait_watched(pending, watch, 2.0)
            pending = [f for f in pending if not f.done()]
        self._fetch([f for f in wrapped if f.key not in self._got])
        self._finished = []
        return [self._got[f.key] for f in wrapped]

    def _fetch(self, wrapped: list) -> None:
        from prefect.states import State

        if not wrapped:
            return
        got = wrapped[0].client.gather(dict(enumerate(wrapped)), errors="skip")
        for i, fut in enumerate(wrapped):
            state = got.get(i)
            self._got[fut.key] = _read(state) if isinstance(state, State) else Outcome(None)


def _read(state) -> Outcome:
    try:
        return Outcome(state, result=state.result(raise_on_failure=True))
    except BaseException as exc:  # noqa: BLE001 - a failed task run's error, reported by the caller
        return Outcome(state, error=exc)
