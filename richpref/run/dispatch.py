"""Model affinity decided live: which Dask GPU worker runs which model shard, chosen when the shard's
inputs are committed and a worker is free, by the rule the affinity plan simulates
(richpref/run/affinity.py).

Fixed in advance from a stage cost table, the plan's homes and ranks only held where the cluster's
times were the table's: with a CPU doctor table on a CPU cluster a 1,024-item run made 112 model loads
where 14 were planned (a worker started whichever of its planned shards was ready, switching models
back and forth), and with the built-in H200 table a worker idled 12 s waiting for its planned stage.
Here the rule is applied to the run's own events instead:

- a worker's next model shard is one of its resident stage's ready shards, up to `DEPTH` in flight
  per shard its GPU slot runs at once (two for a served VLM's stage), so that the worker never waits
  on this process between two shards;
- a worker with nothing in flight and nothing of its own stage ready switches by
  `affinity.choose_stage` (the stage's remaining work against its model load; the stage furthest below
  its share of the workers first); while its own stage has shards to come and another worker computes,
  it waits for them while fewer others hold the stage than its whole share (`affinity.waits_for_inputs`),
  else switches only to a stage whose ready shards pay the loads there and back; where a model stage
  that makes its inputs has shards left and no holder (`affinity.fed`), it switches by the rule;
- a worker whose stage has ready shards leaves it for a stage nobody holds that `affinity.pulled_to`
  gives, once its shards in flight end (one model in use at a time);
- at the start, while the first model stage's inputs are computed, the workers the rule would give
  that stage load its models (`Stage.load`, as a Dask task on each), so the loads overlap that work;
- a worker left with nothing to do and no shards of its own stage to come, while another computes,
  loads the models of the first stage with shards to come that no worker holds (`Stage.load`, as a
  Dask task on that worker), so its load overlaps the work that makes that stage's inputs instead
  of following it;
- a stage's seconds per shard and per model load are the medians of what this run timed, its latest
  `TIMED` timings (a worker's shard after one of the same stage, and after one of another stage less a
  shard; a load ahead), the table's before.

Model-free shards are submitted as soon as their inputs are: they claim no GPU and run on any
worker's CPU slot, where their input is, at a lower Dask priority than model shards, so that a model
shard given to a worker does not wait behind the model-free shards queued there.
"""
from __future__ import annotations

import heapq
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from richpref.run.affinity import choose_stage, fed, model_feeders, pulled_to, waits_for_inputs, worker_shares

log = logging.getLogger("richpref")
DEPTH = 2  # model shards in flight per worker and shard computing at once: the next one starts meanwhile
# A stage's medians are over its latest timings: a cost that drifts is followed, and a median stays as
# cheap at the 100,000th shard as at the 100th (over all of them, the sorts grew with the run: 0.1 ms
# of dispatch a shard at 16,000 shards a stage, docs/benchmarks.md).
TIMED = 255


@dataclass
class _Worker:
    address: str
    stage: str | None = None  # resident: the stage of the last model shard it was given
    in_flight: int = 0
    last_done: float = 0.0  # when its last model shard finished (as seen here)
    last_stage: str | None = None  # the stage of that shard
    leaving_for: str | None = None  # a stage nobody holds that it takes once its shards in flight end


@dataclass
class Dispatch:
    """What the live dispatch did: model shards given to each worker and the stage switches it decided."""

    shards: dict[str, int] = field(default_factory=dict)  # worker address -> model shards
    switches: int = 0  # times a worker was given another stage than its resident one (incl. the first)
    preloads: int = 0  # of which, models an idle worker loaded ahead of their stage's shards

    def summary(self) -> dict:
        return {"shards": dict(sorted(self.shards.items())), "switches": self.switches, "preloads": self.preloads}


