"""A simulated cluster for the live dispatch (richpref/run/dispatch.py): a clock, workers that run their
model shards one after another (a load when the stage changes), model-free shards that finish when
their inputs do. Used by tests/run/test_dispatch.py and bench/dispatch_scale.py."""
from __future__ import annotations

from dataclasses import dataclass

from richpref.run.dispatch import Dispatcher


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    loads_model: bool = True

    @property
    def out(self) -> str:
        return self.name


class Loaded:
    status = "finished"


class LoadFailed:
    status = "error"

    def exception(self):
        return OSError("no such model directory")


class Simulated(Dispatcher):
    """Submissions go to a simulated cluster with the true seconds per shard and per load."""

    def __init__(self, todo, true_s, true_load, homes, table_s, table_load, preload=True, load_result=Loaded,
                 at_once=None, free_s=0.0):
        self.told_finished: list[tuple[str, int]] = []  # what the dispatch said finished, in order
        super().__init__(todo, {}, self._run_on, homes, table_s, table_load,
                         preload=self._load_on if preload else None, at_once=at_once,
                         finished=self.told_finished.extend)
        self.most_in_flight: dict[str, int] = {}  # per stage: the most shards of it in flight on one worker
        self.true_s, self.true_load, self.clock, self.load_result = true_s, true_load, 0.0, load_result
        self.free_s = free_s  # a model-free shard's seconds after its inputs (CPU slots to spare)
        self.ends: dict[tuple[str, int], float] = {}
        self.free_at = {a: 0.0 for a in homes}
        self.holds: dict[str, str] = {}
        self.ran: dict[str, list[str]] = {a: [] for a in homes}
        self.loads = 0

    def _run_on(self, idx, stage, shard, home) -> None:
        key = (stage.out, shard)
        after = max([self.ends[(r, shard)] for r in stage.reads if (r, shard) in self.ends], default=self.clock)
        if home is None:  # model-free: done when its inputs are, and its own seconds
            self.ends[key] = after + self.free_s
            return
        load = self.true_load[stage.name] if self.holds.get(home) != stage.name else 0.0
        self.loads += load > 0
        self.holds[home] = stage.name
        start = max(self.clock, self.free_at[home], after)
        self.ends[key] = self.free_at[home] = start + load + self.true_s[stage.name]
        self.ran[home].append(f"{stage.name}{shard}")
        mine = sum(1 for k, (w, _) in self.flying.items()  # model shards: (stage, shard); loads: ("load", ..)
                   if len(k) == 2 and k[0] == stage.out and w is not None and w.address == home)
        self.most_in_flight[stage.out] = max(self.most_in_flight.get(stage.out, 0), mine)

    def _load_on(self, stage: str, home: str):
        start = max(self.clock, self.free_at[home])
        self.ends[("load", stage, home)] = self.free_at[home] = start + self.true_load[stage]
        self.holds[home] = stage
        self.loads += 1
        self.ran[home].append(f"load {stage}")
        return self.load_result()

    def _block(self, keys) -> None:
        self.clock = max(self.clock, min(self.ends[k] for k in keys))

    def _done(self, key) -> bool:
        return self.ends[key] <= self.clock

    def _now(self) -> float:
        return self.clock
