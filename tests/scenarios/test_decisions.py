"""Scores apart from decisions, across the stages: the model stages (check, score) key on what the
models measure, not on thresholds, and a threshold or weight tuned on a finished run calls no model
and equals a fresh run. The subject gate and the relabel config's rules: tests/tasks/test_relabel.py;
weight-0 rewards: tests/tasks/test_score.py; relabel-dataset's settings: tests/recipes/test_relabel_dataset.py."""
from __future__ import annotations

import shutil

from richpref.run.storage import RunStore
from test_curate_flow import curate_run, work


def test_model_stages_key_on_what_the_models_measure_not_on_thresholds():
    from types import SimpleNamespace

    from richpref.run.runner import content_key
    from richpref.schemas.config import load_profile
    from richpref.tasks import STAGES

    def keys(*overrides):
        profile = load_profile("tiny", list(overrides))
        inputs = {r: SimpleNamespace(key="same input") for s in STAGES.values() for r in s.reads}
        return {name: content_key(STAGES[name], profile, 0, inputs) for name in ("check", "filter", "score", "relabel")}

    base = keys()
    decisions = ["filter.min_executed=0.1", "filter.executed_reduce=min", "filter.min_attributes_kept=0.9",
                 "relabel.min_margin=0.5", "relabel.weights.imagereward=3", "relabel.pairing=best_vs_worst",
                 "relabel.standardize=item", "relabel.min_consistency=0.9", "relabel.weights.clip=1"]
    for setting in decisions:
        k = keys(setting)
        assert (k["check"], k["score"]) == (base["check"], base["score"]), setting
        assert k["filter"] != base["filter"] or k["relabel"] != base["relabel"], setting
    for setting in ("check.max_attributes=3", "check.attributes=false"):  # what the VLM is asked
        assert keys(setting)["check"] != base["check"], setting
    for setting in ("score.dtype=float16", "score.subject_gate.patch=14", "score.rewards.clip.model=other"):
        assert keys(setting)["score"] != base["score"], setting


TUNED = ["filter.min_executed=0.521", "relabel.min_margin=0.5", "relabel.weights.imagereward=2.0"]


def test_tuning_thresholds_and_weights_calls_no_model_and_equals_a_fresh_run(finished_run, runs_dir, tiny_models, tmp_path):
    ref = RunStore(str(runs_dir), "ref")
    tuned, fresh = RunStore(str(runs_dir), "tuned"), RunStore(str(runs_dir), "fresh")
    for store in (tuned, fresh):
        shutil.copytree(ref.root, store.root)
        store.fs.rm(store.root + "/_log", recursive=True)
    # No model can load here (an empty models root): the run must get by on the stored answers and scores.
    curate_run(runs_dir, "tuned", tmp_path / "no-models", extra=TUNED)
    assert {name for name, _ in work(runs_dir, "tuned")} == {"filter", "relabel", "export"}
    # The fresh run computes every stage the settings belong to from nothing: the VLM's and the rewards' too.
    for out in ("check", "filter", "score", "relabel", "pairs"):
        fresh.fs.rm(f"{fresh.root}/{out}", recursive=True)
    curate_run(runs_dir, "fresh", tiny_models, extra=TUNED)
    assert {"check", "score"} <= {name for name, _ in work(runs_dir, "fresh")}
    for out in ("filter", "relabel", "pairs"):
        assert tuned.read_stage(out).to_pylist() == fresh.read_stage(out).to_pylist(), out
    before, after = ref.read_stage("filter").to_pylist(), tuned.read_stage("filter").to_pylist()
    assert [r["verdict"] for r in before] != [r["verdict"] for r in after]  # the settings did change the outcome
    assert ref.read_stage("relabel").to_pylist() != tuned.read_stage("relabel").to_pylist()