class Dispatcher:
    """Submits every task of `todo` ((stage index, stage, shard), inputs first) through `submit`
    (which returns its Prefect future and records it in `futures`), the model shards as workers
    free up; returns when every submitted future is done."""

    def __init__(self, todo, futures: dict, submit, homes: list[str],
                 shard_seconds: dict[str, float], load_s: dict[str, float], watch=None, wait_s: float = 2.0,
                 preload=None, at_once: dict[str, int] | None = None, finished=None):
        # finished(keys): told of the shards seen finished, after the workers they freed were given more
        self.finished, self.seen_finished = finished, []
        self.todo, self.futures, self.submit, self.watch, self.wait_s = todo, futures, submit, watch, wait_s
        # preload(stage output, worker address): a Dask future of that worker loading the stage's
        # models, or None where the stage cannot be loaded ahead; None: no preloading.
        self.preload, self.loading = preload, {}
        self.at_once = at_once or {}  # per stage output name: shards one GPU slot runs at once (default 1)
        self.workers = [_Worker(a) for a in homes]
        self.table_s, self.load_s = shard_seconds, load_s  # per stage output name, from the cost table
        self.model_stages = list(dict.fromkeys(st.out for _, st, _ in todo if st.loads_model))
        self.task = {(st.out, s): (i, st, s) for i, st, s in todo}
        self.readers: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self.unsubmitted: dict[tuple[str, int], int] = {}  # model-free task -> inputs without a future yet
        self.not_done: dict[tuple[str, int], int] = {}  # model task -> inputs not finished
        self.ready = {k: [] for k in self.model_stages}  # heaps of ready shards
        self.left = {k: 0 for k in self.model_stages}  # model shards not yet submitted, per stage
        self.timed: dict[str, deque[float]] = {k: deque(maxlen=TIMED) for k in self.model_stages}  # no load
        self.first: dict[str, deque[float]] = {k: deque(maxlen=TIMED) for k in self.model_stages}  # with a load
        self.load_timed: dict[str, deque[float]] = {k: deque(maxlen=TIMED) for k in self.model_stages}  # preloads
        self.flying: dict[tuple[str, int], tuple[_Worker | None, float]] = {}
        self.report = Dispatch()
        reads: dict[str, set[str]] = {}
        for _, st, s in todo:
            ins = [(r, s) for r in st.reads if (r, s) in self.task]  # inputs computed in this pass
            reads.setdefault(st.out, set()).update(r for r, _ in ins)
            for dep in ins:
                self.readers.setdefault(dep, []).append((st.out, s))
            (self.not_done if st.loads_model else self.unsubmitted)[(st.out, s)] = len(ins)
            if st.loads_model:
                self.left[st.out] += 1
        self.feeders = model_feeders(reads, set(self.model_stages))

    def run(self) -> Dispatch:
        for key, n in self.not_done.items():
            if n == 0:
                heapq.heappush(self.ready[key[0]], key[1])
        self._load_first()  # before the model-free shards: the loads reach the workers first
        for key, n in list(self.unsubmitted.items()):
            if n == 0:
                self._submit_free(key)
        while True:
            self._fill()
            if not self.flying:
                if any(self.left.values()) or self.unsubmitted:
                    raise RuntimeError("dispatch: shards left whose inputs never finish")
                return self.report
            if self.finished is not None and self.seen_finished:
                self.finished(self.seen_finished)
                self.seen_finished = []
            self._wait()

    def _submit_free(self, key) -> None:
        del self.unsubmitted[key]
        idx, stage, s = self.task[key]
        self.flying[key] = (None, self._now())
        self.submit(idx, stage, s, None)
        self._submitted(key)

    def _submitted(self, key) -> None:
        self._count_down(key, self.unsubmitted, self._submit_free)

    def _finished(self, key) -> None:
        self._count_down(key, self.not_done, lambda r: heapq.heappush(self.ready[r[0]], r[1]))

    def _count_down(self, key, waiting: dict, then) -> None:
        """One input of each reader of `key` less in `waiting`; `then(reader)` when it has none left."""
        for r in self.readers.get(key, ()):
            if r in waiting:
                waiting[r] -= 1
                if waiting[r] == 0:
                    then(r)

    def seconds(self, stage: str) -> float:
        timed = self.timed[stage]
        return statistics.median(timed) if timed else self.table_s[stage]

    def load(self, stage: str) -> float:
        """A stage's model load seconds: a preload, or a worker's first shard of it less a shard, once
        timed here."""
        shard_s = self.seconds(stage)
        seen = [f - shard_s for f in self.first[stage]] + list(self.load_timed[stage])
        return max(0.0, statistics.median(seen)) if seen else self.load_s[stage]

    def _fill(self) -> None:
        for w in sorted(self.workers, key=lambda w: w.in_flight):
            while w.in_flight < DEPTH * self.at_once.get(w.stage, 1):
                pick = w.stage if w.stage is not None and self.ready[w.stage] else None
                if pick is not None and w.leaving_for is None:
                    w.leaving_for = self._pulled_away(w)
                if w.leaving_for is not None:
                    if w.in_flight:
                        break  # its shards in flight end first: one model in use at a time
                    target, w.leaving_for = w.leaving_for, None
                    pick = target if self.ready[target] else pick
                if pick is None and w.in_flight == 0:
                    ready = [k for k in self.model_stages if self.ready[k]]
                    left = {k: n * self.seconds(k) for k, n in self.left.items()}
                    if w.stage is not None and self.left[w.stage] and self._producing(w):
                        # Its own stage has shards to come: it waits for them (`waits_for_inputs`), or
                        # leaves only for enough ready work to pay the loads there and back (else it
                        # swaps back and forth as inputs trickle in); where no worker makes its inputs
                        # (`fed`), it goes where the rule says.
                        mates = sum(1 for o in self.workers if o is not w and o.stage == w.stage)
                        others = {o.stage for o in self.workers if o is not w} | {o.leaving_for for o in self.workers}
                        inputs_made = fed(w.stage, self.feeders, self.left, others)
                        if waits_for_inputs(mates, worker_shares(left, len(self.workers))[w.stage], inputs_made):
                            ready = []
                        elif inputs_made:
                            ready = [k for k in ready
                                     if len(self.ready[k]) * self.seconds(k) >= self.load(k) + self.load(w.stage)]
                    holders = {k: sum(1 for o in self.workers if o is not w and o.stage == k) for k in ready}
                    pick = choose_stage(ready, holders, {k: self.load(k) for k in ready}, left, len(self.workers))
                if pick is None:
                    if w.in_flight == 0:
                        self._load_ahead(w)
                    break
                self._give(w, pick, heapq.heappop(self.ready[pick]))

    def _pulled_away(self, w: _Worker) -> str | None:
        """A stage nobody holds or is leaving for that `w` leaves its own for (`affinity.pulled_to`)."""
        left = {k: n * self.seconds(k) for k, n in self.left.items()}
        held = {o.stage for o in self.workers} | {o.leaving_for for o in self.workers}
        ready = [k for k in self.model_stages if self.ready[k] and k not in held]
        if not ready:
            return None
        return pulled_to(w.stage, ready, lambda k: len(self.ready[k]) * self.seconds(k), held,
                         worker_shares(left, len(self.workers)), sum(1 for o in self.workers if o.stage == w.stage),
                         {k: self.load(k) for k in ready + [w.stage]})

    def _load_first(self) -> None:
        """At the start, while the first model stage's inputs are computed (no model shard ready yet):
        the workers the rule would give that stage (`choose_stage`, as if its shards were ready) load its
        models now, so the loads overlap that work instead of following it."""
        if self.preload is None or any(self.ready.values()):
            return
        first = next((k for k in self.model_stages if self.left[k]), None)
        if first is None:
            return
        left = {k: n * self.seconds(k) for k, n in self.left.items()}
        for w in self.workers:
            holders = sum(1 for o in self.workers if o.stage == first)
            if choose_stage([first], {first: holders}, {first: self.load(first)}, left, len(self.workers)) is None:
                return
            self._start_load(w, first)

    def _start_load(self, w: _Worker, stage: str) -> bool:
        """`w` loads `stage`'s models as a Dask task; False where the stage cannot be loaded ahead."""
        fut = self.preload(stage, w.address)
        if fut is None:
            return False
        key = ("load", stage, w.address)
        self.loading[key] = fut
        self.flying[key] = (w, self._now())
        self.report.switches += 1
        self.report.preloads += 1
        w.stage, w.in_flight = stage, w.in_flight + 1
        return True

    def _load_ahead(self, w: _Worker) -> None:
        """An idle worker with no shards of its own to come loads the model of the first stage with
        shards to come that nobody holds, while those shards' inputs are computed elsewhere. Not
        before another worker computes: at the start, a stage is about to be ready and the rule
        decides who takes it."""
        if self.preload is None or (w.stage is not None and self.left[w.stage]) or not self._producing(w):
            return
        held = {o.stage for o in self.workers}
        for k in self.model_stages:
            if self.left[k] and k not in held and not self.ready[k] and self._start_load(w, k):
                return

    def _producing(self, w: _Worker) -> bool:
        """Whether another worker computes a model shard now (whose outputs may make `w`'s ready)."""
        return any(o is not w and o.in_flight for o in self.workers)

    def _give(self, w: _Worker, stage: str, shard: int) -> None:
        key = (stage, shard)
        self.report.switches += w.stage != stage
        self.report.shards[w.address] = self.report.shards.get(w.address, 0) + 1
        w.stage, w.in_flight = stage, w.in_flight + 1
        self.left[stage] -= 1
        self.flying[key] = (w, self._now())
        idx, st, s = self.task[key]
        self.submit(idx, st, s, w.address)
        self._submitted(key)

    def _block(self, keys: list) -> None:
        """Until one of the futures of `keys` finishes, or `wait_s` passes."""
        from richpref.run.cluster import wait_watched

        wait_watched([self._future(k) for k in keys], self.watch, self.wait_s, "FIRST_COMPLETED")

    def _future(self, key):
        return self.loading[key] if key in self.loading else self.futures[key].wrapped_future

    def _done(self, key) -> bool:
        return self._future(key).done()

    def _now(self) -> float:
        return time.monotonic()

    def _wait(self) -> None:
        self._block(list(self.flying))
        now = self._now()
        for key in [k for k in self.flying if self._done(k)]:
            w, submitted = self.flying.pop(key)
            if key in self.loading:  # a preload: the worker now holds the stage's models
                self._loaded(key, w, now - submitted, now)
                continue
            if w is not None:
                # Its shard started when it was submitted or when the worker's previous one finished.
                if w.last_done < now:  # not one of a batch seen finished at once
                    # After a shard of the same stage: no load in it; after another: the load too.
                    took = now - max(submitted, w.last_done)
                    (self.timed if w.last_stage == key[0] else self.first)[key[0]].append(took)
                w.in_flight, w.last_done, w.last_stage = w.in_flight - 1, now, key[0]
            self.seen_finished.append(key)
            self._finished(key)

    def _loaded(self, key, w: _Worker, took: float, now: float) -> None:
        stage = key[1]
        fut = self.loading.pop(key)
        if fut.status == "finished":
            self.load_timed[stage].append(took)
        else:  # its shards load it themselves and report what fails
            log.warning("loading %s ahead on %s failed: %s", stage, w.address, fut.exception())
        w.in_flight, w.last_done, w.last_stage = w.in_flight - 1, now, stage
