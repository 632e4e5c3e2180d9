"""The shard runner answers "is this shard done?" from manifests alone, never from a shard's bytes."""
from __future__ import annotations

import shutil
from pathlib import Path

from richpref.run.runner import manifest_path, stage_manifests
from richpref.run.storage import RunStore
from richpref.tasks import ALL_STAGES, OUTPUTS
from test_curate_flow import OVERRIDES, curate_run, work


def _copy(runs_dir, run: str) -> RunStore:
    store = RunStore(str(runs_dir), run)
    shutil.copytree(RunStore(str(runs_dir), "ref").root, store.root)
    store.fs.rm(store.root + "/_log", recursive=True)
    return store


def test_plan_and_status_read_manifests_not_shard_bytes(finished_run, runs_dir, tiny_models):
    from richpref.views.inspect import status
    from richpref.run.plan import plan_run
    from richpref.schemas.config import load_profile

    store = _copy(runs_dir, "unread")
    for out in OUTPUTS:  # every shard's bytes made unreadable: only a reader of bytes would notice
        for s in store.shards(out):
            Path(store.shard_path(out, s)).write_bytes(b"not parquet")
    profile = load_profile("tiny", OVERRIDES, str(tiny_models))
    plan = plan_run(profile, str(runs_dir), "unread")
    assert plan.up_to_date, plan.format()
    assert [s.stage for s in plan.stages] == [s.name for s in ALL_STAGES]
    assert all(st["done"] == 3 and not st["missing"] for st in status(str(runs_dir), "unread")["stages"])

    # A shard without its manifest is not done (killed after its file, before its manifest).
    store.fs.rm(manifest_path(store, "edit", 2))
    plan = {s.stage: s for s in plan_run(profile, str(runs_dir), "unread").stages}
    assert plan["edit"].todo == [2] and plan["instruct"].todo == []
    assert 2 not in stage_manifests(store, "edit")
    # edit's shard 2 is redone for the key it had, so cutout's shard 2 keeps its key: done, not blocked
    assert plan["cutout"].done == [0, 1, 2] and not plan["cutout"].blocked
    st = {s["stage"]: s for s in status(str(runs_dir), "unread")["stages"]}  # status asks the plan too
    assert st["edit"]["missing"] == [2] and st["cutout"]["missing"] == [] and st["instruct"]["missing"] == []


def test_views_read_committed_shards_only(finished_run, runs_dir):
    from richpref.views.inspect import connect

    store = _copy(runs_dir, "uncommitted")
    rows = connect(str(runs_dir), "uncommitted")[0].execute('select count(*) from "edit"').fetchone()[0]
    store.fs.rm(manifest_path(store, "edit", 2))  # its Parquet file stays: not committed, not read
    left = connect(str(runs_dir), "uncommitted")[0].execute('select count(*) from "edit"').fetchone()[0]
    assert left == rows - stage_manifests(RunStore(str(runs_dir), "ref"), "edit")[2].rows


def test_a_shard_whose_manifest_is_missing_or_damaged_is_computed_again_and_only_it(finished_run, runs_dir, tiny_models):
    store = _copy(runs_dir, "nomanifest")
    store.fs.rm(manifest_path(store, "filter", 1))
    store.fs.pipe_file(manifest_path(store, "critique", 0), b'{"shard": 0, "uri": "cut off')  # damaged: not committed
    curate_run(runs_dir, "nomanifest", tiny_models)
    # Later shards are keyed on the filter shard's key, not its bytes: they stay done.
    assert sorted(work(runs_dir, "nomanifest")) == [("critique", 0), ("filter", 1)]
    _assert_cpu_recorded(store.read_log("work.jsonl")[0])
    ref = stage_manifests(RunStore(str(runs_dir), "ref"), "pairs")
    again = stage_manifests(store, "pairs")
    assert {s: m.sha256 for s, m in again.items()} == {s: m.sha256 for s, m in ref.items()}


def _assert_cpu_recorded(record: dict) -> None:
    """The work log says where a shard ran and on how many threads (bench/reliability.py workers adds
    up its CPU seconds: figures that load does not inflate as it does walls)."""
    import os

    import torch

    assert record["pid"] == os.getpid() and record["torch_threads"] == torch.get_num_threads()
    assert 0 <= record["cpu_s"] < 60


