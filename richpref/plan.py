"""What a curate run would compute, worked out from the files alone (no Prefect, no model).

The flow's own rule, applied ahead of it: a shard is done when its file on disk carries the content
key the flow would compute for it now (stage code version, stage config, input shard hashes). A
stage's shard whose inputs are themselves to be computed cannot be keyed yet: it is `blocked`.
`richpref curate --plan` prints this; `richpref curate` uses it to return at once, without starting
Prefect, when a finished run is up to date.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .schemas.config import Profile, profile_hash
from .storage import RunStore, ShardManifest


@dataclass
class StagePlan:
    stage: str
    done: list[int] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)  # inputs known, output missing or computed for another key
    blocked: list[int] = field(default_factory=list)  # waits on an input shard that is itself to do


@dataclass
class RunPlan:
    run: str
    source_done: bool
    stages: list[StagePlan]
    seconds: float
    source: StagePlan | None = None

    @property
    def up_to_date(self) -> bool:
        return self.source_done and all(not s.todo and not s.blocked for s in self.stages)

    def format(self) -> str:
        lines = [f"run {self.run}: " + ("up to date, nothing to compute" if self.up_to_date else "work to do")
                 + f" (checked in {self.seconds:.2f}s)",
                 f"source: {'done' if self.source_done else 'to read'}" + (
                     f" ({len(self.source.done)} of {len(self.source.done) + len(self.source.todo)} shards done)"
                     if self.source is not None and not self.source_done else ""),
                 f"{'stage':<10} {'done':>5} {'todo':>5} {'blocked':>8}"]
        for s in self.stages:
            lines.append(f"{s.stage:<10} {len(s.done):>5} {len(s.todo):>5} {len(s.blocked):>8}"
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


def plan_run(profile: Profile, data_dir: str, run: str) -> RunPlan:
    from .tasks import PIPELINE
    from .tasks.source import STAGE as SOURCE

    t0 = time.perf_counter()
    store = RunStore(data_dir, run)
    stages = []
    manifests: dict[str, dict[int, ShardManifest]] = {}
    pending: dict[str, set[int]] = {}  # shards to compute: their hashes are unknown yet
    for stage in (SOURCE, *PIPELINE):
        plan = StagePlan(stage.name)
        manifests[stage.out], pending[stage.out] = {}, set()
        if stage.reads:
            shards = sorted(set.union(*(set(manifests[r]) | pending[r] for r in stage.reads)))
        else:
            shards = list(range(stage.count_shards(profile)))
        for s in shards:
            if any(s not in manifests[r] for r in stage.reads):
                plan.blocked.append(s)
                pending[stage.out].add(s)
                continue
            m = store.committed(stage.out, s, stage.content_key(profile, {r: manifests[r][s] for r in stage.reads}, s))
            if m is None:
                plan.todo.append(s)
                pending[stage.out].add(s)
            else:
                manifests[stage.out][s] = m
                plan.done.append(s)
        stages.append(plan)
    return RunPlan(run=run, source_done=not stages[0].todo, stages=stages[1:], seconds=time.perf_counter() - t0,
                   source=stages[0])


def finished_and_current(profile: Profile, data_dir: str, run: str) -> bool:
    """The last curate of `run` completed with this very profile (its report and run.json are final)."""
    store = RunStore(data_dir, run)
    path = f"{store.root}/run.json"
    if not store.fs.exists(path):
        return False
    try:
        last = json.loads(store.fs.cat_file(path))
    except ValueError:
        return False
    return last.get("state") == "completed" and last.get("profile_hash") == profile_hash(profile)
