"""Which GPU worker runs which model shard, weighted by a doctor table (model affinity).

Left to Dask alone, a shard of stage k+1 runs where its input shard was computed (data locality), so
every worker runs every stage and loads every model: with the tiny models, whose loads are long next
to their seconds per item, that idles the GPUs (bench/schedule.py). This module plans the shards of a
pipelined pass (richpref/run/pipeline.py) instead: it simulates the run on `workers` GPU slots with
each stage's seconds per item and model load seconds, and gives every model shard a home worker and
a rank (the order its worker should start it). The rule a free worker follows in the simulation:

- it keeps its resident model while a shard of that stage is ready, unless a stage with ready shards
  that nobody holds pulls it away (`pulled_to`: that stage's share of the workers is a whole worker
  and more than its own stage would lack without it, and its ready shards pay the loads);
- it waits for its own stage's next input while fewer other workers hold that stage than its whole
  share of the workers (`waits_for_inputs`), unless a model stage that makes those inputs, with
  shards left, has no holder (`fed`: nothing would come);
- otherwise it may switch to a stage with a ready shard when nobody holds that stage's model, or when
  the model's load costs at most the work it would take over (the stage's remaining work shared with
  the workers already holding it); among those, the stage furthest below its share of the workers
  (`worker_shares`: in proportion to its remaining work) first;
- else it waits for its own stage's next input.

The middle two keep a stage of short shards fed by a long one (score after check) running alongside
it: left to the others, every worker keeps the long stage while its shards are ready, to its end,
and the short stage's shards all run then, where each shard task's fixed cost, not the GPU, sets
the pace (bench/schedule.py).

A run does not follow the plan's homes and ranks: fixed in advance, they held only where the
cluster's times were the table's. The live dispatch (richpref/run/dispatch.py) applies the same rule
(`choose_stage`; and a worker whose own stage has shards to come leaves it only for ready work that
pays the loads there and back) to the run's own events; the plan is what that rule gives with the table's times
(logged, and the bound bench/schedule.py reports). Model-free stages are not planned: they take no
GPU time here. The caller (richpref/run/pipeline.py) gives each model shard its table seconds plus a
fixed cost per shard task, which the GPU slot holds too.
"""
from __future__ import annotations

import heapq
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StageCost:
    s_per_item: float  # steady seconds per source item
    load_s: float  # seconds to load the stage's models


# Tiny profile on one H200 in bfloat16 (`richpref doctor`, docs/benchmarks.md, commit 4d081d0):
# items/s and load seconds per stage. Measured before the doctor timed a worker's start apart: the
# sample load (10.29 s) holds the process's imports and CUDA start (edit's SD1.5 + ControlNet: 1.37 s).
_TINY_H200 = {
    "source": (6665.945, 0.27), "sample": (111.573, 10.29), "critique": (16.534, 0.44), "instruct": (33.129, 0.35),
    "edit": (41.461, 1.37), "cutout": (37.871, 0.94), "check": (4.143, 0.4), "filter": (1161.558, 0.0),
    "score": (34.682, 2.44), "relabel": (1067.914, 0.0), "export": (581.051, 0.0),
}
DEFAULT_COSTS: dict[str, StageCost] = {k: StageCost(1.0 / rate, load) for k, (rate, load) in _TINY_H200.items()}
DEFAULT_TABLE = "built-in table (richpref doctor, tiny profile, one H200, bfloat16)"


def read_doctor_table(path: str | Path) -> dict[str, StageCost]:
    """The stage costs of a `richpref doctor --json PATH` file."""
    stages = json.loads(Path(path).read_text(encoding="utf-8"))["report"]["stages"]
    return {s["stage"]: StageCost(float(s["s_per_item"]), float(s["load_s"])) for s in stages}


def read_start_s(doctor_json: str | None) -> float:
    """A worker process's start before its first model (`start_s` of a doctor file); 0 for the
    built-in table and older files, whose first model stage's load holds it."""
    if not doctor_json:
        return 0.0
    return float(json.loads(Path(doctor_json).read_text(encoding="utf-8"))["report"].get("start_s", 0.0))


def stage_costs(doctor_json: str | None) -> tuple[dict[str, StageCost], str]:
    """The table a run's affinity plan weighs, and where it came from: the doctor file the user
    passed (`richpref curate --doctor-json`), else the built-in one."""
    if doctor_json:
        return read_doctor_table(doctor_json), f"richpref doctor --json {doctor_json}"
    return DEFAULT_COSTS, DEFAULT_TABLE


def costs_for(names: list[str], table: dict[str, StageCost]) -> dict[str, StageCost]:
    """The table's cost of each stage; a stage it lacks gets the median of the stages it has."""
    if not table:
        raise ValueError("an empty stage cost table")
    median = StageCost(statistics.median(c.s_per_item for c in table.values()),
                       statistics.median(c.load_s for c in table.values()))
    return {n: table.get(n, median) for n in names}


