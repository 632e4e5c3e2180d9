"""The pipelined pass on a real Dask cluster with the affinity plan: fewer model swaps than without it,
and every shard computed once. Model calls are sleeps; the shards are real Parquet files."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace


from richpref.run.affinity import StageCost

SHARDS, WORKERS = 8, 4
SECONDS = {"sample": 0.02, "critique": 0.25}  # per shard
LOADS = {"sample": 0.6, "critique": 0.05}
_lock = threading.Lock()
_held: dict[str, str] = {}  # worker name -> the stage whose model it holds
_log: list[tuple[str, str, int]] = []  # (worker, stage, shard) per computation
_swaps = Counter()


def _sleeping(name: str, module: str = __name__):
    def compute(inputs, profile):
        import importlib

        import pyarrow as pa
        from distributed import get_worker

        me = importlib.import_module(module)  # its state, not a copy pickled with the function
        SECONDS, _lock, _log = me.SECONDS, me._lock, me._log
        ids = [f"i{inputs.shard:05d}-{k}" for k in range(2)] if inputs.rows is None else inputs.rows.column("item_id").to_pylist()
        if name in SECONDS:  # a model stage: a load when the worker held another model
            _hold(me, name)
            with _lock:
                _log.append((get_worker().name, name, inputs.shard))
            time.sleep(SECONDS[name])
        return pa.table({"item_id": ids, "status": ["ok"] * len(ids), "reason": pa.nulls(len(ids), pa.string())})

    return compute


def _hold(me, name: str) -> None:
    """This worker now holds `name`'s model: a load (and a swap, after another model) when it did not."""
    from distributed import get_worker

    worker = get_worker().name
    with me._lock:
        switched = me._held.get(worker) != name
        me._swaps[worker] += switched and worker in me._held
        me._held[worker] = name
    time.sleep(me.LOADS[name] if switched else 0)


def _loading(name: str, module: str = __name__):
    """A stage's `load`, as the live dispatch calls it ahead on an idle worker: the worker then holds it."""
    def load(profile):
        import importlib

        _hold(importlib.import_module(module), name)
        return [name]

    return load


def _stages():
    from richpref.tasks import ALL_STAGES

    by = {s.name: s for s in ALL_STAGES}
    out = []
    for name in ("source", "sample", "critique"):
        st = replace(by[name], compute=_sleeping(name), version="sim", config_view=None, key_extra=lambda p: "",
                     load=_loading(name) if by[name].load is not None else None)
        if not st.reads:
            st = replace(st, count_shards=lambda p: SHARDS, shard_keys=lambda p: lambda s: f"sim-{s}")
        out.append(st)
    return tuple(out)


