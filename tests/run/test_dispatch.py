"""The live dispatch of richpref/run/dispatch.py against a simulated cluster: a clock, workers that
run their model shards one after another (a load when the stage changes), model-free shards that
finish when their inputs do. The stage cost table the dispatch starts from is wrong on purpose."""
from __future__ import annotations

from dataclasses import dataclass

from richpref.run.dispatch import Dispatcher


@dataclass(frozen=True)
class _Stage:
    name: str
    reads: tuple[str, ...]
    loads_model: bool = True

    @property
    def out(self) -> str:
        return self.name


class _Simulated(Dispatcher):
    """Submissions go to a simulated cluster with the true seconds per shard and per load."""

    def __init__(self, todo, true_s, true_load, homes, table_s, table_load):
        super().__init__(todo, {}, {}, self._run_on, homes, table_s, table_load)
        self.true_s, self.true_load, self.clock = true_s, true_load, 0.0
        self.ends: dict[tuple[str, int], float] = {}
        self.free_at = {a: 0.0 for a in homes}
        self.holds: dict[str, str] = {}
        self.ran: dict[str, list[str]] = {a: [] for a in homes}
        self.loads = 0

    def _run_on(self, idx, stage, shard, home) -> None:
        key = (stage.out, shard)
        after = max([self.ends[(r, shard)] for r in stage.reads if (r, shard) in self.ends], default=self.clock)
        if home is None:  # model-free: done when its inputs are
            self.ends[key] = after
            return
        load = self.true_load[stage.name] if self.holds.get(home) != stage.name else 0.0
        self.loads += load > 0
        self.holds[home] = stage.name
        start = max(self.clock, self.free_at[home], after)
        self.ends[key] = self.free_at[home] = start + load + self.true_s[stage.name]
        self.ran[home].append(f"{stage.name}{shard}")

    def _block(self, keys) -> None:
        self.clock = max(self.clock, min(self.ends[k] for k in keys))

    def _done(self, key) -> bool:
        return self.ends[key] <= self.clock

    def _now(self) -> float:
        return self.clock


def _chain(shards: int):
    stages = [_Stage("source", ()), _Stage("a", ("source",)), _Stage("b", ("a",)), _Stage("c", ("b",)),
              _Stage("export", ("c",), loads_model=False)]
    stages[0] = _Stage("source", (), loads_model=False)
    return [(i, st, s) for i, st in enumerate(stages) for s in range(shards)]


def _dispatch(table_s, table_load, shards=16, workers=2):
    true_s, true_load = {"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 0.3}
    sim = _Simulated(_chain(shards), true_s, true_load, [f"w{i}" for i in range(workers)], table_s, table_load)
    report = sim.run()
    return sim, report


def test_every_shard_runs_once_on_a_worker_and_model_free_ones_follow():
    sim, report = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 0.3})
    ran = sorted(x for xs in sim.ran.values() for x in xs)
    assert ran == sorted(f"{st}{s}" for st in "abc" for s in range(16))
    assert set(sim.ends) == {(st, s) for st in ("source", "a", "b", "c", "export") for s in range(16)}
    assert sum(report.shards.values()) == 48


def _changes(ran: list[str]) -> int:
    return sum(a[0] != b[0] for a, b in zip(ran, ran[1:]))


def test_a_table_that_makes_loads_look_free_does_not_swap_models_back_and_forth():
    # The table says stage a's load takes 10 s, so one worker takes a and the other b, and that b's
    # and c's loads cost nothing (they take 0.3 s): switching to c whenever a shard of it is ready
    # looked free, and the worker holding b went b, c, b, c, ... as a's shards trickled in (8 loads,
    # 4.0 s). Once the run has timed b's load, that worker waits for b's inputs instead.
    sim, report = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 10.0, "b": 0.0, "c": 0.0})
    assert max(_changes(ran) for ran in sim.ran.values()) <= 2, sim.ran
    assert sim.loads <= 5 and report.switches == sim.loads, sim.ran
    assert sim.clock < 3.6


def test_a_worker_idle_at_the_start_takes_the_next_stage_and_both_finish():
    # One worker is enough for stage a's load to be worth it alone (10 s in the table): the other
    # waits for the first shard of a, then runs b and c.
    sim, _ = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 10.0, "b": 0.3, "c": 0.3})
    firsts = {w: ran[0][0] for w, ran in sim.ran.items()}
    assert sorted(firsts.values()) == ["a", "b"], sim.ran