def worker_shares(work: dict[str, float], workers: int) -> dict[str, float]:
    """Each stage's share of the workers, in proportion to its work (seconds): they add up to `workers`."""
    total = sum(work.values())
    return {k: (workers * w / total if total > 0 else 0.0) for k, w in work.items()}


@dataclass(frozen=True)
class Task:
    stage: str  # the stage's output name (its shards' key with `shard`)
    shard: int
    after: tuple[tuple[str, int], ...]  # input shards computed in the same pass
    seconds: float  # GPU-slot seconds; 0 for a model-free stage (not planned, passes its input's time on)
    load_s: float = 0.0
    fixed_s: float = 0.0  # of `seconds`, what the slot holds beyond the model calls (the task's fixed cost)


@dataclass
class Plan:
    home: dict[tuple[str, int], int]  # a model shard -> its worker (0 .. workers-1)
    rank: dict[tuple[str, int], int]  # a model shard -> the order its worker starts it (0 first)
    workers: int
    loads: int  # model loads the simulation made
    wall_s: float  # the simulated wall time
    model_s: float  # seconds of model calls of all model shards (their slot time less its fixed cost)
    stages_of: dict[int, list[str]] = field(default_factory=dict)  # worker -> the stages it runs, in order

    @property
    def busy(self) -> float:
        return self.model_s / (self.workers * self.wall_s) if self.wall_s > 0 else 1.0

    def summary(self) -> dict:
        return {"workers": self.workers, "loads": self.loads, "wall_s": round(self.wall_s, 3),
                "busy": round(self.busy, 4), "stages_of": {str(w): s for w, s in sorted(self.stages_of.items())}}


def plan(tasks: list[Task], workers: int) -> Plan:
    """Simulate `tasks` (in submission order, inputs before the shards that read them) on `workers`
    GPU slots under the rule of the module docstring; every model task gets a home and a rank."""
    if workers < 1:
        raise ValueError("plan needs at least one worker")
    by_key = {(t.stage, t.shard): t for t in tasks}
    model_stages = list(dict.fromkeys(t.stage for t in tasks if t.seconds > 0))
    readers: dict[tuple[str, int], list[Task]] = {}
    waiting = {}
    for t in tasks:
        waiting[(t.stage, t.shard)] = len(t.after)
        for dep in t.after:
            readers.setdefault(dep, []).append(t)
    ready_at: dict[tuple[str, int], float] = {}
    queues: dict[str, list[tuple[float, int]]] = {k: [] for k in model_stages}  # (ready time, shard)
    left = {k: sum(t.seconds for t in tasks if t.stage == k) for k in model_stages}

    def finished(key: tuple[str, int], at: float) -> None:
        # A model-free task finishes when its inputs have (no GPU time): pass the time on.
        stack = [(key, at)]
        while stack:
            k, when = stack.pop()
            for r in readers.get(k, ()):
                rk = (r.stage, r.shard)
                ready_at[rk] = max(ready_at.get(rk, 0.0), when)
                waiting[rk] -= 1
                if waiting[rk] == 0:
                    if r.seconds > 0:
                        heapq.heappush(queues[r.stage], (ready_at[rk], r.shard))
                    else:
                        stack.append((rk, ready_at[rk]))

    for t in tasks:
        if not t.after:
            if t.seconds > 0:
                heapq.heappush(queues[t.stage], (0.0, t.shard))
            else:
                finished((t.stage, t.shard), 0.0)

    free = [0.0] * workers
    resident: list[str | None] = [None] * workers
    home: dict[tuple[str, int], int] = {}
    rank: dict[tuple[str, int], int] = {}
    stages_of: dict[int, list[str]] = {}
    loads = waits = 0
    todo = sum(1 for t in tasks if t.seconds > 0)
    stage_load = {t.stage: t.load_s for t in tasks if t.seconds > 0}
    reads: dict[str, set[str]] = {}
    for t in tasks:
        reads.setdefault(t.stage, set()).update(d[0] for d in t.after)
    feeders = model_feeders(reads, set(model_stages))
    while len(home) < todo:
        w = min(range(workers), key=lambda i: (free[i], i))
        now = free[w]
        ready = [k for k in model_stages if queues[k] and queues[k][0][0] <= now]
        share = worker_shares(left, workers)
        mates = sum(1 for j, r in enumerate(resident) if j != w and r == resident[w])
        if resident[w] in ready:
            def ready_s(k: str, now: float = now) -> float:
                return sum(by_key[(k, s)].seconds for at, s in queues[k] if at <= now)

            pick = pulled_to(resident[w], ready, ready_s, set(resident), share, mates + 1, stage_load) or resident[w]
        elif resident[w] is not None and left[resident[w]] > 1e-9 and waits_for_inputs(
                mates, share[resident[w]], fed(resident[w], feeders, left, {r for j, r in enumerate(resident) if j != w})):
            pick = None
        else:
            pick = _switch_to(w, ready, resident, left, by_key, queues, workers)
        if pick is None:  # wait for the next input or the next worker to finish
            later = [q[0][0] for q in queues.values() if q and q[0][0] > now] + [f for f in free if f > now]
            waits = 0 if later else waits + 1
            if waits > workers:  # every worker asked at this time since the last pick, none can go on
                raise RuntimeError("plan: model shards left whose inputs never finish")
            # Nothing later yet: the workers free at this same time decide first (one may pick).
            free[w] = min(later) if later else math.nextafter(now, math.inf)
            continue
        waits = 0
        _, shard = heapq.heappop(queues[pick])
        task = by_key[(pick, shard)]
        if resident[w] != pick:
            loads += 1
            now += task.load_s
            resident[w] = pick
            stages_of.setdefault(w, []).append(pick)
        home[(pick, shard)], rank[(pick, shard)] = w, len(rank)
        now += task.seconds
        free[w] = now
        left[pick] -= task.seconds
        finished((pick, shard), now)
    model_s = sum(t.seconds - t.fixed_s for t in tasks)
    return Plan(home, rank, workers, loads, max(free) if todo else 0.0, model_s, stages_of)