def _run(tmp_path, costs) -> tuple[int, list]:
    from distributed import LocalCluster
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from richpref.run.pipeline import pipeline_pass
    from richpref.run.runner import stage_manifests
    from richpref.run.storage import RunStore
    from richpref.schemas.config import load_profile

    _held.clear(), _log.clear(), _swaps.clear()
    profile = load_profile("tiny")
    per_item = {k: v / profile.source.shard_size for k, v in SECONDS.items()}
    table = None if costs is None else {k: StageCost(per_item[k], LOADS[k]) for k in SECONDS}
    result = {}

    @flow(name="affinity-test")
    def passes():
        result["pass"] = pipeline_pass(_stages(), RunStore(str(tmp_path), "sim"), str(tmp_path), "sim", profile, table)

    with LocalCluster(n_workers=WORKERS, threads_per_worker=2, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster:
        passes.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
    assert result["pass"].failed == {}
    assert sorted(stage_manifests(RunStore(str(tmp_path), "sim"), "critique")) == list(range(SHARDS))
    return sum(_swaps.values()), list(_log), result["pass"].plan


def test_with_the_plan_a_worker_keeps_its_model_and_every_shard_runs_once(tmp_path, prefect_harness):
    swaps_without, log_without, no_plan = _run(tmp_path / "without", None)
    swaps_with, log_with, plan = _run(tmp_path / "with", "table")
    for log in (log_without, log_with):  # no shard lost or computed twice
        assert Counter((st, s) for _, st, s in log) == Counter({(st, s): 1 for st in SECONDS for s in range(SHARDS)})
    assert no_plan is None and plan["workers"] == WORKERS
    assert sum(plan["dispatch"]["shards"].values()) == len(SECONDS) * SHARDS  # what the live dispatch did
    # Without the plan each critique shard runs where its sample shard ran: every worker loads both.
    # With it, sample (a long load, little work) runs on one worker, critique on the others.
    assert swaps_with < swaps_without, (log_with, log_without)
    assert len({w for w, st, _ in log_with if st == "sample"}) == 1


def test_a_submitted_shard_task_gets_its_stage_and_profile_without_prefect_walking_them(tmp_path, prefect_harness,
                                                                                         monkeypatch):
    import prefect.utilities.engine as engine
    from prefect import flow

    from richpref.run.runner import ShardManifest, content_key
    from richpref.run.shard_task import Unwalked, shard_run_name, submit_shard
    from richpref.schemas.config import Profile, load_profile

    visited, walk = [], engine.visit_collection

    def spying(expr, visit_fn, *args, **kwargs):  # every element Prefect looks at for futures
        def seen(x, *ctx):
            visited.append(type(x))
            return visit_fn(x, *ctx)
        return walk(expr, seen, *args, **kwargs)

    monkeypatch.setattr(engine, "visit_collection", spying)
    profile, source = load_profile("tiny"), _stages()[0]

    @flow(name="quoted-test")
    def one():
        return submit_shard(source, 0, {}, str(tmp_path), "sim", profile, content_key(source, profile, 0, {})).result()

    assert isinstance(one(), ShardManifest)
    assert visited and Profile not in visited and type(source) not in visited
    assert shard_run_name({"stage": Unwalked(source), "shard": 3}) == "source-00003"


def _failing(shard: int):
    def compute(inputs, profile):
        if inputs.shard == shard:
            raise ValueError(f"no good shard {shard}")
        return _sleeping("critique")(inputs, profile)

    return compute


def test_a_shard_that_fails_in_the_pipelined_pass_is_reported_once_with_its_error(tmp_path, prefect_harness):
    from distributed import LocalCluster
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from richpref.run.pipeline import pipeline_pass
    from richpref.run.runner import stage_manifests
    from richpref.run.storage import RunStore
    from richpref.schemas.config import load_profile

    source, sample, critique = _stages()
    stages = (source, sample, replace(critique, compute=_failing(3)))
    profile, store, result = load_profile("tiny"), RunStore(str(tmp_path), "sim"), {}
    table = {k: StageCost(0.001, 0.0) for k in SECONDS}

    @flow(name="failing-test")
    def passes():
        result["pass"] = pipeline_pass(stages, store, str(tmp_path), "sim", profile, table)

    with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster:
        passes.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
    failed = result["pass"].failed
    assert list(failed) == ["critique"] and list(failed["critique"]) == [3], failed
    assert "no good shard 3" in failed["critique"][3]
    assert sorted(stage_manifests(store, "critique")) == [s for s in range(SHARDS) if s != 3]


STARTS: list[tuple[str, int, float]] = []


def _timed(name: str, seconds: float):
    def compute(inputs, profile):
        import importlib

        import pyarrow as pa

        importlib.import_module(__name__).STARTS.append((name, inputs.shard, time.monotonic()))
        time.sleep(seconds)
        ids = [f"i{inputs.shard:05d}-0"] if inputs.rows is None else inputs.rows.column("item_id").to_pylist()
        return pa.table({"item_id": ids, "status": ["ok"] * len(ids), "reason": pa.nulls(len(ids), pa.string())})

    return compute


def test_a_model_shard_given_to_a_worker_starts_before_the_model_free_shards_queued_there(tmp_path, prefect_harness):
    from distributed import LocalCluster
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from richpref.run.pipeline import pipeline_pass
    from richpref.run.storage import RunStore
    from richpref.schemas.config import load_profile
    from richpref.tasks import ALL_STAGES

    source, sample, _ = _stages()
    shards = 24
    side = next(s for s in ALL_STAGES if s.name == "filter")  # model-free
    stages = (replace(source, compute=_timed("source", 0.0), count_shards=lambda p: shards),
              replace(side, reads=("source",), compute=_timed("side", 0.1), version="sim", config_view=None,
                      key_extra=lambda p: ""),
              replace(sample, compute=_timed("sample", 0.0), load=None))
    profile, store = load_profile("tiny"), RunStore(str(tmp_path), "sim")
    STARTS.clear()

    @flow(name="priority-test")
    def passes():
        pipeline_pass(stages, store, str(tmp_path), "sim", profile, {"sample": StageCost(0.001, 0.0)})

    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster:
        passes.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
    first_sample = min(t for name, _, t in STARTS if name == "sample")
    late = [s for name, s, t in STARTS if name == "side" and t > first_sample]
    # The model-free shards of `side` (0.1 s each, 3 threads) queue on the worker as their inputs are
    # done; a model shard given to the worker meanwhile goes before them, not after them all.
    assert len(late) >= shards // 2, [(n, s, round(t - STARTS[0][2], 3)) for n, s, t in sorted(STARTS, key=lambda x: x[2])]
