"""How busy the GPUs of a curate run are: the real shard runner and curate scheduling (the pipelined
pass of richpref/run/pipeline.py, then the stage pass of richpref/run/orchestration.py) under Prefect on a
real local Dask cluster of simulated GPU workers, each stage's model call replaced by a sleep.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/schedule.py [--workers 8] [--shards 256] [--items 8]
        [--time-scale 0.5] [--doctor-json doctor.json] [--no-affinity]

Per-item seconds and model load seconds come from a `richpref doctor` table: by default the tiny
profile on one H200 (docs/benchmarks.md, "`richpref doctor` on a GPU", bfloat16 run, commit 4d081d0),
or `--doctor-json` (written by `richpref doctor --json`). Every time is multiplied by --time-scale.
A doctor file with a worker start (`start_s`: imports and device start, timed apart since the doctor
splits them from the first model stage's load) has each worker sleep it once, before its first load;
the built-in table's sample load holds it.
Each worker has one GPU slot (`GPU=1`, two model shards at once: richpref/run/gpu_claims.py)
and one CPU slot: three threads, made as a curate run's local workers are (forked from one process
that imported the stages and model libraries, the shard task preloaded, curate's Dask settings). A
model stage's shard sleeps items x seconds-per-item (GPU busy) after its model is resident (a load
sleeps load seconds, counted as idle); model-free stages sleep on CPU slots. Shards are real Parquet files in a temp run folder.
The model shards are dispatched live (richpref/run/dispatch.py), starting from the same table, as a
curate run does; `--no-affinity`: without it (each shard where its input is, earlier stages first).
Also printed: the affinity plan, the rule simulated with the table's times (richpref/run/affinity.py).

busy = model sleep seconds / (workers x wall); ideal = model sleep seconds / workers;
swaps = loads that replaced another resident model, summed over the workers. Where the rest of
the workers' time goes is read from their traced sleeps (`idle_breakdown`): slot_compute_s, slot_load_s,
slot_gap_same_model_s (between two shards of the model a worker holds; printed by stage too),
slot_gap_switch_s (around a load or a switch of stage), slot_head_s and slot_tail_s (before a
worker's first and after its last). Printed first: the
bound of a schedule in which every worker loads every model once (its loads are idle GPU time), for
the table at hand; the bound of any schedule (every worker idles while the first model stage loads);
and the dispatch rule simulated with the sleeps alone (`rule_busy`: what the rule reaches where a
shard task costs nothing). After the run: the CPU seconds of the flow's process, the Prefect server
and the workers over the flow's wall, and per shard (one task run each), which say whether the
cores, not the schedule, set the wall. On the harness: each repeat (default 1) a fresh process with its own Prefect home;
raw figures go to bench/results/schedule-<commit>.json (`--no-record`: not). Headline: busy (goal
>= 0.90, and wall/ideal <= 1.15).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import harness  # noqa: E402

def _table(path: str | None) -> dict[str, tuple[float, float]]:
    """items/s and load seconds per stage: a `richpref doctor --json` file, else the library's built-in
    table (richpref/run/affinity.py: tiny profile, one H200, bfloat16)."""
    from richpref.run.affinity import stage_costs

    costs, _ = stage_costs(path)
    return {k: (1.0 / c.s_per_item, c.load_s) for k, c in costs.items()}


def _sleeping(name: str, per_item: float, load_s: float, loads_model: bool, items: int, start_s: float = 0.0):
    """The shard function of a simulated stage: sleeps instead of the model; rows pass through."""

    def compute(inputs, profile):
        import pyarrow as pa

        rows = inputs.rows
        ids = [f"i{inputs.shard:05d}-{k}" for k in range(items)] if name == "source" else rows.column("item_id").to_pylist()
        if loads_model:
            _sleeping_load(name, load_s, start_s)(profile)
        t0 = time.time()
        time.sleep(len(ids) * per_item)
        if loads_model:
            _trace("compute", name, t0)
        cols = {"item_id": ids, "status": ["ok"] * len(ids), "reason": pa.nulls(len(ids), pa.string())}
        if name == "edit" or (rows is not None and "candidate" in rows.schema.names):
            cols["candidate"] = [0] * len(ids) if name == "edit" else rows.column("candidate").to_pylist()
        return pa.table(cols)

    return compute


STARTED_ENV = "RICHPREF_SCHEDULE_STARTED"  # set in a worker process once it paid its start


def _sleeping_load(name: str, load_s: float, start_s: float = 0.0):
    """A simulated stage's `load` (the live dispatch loads a stage ahead on an idle worker); a worker's
    first load sleeps its process start first (`start_s` of the doctor table, if it has one)."""

    def load(profile):
        from richpref.models.runtime import resident

        def sleep_load():
            if start_s and not os.environ.get(STARTED_ENV):
                t0 = time.time()
                time.sleep(start_s)
                _trace("load", "start", t0)
                os.environ[STARTED_ENV] = "1"  # this worker process's own environment
            t0 = time.time()
            time.sleep(load_s)
            _trace("load", name, t0)
            return name

        resident.get(("sim", name), sleep_load)
        return [name]

    return load


TRACE_ENV = "RICHPREF_SCHEDULE_TRACE"  # a file each worker appends its model sleeps to


def _trace(kind: str, stage: str, t0: float) -> None:
    with open(os.environ[TRACE_ENV], "a") as f:
        f.write(f"{os.getpid()} {kind} {stage} {t0:.4f} {time.time():.4f}\n")


def idle_breakdown(lines: list[str], start: float, end: float) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of GPU-slot time over all workers between `start` and `end`, from the traced sleeps: model
    computation, model loads, and the idle rest split into the gaps between two shards of the model the
    worker holds, the gaps around a model load or stage switch, and each worker's head and tail; and the
    same-model gaps by stage (where a stage's shards are short next to a shard task's cost on the
    cores, its gaps are where the slots wait on them)."""
    by_worker: dict[str, list[tuple[float, float, str, str]]] = {}
    for line in lines:
        pid, kind, stage, t0, t1 = line.split()
        by_worker.setdefault(pid, []).append((float(t0), float(t1), kind, stage))
    out = {"compute": 0.0, "load": 0.0, "gap_same_model": 0.0, "gap_switch": 0.0, "head": 0.0, "tail": 0.0}
    by_stage: dict[str, float] = {}
    for events in by_worker.values():
        events.sort()
        out["head"] += events[0][0] - start
        out["tail"] += max(0.0, end - events[-1][1])
        for (a0, a1, ak, ast), (b0, b1, bk, bst) in zip(events, events[1:]):
            gap = max(0.0, b0 - a1)
            if ak == bk == "compute" and ast == bst:
                out["gap_same_model"] += gap
                by_stage[ast] = by_stage.get(ast, 0.0) + gap
            else:
                out["gap_switch"] += gap
        for t0, t1, kind, _ in events:
            out[kind] += t1 - t0
    return out, by_stage


