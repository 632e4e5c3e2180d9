"""Curate on a Dask cluster without a stage barrier: each shard of stage k+1 starts as soon as its
inputs are committed instead of when the slowest shard of stage k ends.

A shard's content key follows from its inputs' keys alone (richpref/run/runner.py), so the whole chain is
keyed before anything runs. Given a stage cost table (a `richpref doctor --json` file, or the built-in
one), the model shards are dispatched live (richpref/run/dispatch.py): each goes to a GPU worker when
its inputs are committed, so a worker keeps its resident model while it has work for it and a stage
runs on about its share of the workers; model-free shards are submitted with their inputs and run
wherever their input is. Without a table every shard is submitted at once, earlier stages with the
higher Dask priority, each placed by Dask where its input is. The workers' model loads and swaps are
counted and reported at the end.

What this pass leaves undone (a shard another process holds, a failure) the stage-by-stage pass of
richpref/run/orchestration.py finishes; shards that failed here are reported, not computed twice.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from richpref.run.affinity import Plan, StageCost, Task, costs_for, plan
from richpref.run.final_states import FinalStates
from richpref.run.gpu_claims import computing_at_once, gpu_claim, takes_turns
from richpref.run.leases import Busy
from richpref.run.runner import ShardManifest, drop_shards_from, is_current, stage_keyer, stage_manifests
from richpref.schemas.config import Profile
from richpref.run.storage import RunStore
from richpref.tasks import ALL_OUTPUTS
from richpref.tasks.base import Stage
from richpref.run.shard_task import submit_shard

log = logging.getLogger("richpref")


@dataclass(frozen=True)
class Submitted:
    """An input shard submitted in this pass and not yet committed: its key is known."""

    key: str


@dataclass
class PassResult:
    failed: dict[str, dict[int, str]] = field(default_factory=dict)  # {stage name: {shard: error}}
    plan: dict | None = None  # the affinity plan's summary (None: no plan, or nothing to plan)


def _annotations(stage: Stage, priority: int, profile: Profile, home: str | None = None):
    import dask

    claim = gpu_claim(stage, profile)
    extra = {"resources": {"GPU": claim}} if claim else {}
    if home is not None:  # loose: a shard whose home worker left runs on another
        extra.update(workers=[home], allow_other_workers=True)
    return dask.annotate(priority=priority, **extra)


def gpu_workers(client) -> list[str]:
    """The addresses of the workers with a `GPU` slot, in name order (the plan's workers 0..n-1)."""
    infos = client.scheduler_info(n_workers=-1)["workers"]
    gpu = [(str(i.get("name", a)), a) for a, i in infos.items() if (i.get("resources") or {}).get("GPU", 0) >= 1]
    return [a for _, a in sorted(gpu)]


async def _work_stealing(dask_scheduler, on: bool) -> bool:
    """Start or stop the scheduler's work stealing; returns whether it was running."""
    steal = dask_scheduler.extensions.get("stealing")
    if steal is None:
        return False
    was = "stealing" in dask_scheduler.periodic_callbacks
    await (steal.start() if on else steal.stop())
    return was


@contextlib.contextmanager
def no_work_stealing(client):
    """While the planned shards run: an idle worker would otherwise steal shards from a busy home
    (a loose restriction allows it) and load their model, undoing the plan. Restored afterwards."""
    try:
        was = client.run_on_scheduler(_work_stealing, on=False)
    except Exception as exc:  # noqa: BLE001 - a scheduler without richpref installed: plan without it
        log.warning("could not pause the Dask scheduler's work stealing (%s); shards may leave their planned worker", exc)
        was = False
    try:
        yield
    finally:
        if was:
            client.run_on_scheduler(_work_stealing, on=True)


def shard_overhead_s() -> float:
    """What a model shard holds its GPU slot for beyond its model calls (the Prefect task, reading its
    inputs, writing and committing its output): `RICHPREF_SHARD_OVERHEAD_S`, default 0.1 s. A stage
    of many tiny shards is otherwise planned onto too few workers."""
    return float(os.environ.get("RICHPREF_SHARD_OVERHEAD_S", "0.1"))


def _model_seconds(todo: list[tuple[int, Stage, int]], profile: Profile, costs: dict[str, StageCost]
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """Per stage output name: a model shard's GPU-slot seconds (the source items of a shard x the
    table's seconds per item + the fixed cost of a shard task, `shard_overhead_s`) and its model load
    seconds; 0 for a model-free stage."""
    table = costs_for(list(dict.fromkeys(st.name for _, st, _ in todo)), costs)
    items = getattr(getattr(profile, "source", None), "shard_size", 1)
    overhead = shard_overhead_s()
    stages = {st.out: st for _, st, _ in todo}
    seconds = {o: items * table[st.name].s_per_item + overhead if st.loads_model else 0.0 for o, st in stages.items()}
    return seconds, {o: table[st.name].load_s for o, st in stages.items()}


def affinity_plan(todo: list[tuple[int, Stage, int]], seconds: dict[str, float], load: dict[str, float],
                  workers: int, fixed_s: float | None = None) -> Plan:
    """The plan's simulation of the shards to submit ((stage index, stage, shard), inputs first) with
    the table's times (`_model_seconds`): what the live dispatch's rule gives where the cluster's
    times are the table's (logged and reported; the run itself is dispatched live). Its busy counts the
    model calls only, not a shard's fixed cost (`fixed_s`, default `shard_overhead_s`) that `seconds` holds."""
    fixed = shard_overhead_s() if fixed_s is None else fixed_s
    outs = {(st.out, s) for _, st, s in todo}
    tasks = [Task(st.out, s, tuple((r, s) for r in st.reads if (r, s) in outs), seconds[st.out], load[st.out],
                  fixed if st.loads_model else 0.0)
             for _, st, s in todo]
    return plan(tasks, workers)


def pipeline_pass(stages: tuple[Stage, ...], store: RunStore, data_dir: str, run: str, profile: Profile,
                  costs: dict[str, StageCost] | None = None) -> PassResult:
    """Submit every shard not committed for its key, chained on its inputs, and wait for them all.
    `costs`: the stage cost table the affinity plan weighs (None: no plan). Returns the shards that
    failed in this pass (their downstream shards are not failures of their own) and the plan.
    Only on a Dask task runner; elsewhere it does nothing."""
    from richpref.run.orchestration import dask_runner

    runner = dask_runner()
    if runner is None or not stages or stages[0].reads:
        return PassResult()
    first = stages[0].count_shards(profile)
    drop_shards_from(store, list(ALL_OUTPUTS), first)
    refs: dict[str, dict[int, ShardManifest | Submitted]] = {}
    todo: list[tuple[int, Stage, int]] = []
    inputs_of: dict[tuple[str, int], dict] = {}
    keys: dict[tuple[str, int], str] = {}
    for idx, stage in enumerate(stages):
        have = stage_manifests(store, stage.out)
        refs[stage.out] = {}
        shards = range(first) if not stage.reads else sorted(set.intersection(*(set(refs[r]) for r in stage.reads)))
        key_of = stage_keyer(stage, profile)
        for s in shards:
            inputs = {r: refs[r][s] for r in stage.reads}
            key = key_of(s, {r: m.key for r, m in inputs.items()})
            m = have.get(s)
            if is_current(m, key):
                refs[stage.out][s] = m
                continue
            refs[stage.out][s] = Submitted(key)
            inputs_of[(stage.out, s)], keys[(stage.out, s)] = inputs, key
            todo.append((idx, stage, s))
    homes = gpu_workers(runner.client) if costs is not None and any(st.loads_model for _, st, _ in todo) else []
    live = Live(homes, *_model_seconds(todo, profile, costs)) if homes else None
    the_plan = affinity_plan(todo, live.shard_seconds, live.load_s, len(homes)) if live else None
    with no_work_stealing(runner.client) if live else contextlib.nullcontext():
        failed, dispatched = _submit_and_wait(todo, stages, profile, data_dir, run, inputs_of, keys, live)
    summary = the_plan.summary() if the_plan else None
    if summary is not None and dispatched is not None:
        summary["dispatch"] = dispatched.summary()
    return PassResult(failed, summary)


@dataclass(frozen=True)
class Live:
    """The live dispatch's inputs (richpref/run/dispatch.py): the GPU workers, and per stage output
    name the table's seconds of a model shard and of its model load."""

    homes: list[str]
    shard_seconds: dict[str, float]
    load_s: dict[str, float]


def _submit_and_wait(todo, stages, profile, data_dir, run, inputs_of, keys, live: Live | None):
    """Submit the shards (with `live`: each model shard on the worker the live dispatch gives it, when
    its inputs are committed), wait for them all; returns the failed ones and what the dispatch did."""
    from richpref.run.orchestration import _gpu_watch

    futures: dict[tuple[str, int], object] = {}
    order = iter(range(len(todo), 0, -1))  # Dask priority: earlier submissions first on a worker

    def submit(idx: int, stage: Stage, s: int, home: str | None) -> None:
        params = {r: futures[(r, s)] if isinstance(v, Submitted) else v for r, v in inputs_of[(stage.out, s)].items()}
        if live is None:
            how = _annotations(stage, len(stages) - idx, profile)
        elif stage.loads_model:
            how = _annotations(stage, next(order), profile, home)
        else:  # no GPU time, wherever its input is; after the model shards its worker was given
            how = _annotations(stage, -1 - idx, profile)
        with how:
            futures[(stage.out, s)] = submit_shard(stage, s, params, data_dir, run, profile, keys[(stage.out, s)])

    dispatched = None
    collected = FinalStates()
    watch = next((_gpu_watch(st) for _, st, _ in todo if st.loads_model), None)
    if live is None:
        for idx, stage, s in todo:
            submit(idx, stage, s, None)
    else:
        from richpref.run.dispatch import Dispatcher

        at_once = {st.out: computing_at_once(st, profile) for _, st, _ in todo if st.loads_model}
        dispatched = Dispatcher(todo, futures, submit, live.homes, live.shard_seconds, live.load_s,
                                watch, preload=_preloader(todo, profile), at_once=at_once,
                                finished=lambda keys: collected.add([futures[k] for k in keys])).run()
    if todo:
        log.info("pipelined: %d shard(s) of %d stage(s)%s", len(todo), len({st.name for _, st, _ in todo}),
                 f"; model shards dispatched live over {len(live.homes)} GPU worker(s): {dispatched.switches} "
                 f"stage switch(es), {dispatched.preloads} of them models loaded ahead"
                 if live else " submitted at once")
    outcomes = collected.outcomes([futures[(st.out, s)] for _, st, s in todo], watch)
    ok: dict[tuple[str, int], bool] = {}
    failed: dict[str, dict[int, str]] = {}
    for (_, stage, s), end in zip(todo, outcomes):
        fut = futures[(stage.out, s)]
        upstream_ok = all(ok.get((r, s), True) for r in stage.reads)
        result, exc = end.result, end.error
        if end.state is None:  # failed on Dask itself: its future raises why
            try:
                result = fut.result()
            except BaseException as dask_exc:  # noqa: BLE001 - report, do not stop the other shards
                exc = dask_exc
        if exc is not None:
            ok[(stage.out, s)] = False
            if upstream_ok:  # its own failure, not the echo of an input's
                message = (end.state or fut.state).message
                err = message if not str(exc) else f"{type(exc).__name__}: {exc}"
                failed.setdefault(stage.name, {})[s] = err
                log.error("%s shard %05d failed: %s", stage.name, s, err)
            continue
        ok[(stage.out, s)] = not isinstance(result, Busy)
    return failed, dispatched


def _preloader(todo, profile: Profile):
    """The live dispatch's preload: a Dask task on a given worker loading a stage's models
    (richpref/run/shard_task.py), for a stage whose models run in the worker's process and that declares
    its loader; None for the others (a served VLM's shards start their server themselves)."""
    from richpref.run.orchestration import dask_runner
    from richpref.run.shard_task import load_stage_models

    client = dask_runner().client
    stages = {st.out: st for _, st, _ in todo}

    def preload(out: str, address: str):
        st = stages[out]
        if st.load is None or not takes_turns(st, profile):
            return None
        return client.submit(load_stage_models, st, profile, workers=[address], allow_other_workers=True,
                             resources={"GPU": 1}, priority=len(todo) + len(stages) + 1, pure=False)

    return preload


def _worker_models() -> dict:
    from richpref.models.runtime import resident

    return {"loads": resident.loads, "swaps": resident.swaps}


def model_swaps(since: dict | None = None) -> dict | None:
    """Model loads and swaps summed over the Dask workers (None on another task runner); `since`: an
    earlier answer, subtracted (workers of a cluster kept between runs count from their start)."""
    from richpref.run.orchestration import dask_runner

    runner = dask_runner()
    if runner is None:
        return None
    per = runner.client.run(_worker_models, on_error="return")
    counts = [c for c in per.values() if isinstance(c, dict)]
    out = {"workers": len(counts), "loads": sum(c["loads"] for c in counts), "swaps": sum(c["swaps"] for c in counts)}
    if since:
        out.update(loads=max(0, out["loads"] - since["loads"]), swaps=max(0, out["swaps"] - since["swaps"]))
    return out


def models_used(before: dict | None) -> dict | None:
    """The workers' model loads and swaps since `before` (a model_swaps() answer), also logged."""
    now = model_swaps(since=before)
    if now is not None:
        log.info("models on %d Dask worker(s): %d load(s), %d swap(s)", now["workers"], now["loads"], now["swaps"])
    return now