def _worker_env(dask_worker) -> dict:
    import os

    return {**{k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "RICHPREF_TORCH_THREADS", "OMP_NUM_THREADS")},
            "profiling": "profile" in dask_worker.periodic_callbacks}


def test_local_cpu_workers_get_their_share_of_cores_glibcs_own_malloc_thresholds_and_no_profiler():
    import os

    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 made every worker's model buffers mmap'd afresh.
    # Dask's profiler sampled every worker thread for a dashboard these clusters do not have.
    from distributed import Client, LocalCluster

    from richpref.run.orchestration import task_runner

    runner = task_runner(workers=2)
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        envs = list(client.run(_worker_env).values())
    assert len(envs) == 2
    for env in envs:
        assert env["MALLOC_TRIM_THRESHOLD_"] is None
        assert env["profiling"] is False
        share = os.environ.get("RICHPREF_TORCH_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
        assert env["RICHPREF_TORCH_THREADS"] == env["OMP_NUM_THREADS"] == share


def test_a_shard_that_kept_no_row_loads_with_datasets_beside_one_that_did(tmp_path):
    # The card's `load_dataset("parquet", data_files="part-*.parquet")` line failed on a run with an
    # empty shard: a 0-row row group is refused by `datasets`.
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from richpref.run.runner import parquet_bytes

    full = pa.table({"caption": ["a", "b"], "label_0": [1, 0]})
    (tmp_path / "part-00000.parquet").write_bytes(parquet_bytes(full))
    (tmp_path / "part-00001.parquet").write_bytes(parquet_bytes(full.slice(0, 0)))
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "part-*.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds["caption"] == ["a", "b"]
    # A non-empty shard's bytes are those of a plain write: runs made before stay byte-identical.
    plain = pa.BufferOutputStream()
    pq.write_table(full, plain, compression="zstd")
    assert parquet_bytes(full) == plain.getvalue().to_pybytes()


def test_last_run_is_run_json_or_nothing_before_a_first_flow_or_while_it_is_written(tmp_path):
    from richpref.run.storage import RunStore

    store = RunStore(str(tmp_path), "r")
    assert store.last_run() == {}  # no run yet
    store.write_text("run.json", '{"run": "r", "state": "completed"}')
    assert store.last_run() == {"run": "r", "state": "completed"}
    store.write_text("run.json", '{"run": "r", "sta')  # cut short
    assert store.last_run() == {}


def test_a_last_flows_state_covers_the_stages_it_recorded():
    from richpref.run.run_state import covers

    names = ["source", "sample", "critique", "instruct", "edit"]
    assert covers("completed", None, names) and covers("completed", "sample", names)
    assert covers("stopped after critique", "critique", names) and covers("stopped after critique", "sample", names)
    assert not covers("stopped after critique", "instruct", names)
    assert not covers("stopped after critique", None, names)  # a whole run: more than was recorded
    assert covers("stopped after critique", "critique") and not covers("stopped after critique", "sample")
    for state in ("running", "failed", None, "stopped after no-such-stage"):
        assert not covers(state, "sample", names), state


def test_keying_a_stages_shards_hashes_what_they_share_once_and_gives_the_keys_of_before(tiny_models):
    """A plan of 6,250 shards spent 7 of its 9 s hashing each stage's config (and the export's whole
    profile) again for every shard."""
    import hashlib
    import json
    from dataclasses import replace

    from richpref.run.runner import stage_keyer
    from richpref.schemas.config import config_hash, load_profile
    from richpref.tasks import STAGES

    profile = load_profile("tiny", models_root=str(tiny_models))
    for stage in STAGES.values():
        calls = []
        counted = replace(stage, key_extra=lambda p, _extra=stage.key_extra: calls.append(1) or _extra(p))
        key_of = stage_keyer(counted, profile)
        keys = [key_of(s, {r: f"{r}-{s}" for r in stage.reads}) for s in range(3)]
        assert len(calls) == 1, stage.name
        section = getattr(profile, stage.section)
        for s, key in enumerate(keys):  # the payload keys were made of: runs made before keep their keys
            payload = {"stage": stage.name, "version": stage.version, "extra": stage.key_extra(profile), "shard": s,
                       "config": config_hash(stage.config_view(section) if stage.config_view else section),
                       "inputs": {r: f"{r}-{s}" for r in stage.reads}}
            assert key == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(), stage.name
