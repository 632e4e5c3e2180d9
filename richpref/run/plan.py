"""What a curate run would compute, worked out from the shard manifests alone (no Prefect, no model).

The shard runner's own rule (richpref/run/runner.py), applied ahead of the flow: a shard is done when its
manifest carries the content key the flow would compute for it now. A key follows the input shards'
keys, never their bytes, so a shard whose inputs are to be computed is keyed with the keys they will be
committed for: it is done when its manifest carries that key (an input redone after its file was lost
leaves it as it is), and otherwise `blocked` until its inputs are. `richpref curate --plan` prints
this, `richpref status` counts from it; `richpref curate` uses it to return at once, without starting
Prefect, when a finished run is up to date. No shard's bytes are read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from richpref.schemas.config import Profile, profile_hash
from richpref.run.run_state import covers
from richpref.run.runner import is_current, stage_keyer, stage_manifests
from richpref.run.storage import RunStore
from richpref.tasks.base import Stage


@dataclass
class StagePlan:
    stage: str
    done: list[int] = field(default_factory=list)  # committed for the key they have (or will have) now
    todo: list[int] = field(default_factory=list)  # inputs ready, output missing or computed for another key
    blocked: list[int] = field(default_factory=list)  # to compute once an input shard is (computed or kept)
    table: str = ""  # what the stage writes, the name status and inspect show (export: pairs)


def plan_stages(stages: tuple[Stage, ...], profile: Profile, store: RunStore) -> list[StagePlan]:
    """Per stage: shards done, to do, or blocked on an input to do; from the manifests alone."""
    keys: dict[str, dict[int, str]] = {}  # per table, each shard's key now (done, to do or blocked)
    ready: dict[str, set[int]] = {}  # done shards whose inputs are done too: the run can read them now
    plans = []
    for stage in stages:
        plan, keys[stage.out], ready[stage.out] = StagePlan(stage.name, table=stage.out), {}, set()
        have = stage_manifests(store, stage.out)
        key_of = stage_keyer(stage, profile)
        candidates = (range(stage.count_shards(profile)) if not stage.reads
                      else sorted(set.union(*(set(keys[r]) for r in stage.reads))))
        for s in candidates:
            if any(s not in keys[r] for r in stage.reads):  # an input shard nothing makes: no key
                plan.blocked.append(s)
                continue
            key = keys[stage.out][s] = key_of(s, {r: keys[r][s] for r in stage.reads})
            inputs_ready = all(s in ready[r] for r in stage.reads)
            if is_current(have.get(s), key):
                plan.done.append(s)
                if inputs_ready:
                    ready[stage.out].add(s)
            else:
                (plan.todo if inputs_ready else plan.blocked).append(s)
        plans.append(plan)
    return plans


@dataclass
class RunPlan:
    run: str
    stages: list[StagePlan]
    seconds: float
    source: StagePlan | None = None

    @property
    def up_to_date(self) -> bool:
        return all(not s.todo and not s.blocked for s in self.stages)

    def stages_with_work(self) -> set[str]:
        """The stages with shards to compute: their models must be there, the others' need not."""
        return {s.stage for s in self.stages if s.todo or s.blocked}

    def format(self) -> str:
        w = max([10, *(len(s.table or s.stage) for s in self.stages)])
        lines = [f"run {self.run}: " + ("up to date, nothing to compute" if self.up_to_date else "work to do")
                 + f" (checked in {self.seconds:.2f}s)",
                 f"{'stage':<{w}} {'done':>5} {'todo':>5} {'blocked':>8}"]
        for s in self.stages:  # named as `richpref status` names them
            lines.append(f"{s.table or s.stage:<{w}} {len(s.done):>5} {len(s.todo):>5} {len(s.blocked):>8}"
                         + (f"  todo: {_ranges(s.todo)}" if s.todo else ""))
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)


def plan_run(profile: Profile, data_dir: str, run: str, until: str | None = None) -> RunPlan:
    """The plan of `run`'s stages, up to `until` (the last stage a `--until` run computes; None: all)."""
    from richpref.tasks import stages_for

    t0 = time.perf_counter()
    stages = plan_stages(stages_for(profile, until), profile, RunStore(data_dir, run))
    return RunPlan(run=run, stages=stages, seconds=time.perf_counter() - t0)


def finished_and_current(profile: Profile, data_dir: str, run: str, until: str | None = None) -> bool:
    """The last curate of `run` ran with this very profile and recorded every stage up to `until`
    (None: all): its report and run.json are final for what this command would compute."""
    from richpref.tasks import stages_for

    last = RunStore(data_dir, run).last_run()
    return (last.get("profile_hash") == profile_hash(profile)
            and covers(last.get("state"), until, [s.name for s in stages_for(profile)]))
