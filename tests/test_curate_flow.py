"""The curate flow end to end on the tiny profile: counts, format, caching, resume, config changes."""
from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from richpref.storage import RunStore
from richpref.tasks import OUTPUTS, PIPELINE

N_ITEMS, SHARD = 12, 4
OVERRIDES = ["source.limit=12", "source.shard_size=4"]


def curate_run(data_dir, run, models_root, extra=(), faults=None, monkeypatch=None):
    from richpref.flows.curate import curate

    if faults and monkeypatch:
        monkeypatch.setenv("RICHPREF_FAULTS", faults)
    try:
        return curate(profile="tiny", run=run, data_dir=str(data_dir), overrides=[*OVERRIDES, *extra],
                      models_root=str(models_root))
    finally:
        if monkeypatch:
            monkeypatch.delenv("RICHPREF_FAULTS", raising=False)


def work(data_dir, run):
    return [(r["stage"], r["shard"]) for r in RunStore(str(data_dir), run).read_log("work.jsonl")]


def pair_files(data_dir, run) -> dict[str, str]:
    store = RunStore(str(data_dir), run)
    return {f"part-{s:05d}": hashlib.sha256(open(store.shard_path("pairs", s), "rb").read()).hexdigest()
            for s in store.shards("pairs")}


def test_every_row_is_kept_or_rejected_at_every_stage(finished_run, runs_dir):
    store = RunStore(str(runs_dir), "ref")
    assert len(store.shards("source")) == N_ITEMS // SHARD
    src = store.read_stage("source").to_pylist()
    assert len(src) == N_ITEMS
    for stage in PIPELINE:
        driver = stage.reads[0]
        for s in store.shards(driver):
            inp = store.read_shard(driver, s)
            out = store.read_shard(stage.out, s)
            kept_in = sorted(r["item_id"] for r in inp.to_pylist() if r.get("status", "ok") == "ok")
            assert sorted(out.column("item_id").to_pylist()) == kept_in, (stage.name, s)
            if "status" in out.schema.names:
                for r in out.to_pylist():
                    assert r["status"] in ("ok", "rejected")
                    assert (r["status"] == "ok") == (r["reason"] is None), r


def test_pairs_are_pickapic_format_and_load_with_datasets(finished_run, runs_dir):
    import datasets

    store = RunStore(str(runs_dir), "ref")
    pairs = store.read_stage("pairs")
    assert pairs.num_rows > 0, "the tiny run should export some pairs"
    assert set(pairs.column("label_0").to_pylist()) <= {0, 1}
    relabel = {r["item_id"]: r for r in store.read_stage("relabel").to_pylist()}
    for r in pairs.to_pylist():
        for col in ("jpg_0", "jpg_1"):
            Image.open(io.BytesIO(r[col])).convert("RGB")
        assert r["label_0"] == (1 if relabel[r["item_id"]]["flipped"] else 0)
    ds = datasets.load_dataset("parquet", data_files=str(store.stage_dir("pairs")) + "/*.parquet", split="train")
    assert ds.num_rows == pairs.num_rows
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(ds.column_names)
    Image.open(io.BytesIO(ds[0]["jpg_0"]))


def test_each_shard_was_computed_once(finished_run, runs_dir):
    done = work(runs_dir, "ref")
    expected = [("source", -1)] + [(s.name, k) for s in PIPELINE for k in range(N_ITEMS // SHARD)]
    assert sorted(done) == sorted(expected)


def test_second_run_executes_no_stage_work(finished_run, runs_dir, tiny_models):
    before = work(runs_dir, "ref")
    files = pair_files(runs_dir, "ref")
    again = curate_run(runs_dir, "ref", tiny_models)
    assert work(runs_dir, "ref") == before
    assert pair_files(runs_dir, "ref") == files
    assert again["stages"] == finished_run["stages"]


def test_resume_after_a_failed_shard_redoes_only_that_shard(finished_run, runs_dir, tiny_models, monkeypatch):
    from richpref.flows.curate import CurateFailed

    with pytest.raises(CurateFailed, match=r"edit/part-00001"):
        curate_run(runs_dir, "crash", tiny_models, faults="edit:1:raise", monkeypatch=monkeypatch)
    first = work(runs_dir, "crash")
    assert ("edit", 1) not in first
    assert ("export", 0) in first and ("export", 2) in first  # the other shards went all the way
    curate_run(runs_dir, "crash", tiny_models)
    redone = work(runs_dir, "crash")[len(first):]
    downstream = [s.name for s in PIPELINE[PIPELINE.index(next(p for p in PIPELINE if p.name == "edit")):]]
    assert sorted(redone) == sorted((name, 1) for name in downstream)
    assert pair_files(runs_dir, "crash") == pair_files(runs_dir, "ref")


def test_config_change_recomputes_that_stage_and_later_only(finished_run, runs_dir, tiny_models):
    import shutil

    store = RunStore(str(runs_dir), "ref")
    shutil.copytree(store.root, RunStore(str(runs_dir), "cfg").root)
    RunStore(str(runs_dir), "cfg").fs.rm(RunStore(str(runs_dir), "cfg").root + "/_log", recursive=True)
    curate_run(runs_dir, "cfg", tiny_models, extra=["instruct.max_new_tokens=20"])
    stages = {name for name, _ in work(runs_dir, "cfg")}
    assert "source" not in stages and "sample" not in stages and "critique" not in stages
    assert "instruct" in stages and "export" in stages


def test_a_deleted_output_shard_is_recomputed_not_served_from_cache(finished_run, runs_dir, tiny_models):
    store = RunStore(str(runs_dir), "ref")
    before = pair_files(runs_dir, "ref")
    store.fs.rm(store.shard_path("critique", 2))
    n = len(work(runs_dir, "ref"))
    curate_run(runs_dir, "ref", tiny_models)
    assert ("critique", 2) in work(runs_dir, "ref")[n:]
    assert pair_files(runs_dir, "ref") == before