def _switch_to(w: int, ready: list[str], resident: list[str | None], left: dict[str, float],
               by_key: dict, queues: dict, workers: int) -> str | None:
    holders = {k: sum(1 for j, r in enumerate(resident) if j != w and r == k) for k in ready}
    load = {k: by_key[(k, queues[k][0][1])].load_s for k in ready}
    return choose_stage(ready, holders, load, left, workers)


def choose_stage(ready: list[str], holders: dict[str, int], load_s: dict[str, float], left: dict[str, float],
                 workers: int) -> str | None:
    """The stage a free worker whose resident model has no ready shard switches to, or None (it waits):
    among the stages with a ready shard (`ready`, in pipeline order), those nobody else holds
    (`holders`: the other workers whose resident model is the stage's) or whose model load
    (`load_s`) costs at most the work it takes over (`left`: a stage's remaining seconds, shared with
    its holders); of those, the stage furthest below its share of the workers. The plan's simulation
    and the live dispatch (richpref/run/dispatch.py) both decide by it."""
    worth = [k for k in ready if holders[k] == 0 or load_s[k] <= left[k] / (holders[k] + 1)]
    if not worth:
        return None
    share = worker_shares(left, workers)
    return max(worth, key=lambda k: (share[k] - holders[k], -ready.index(k)))


def waits_for_inputs(mates: int, share: float, fed: bool = True) -> bool:
    """Whether a worker whose stage has shards to come but none ready waits for them rather than
    switching: while the other workers holding the stage (`mates`) are fewer than its whole share of
    the workers, and its inputs are being made (`fed`, below). Else a stage of short shards fed by a
    long one is left by all its workers whenever its inputs run out, and its shards wait for the long
    one's end, to run all at once."""
    return fed and mates < int(share)


def model_feeders(reads: dict[str, set[str]], model_stages: set[str]) -> dict[str, set[str]]:
    """Per model stage, the model stages whose shards it reads: directly, or through model-free stages
    (`reads`: each stage's inputs computed in the same pass, by output name)."""
    def feeding(stage: str, seen: set[str]) -> set[str]:
        out = set()
        for r in reads.get(stage, ()):
            if r not in seen:
                seen.add(r)
                out |= {r} if r in model_stages else feeding(r, seen)
        return out

    return {k: feeding(k, set()) for k in model_stages}


def fed(own: str, feeders: dict[str, set[str]], left: dict[str, float], held_by_others: set) -> bool:
    """Whether `own`'s inputs are being made: every model stage feeding it that has shards left is
    held by another worker. Waiting is no use otherwise: in the plan's simulation of the tiny profile
    (sample's load at edit's, 8 workers), two workers waited 12 s on check while nobody held cutout."""
    return all(left[f] <= 1e-9 or f in held_by_others for f in feeders.get(own, ()))


def pulled_to(own: str, ready: list[str], ready_s, held: set, share: dict[str, float], holders_of_own: int,
              load_s: dict[str, float]) -> str | None:
    """The stage a worker holding `own` (which has ready shards) leaves it for, or None: one nobody
    holds (`held`) among the stages with ready shards (`ready`), whose share of the workers is at least
    one and more than what `own` would lack of its share without this worker, and whose ready shards'
    seconds (`ready_s(stage)`) pay the loads there and back. Else a stage of short shards fed by a long
    one is taken up only when the long one runs out. Never the last holder of `own`: its ready shards
    would wait for a worker to run out of work of its own (in a traced run, 8 shards of instruct
    waited 36 s for the end)."""
    if holders_of_own < 2:
        return None
    for k in ready:
        if k == own or k in held or share[k] < 1 or share[k] <= share[own] - (holders_of_own - 1):
            continue
        if ready_s(k) >= load_s[k] + load_s[own]:
            return k
    return None