def simulated_stages(table, scale: float, items: int, shards: int, start_s: float = 0.0):
    from richpref.tasks import ALL_STAGES

    out = []
    for st in ALL_STAGES:
        rate, load = table[st.name]
        per_item, load_s = scale / rate, scale * load
        stage = replace(st, compute=_sleeping(st.name, per_item, load_s, st.loads_model, items, start_s), version="sim",
                        fan_out=(lambda p: 1) if st.fan_out else None, config_view=None,
                        key_extra=lambda p: "", output=st.output,
                        load=_sleeping_load(st.name, load_s, start_s) if st.loads_model else None)
        if not st.reads:
            stage = replace(stage, count_shards=lambda p: shards, shard_keys=lambda p, n=items: lambda s: f"sim-{s}-{n}")
        out.append((stage, per_item if st.loads_model else 0.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--items", type=int, default=8, help="items per shard")
    ap.add_argument("--time-scale", type=float, default=0.5, help="multiplies every per-item and load time")
    ap.add_argument("--doctor-json", default=None, help="a `richpref doctor --json` file (default: built-in table)")
    ap.add_argument("--no-affinity", action="store_true",
                    help="no affinity plan: each shard runs where its input is, earlier stages first (as before)")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/results/schedule-<commit>.json")
    args = harness.child_args(ap, repeats=1).parse_args()
    if args.child:
        return child(args)
    b = harness.Bench("schedule", args.repeats)
    b.per_repeat(__file__, harness.child_argv(sys.argv[1:]), ["schedule"], echo=True)
    s = harness.summarize(b.runs)
    head = harness.headline("schedule.busy", s["schedule.busy"]["median"], "fraction", ">= 0.90",
                            note=f"{args.workers} simulated GPU workers, {args.shards} shards x {args.items} items, time "
                                 f"scale {args.time_scale}, per-item times from {args.doctor_json or 'the built-in doctor table (tiny, H200, bf16)'}; "
                                 f"also goal wall/ideal <= 1.15 (schedule.wall_over_ideal); the bound of every worker "
                                 f"loading every model once: schedule.bound_wall_over_ideal")
    head["met"] = head["met"] and s["schedule.wall_over_ideal"]["median"] <= 1.15
    if args.no_record:
        print(harness.format_summary(s))
    else:
        b.write(head)
    b.cleanup()


def child(args) -> None:
    from prefect import flow

    from richpref.models.runtime import resident
    from richpref.run.affinity import StageCost, read_start_s
    from richpref.schemas.config import load_profile

    table = _table(args.doctor_json)
    start = args.time_scale * read_start_s(args.doctor_json)  # once per worker, before its first model
    stages = simulated_stages(table, args.time_scale, args.items, args.shards, start)
    model_s = sum(per_item * args.items * args.shards for _, per_item in stages)
    load_s = start + sum(args.time_scale * table[s.name][1] for s, _ in stages if s.loads_model)
    bound = (model_s / args.workers + load_s) / (model_s / args.workers)
    # The plan weighs the times the simulated stages sleep: the table's, times --time-scale.
    costs = None if args.no_affinity else {k: StageCost(args.time_scale / rate, args.time_scale * load)
                                           for k, (rate, load) in table.items()}
    print(f"bound when every worker loads every model once ({load_s:.1f}s of loads each): "
          f"busy<={1 / bound:.3f} wall/ideal>={bound:.3f}", flush=True)
    # Any schedule: no model shard starts before the first model stage's model has loaded somewhere.
    first_load = start + next(args.time_scale * table[s.name][1] for s, _ in stages if s.loads_model)
    any_bound = (model_s / args.workers + first_load) / (model_s / args.workers)
    print(f"bound of any schedule (every worker idles while the first model stage loads, {first_load:.1f}s): "
          f"busy<={1 / any_bound:.3f} wall/ideal>={any_bound:.3f}", flush=True)
    rule = _rule_without_fixed_cost(stages, args, table)
    rule_wall = rule.wall_s + start  # every worker pays its start before its first load
    rule_busy = model_s / (args.workers * rule_wall)
    print(f"the dispatch rule simulated with the sleeps alone (no cost of a shard task, no loads ahead): "
          f"busy={rule_busy:.3f} wall/ideal={rule_wall / (model_s / args.workers):.3f} loads={rule.loads}", flush=True)
    live_sim_busy = _live_dispatch_simulated(stages, args, table, model_s, start)
    print(f"the live dispatch on a simulated cluster with the sleeps alone (tests/dispatch_sim.py: loads ahead, "
          f"no cost of a shard task): busy={live_sim_busy:.3f}", flush=True)
    data = tempfile.mkdtemp(prefix="richpref-schedule-")
    os.environ.setdefault("PREFECT_HOME", f"{data}/.prefect")
    trace = os.path.join(data, "sleeps.txt")
    # The flow's function is taken from this module imported by name (bench/ is on the workers' path):
    # Prefect sends the flow with every shard task, and a function of __main__ would go whole, with
    # the stages its closure holds (32 KB a shard, where curate's flow goes as its name).
    import schedule as importable

    importable.STATE.update(stages=stages, data=data, trace=trace, costs=costs, profile=load_profile("tiny"),
                            shards=args.shards, figures={})
    resident.release()
    from richpref.run.orchestration import configure_local_workers, local_cpu_cluster_kwargs

    configure_local_workers()
    env = {"OMP_NUM_THREADS": "1", "RICHPREF_TORCH_THREADS": "1", TRACE_ENV: trace}
    try:
        _run(flow(name="schedule-bench")(importable.bench_flow), local_cpu_cluster_kwargs(args.workers, env))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    figures = importable.STATE["figures"]
    wall, models = figures["wall"], figures["models"]
    ideal = model_s / args.workers
    print(f"{args.workers} simulated GPU workers, {args.shards} shards x {args.items} items, time scale "
          f"{args.time_scale}; per-item times from {args.doctor_json or 'the built-in doctor table (tiny, H200, bf16)'}"
          + (f"; each worker's start {start:.1f}s" if start else ""))
    print(f"model seconds {model_s:.1f}, ideal wall {ideal:.1f}s, wall {wall:.1f}s, model loads {models['loads']}")
    if figures["plan"]:
        p = figures["plan"]
        print(f"affinity plan as curate makes it (the table's times + a shard task's fixed cost): busy={p['busy']:.3f} wall/ideal={p['wall_s'] / ideal:.3f} "
              f"loads={p['loads']}; stages per worker: {p['stages_of']}")
    idle = figures["idle"]
    print("GPU-slot seconds over the workers: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items())
          + f" (of {args.workers * wall:.1f}); same-model gaps by stage: "
          + ", ".join(f"{k} {v:.1f}" for k, v in figures["gaps_by_stage"].items()), flush=True)
    cpu, runs = figures["cpu"], figures["shards"]
    print("CPU seconds over the flow's wall: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
          + f"; {sum(cpu.values()) / (os.cpu_count() * wall):.2f} of this machine's {os.cpu_count()} cores; "
          f"{1000 * sum(cpu.values()) / runs:.1f} ms a shard ({runs} shards, one task run each)", flush=True)
    busy = model_s / (args.workers * wall)
    print(f"busy={busy:.3f} wall/ideal={wall / ideal:.3f} swaps={models['swaps']}", flush=True)
    harness.print_child("RESULT ", {"schedule": {
        "wall_s": wall, "ideal_s": ideal, "model_s": model_s, "busy": busy, "wall_over_ideal": wall / ideal,
        "loads": models["loads"], "swaps": models["swaps"], "bound_wall_over_ideal": bound,
        "any_bound_busy": 1 / any_bound, "rule_busy": rule_busy, "start_s": start,
        "live_sim_busy": live_sim_busy,
        "shards_run": runs, "pipelined_s": figures["pipelined_s"],
        "cores_used": sum(cpu.values()) / (os.cpu_count() * wall),
        **{f"cpu_{k}_s": v for k, v in cpu.items()},
        **{f"slot_{k}_s": v for k, v in idle.items()},
        **({"plan_busy": figures["plan"]["busy"], "plan_loads": figures["plan"]["loads"]} if figures["plan"] else {})}})


def _rule_without_fixed_cost(stages, args, table):
    """The affinity plan of the simulated stages with their sleeps alone: the busy the dispatch rule
    reaches where a shard task costs nothing beyond its model time (curate plans 0.1 s more a shard)."""
    from richpref.run.pipeline import affinity_plan

    todo = [(i, st, s) for i, (st, _) in enumerate(stages) for s in range(args.shards)]
    seconds = {st.out: per_item * args.items for st, per_item in stages}
    load = {st.out: args.time_scale * table[st.name][1] for st, _ in stages}
    return affinity_plan(todo, seconds, load, args.workers, fixed_s=0.0)


def _live_dispatch_simulated(stages, args, table, model_s: float, start: float) -> float:
    """Busy of richpref/run/dispatch.py itself on the tests' simulated cluster (a clock, no Dask or
    Prefect) with the sleeps' times: what the live rule reaches where a shard task costs nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from dispatch_sim import Simulated, Stage

    sim_stages = [Stage(st.out, tuple(st.reads), st.loads_model) for st, _ in stages]
    todo = [(i, st, s) for i, st in enumerate(sim_stages) for s in range(args.shards)]
    seconds = {st.out: per_item * args.items for st, per_item in stages if st.loads_model}
    loads = {st.out: args.time_scale * table[st.name][1] for st, _ in stages if st.loads_model}
    sim = Simulated(todo, seconds, loads, [f"w{i}" for i in range(args.workers)], seconds, loads)
    sim.run()
    return model_s / (args.workers * (max(sim.ends.values()) + start))


STATE: dict = {}  # what the flow of a child process works on, set before it runs


def bench_flow() -> None:
    """The curate scheduling (pipelined pass, then the stage pass) over the simulated stages."""
    from richpref.run.orchestration import run_stage
    from richpref.run.pipeline import model_swaps, pipeline_pass
    from richpref.run.storage import RunStore

    st, figures = STATE, STATE["figures"]
    store = RunStore(st["data"], "sim")
    chain = tuple(s for s, _ in st["stages"])
    cpu0 = _cpu_by_process()
    t0, figures["start"] = time.perf_counter(), time.time()
    before = model_swaps()
    passed = pipeline_pass(chain, store, st["data"], "sim", st["profile"], st["costs"])
    figures["pipelined_s"] = time.perf_counter() - t0  # the rest of the wall: the stage pass, which finds all done
    manifests, failures = {}, []
    for stage in chain:
        manifests[stage.out], failed = run_stage(stage, manifests, store, st["data"], "sim", st["profile"],
                                                 passed.failed.get(stage.name))
        failures += failed
    figures["wall"] = time.perf_counter() - t0
    cpu1 = _cpu_by_process()
    figures["cpu"] = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    figures["shards"] = sum(len(m) for m in manifests.values())
    figures["idle"], figures["gaps_by_stage"] = idle_breakdown(Path(st["trace"]).read_text().splitlines(),
                                                               figures["start"], time.time())
    figures["models"] = model_swaps(since=before)
    figures["plan"] = passed.plan
    assert not failures, failures[:3]
    assert len(manifests["pairs"]) == st["shards"]


def _cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of this process (the flow, the Dask scheduler and client), of the Prefect
    server it started, and of the Dask workers (with the process they are forked from)."""
    import psutil

    def cpu(p):
        t = p.cpu_times()
        return t.user + t.system

    out = {"flow": cpu(psutil.Process()), "prefect_server": 0.0, "workers": 0.0}
    for child in psutil.Process().children(recursive=True):
        try:
            kind = "prefect_server" if "uvicorn" in " ".join(child.cmdline()) else "workers"
            out[kind] += cpu(child)
        except psutil.Error:
            pass
    return out


def _run(bench, cluster_kwargs) -> None:
    """The flow on a local cluster made as a curate run makes its own (richpref/run/orchestration.py):
    workers forked from one process that imported the stages, model libraries and pandas, the shard
    task preloaded."""
    from prefect_dask import DaskTaskRunner

    from richpref.ops.prefect_api import owned_prefect_api
    from richpref.run.early_cluster import WORKER_IMPORTS, EarlyCluster

    early = EarlyCluster(preimport=WORKER_IMPORTS)
    with owned_prefect_api():
        try:
            cluster = early.take(**cluster_kwargs)  # started before the clock, as curate's is while Prefect starts
            bench.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
        finally:
            early.close()


if __name__ == "__main__":
    main()
