"""Scores apart from decisions: the subject gate, weight-0 rewards, the relabel config's rules, and a
threshold or weight tuned on a finished run (no model call, the same result as a fresh run)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from richpref.schemas.config import RelabelConfig, RewardSpec, SubjectGateConfig
from richpref.storage import RunStore
from richpref.tasks import relabel as relabel_stage
from test_curate_flow import curate_run, work
from test_relabel_export import ChannelValue, solid


class Consistency:
    """A pair scorer: 1 - |red difference| / 255 for the edit, 1 for the original."""

    model_id, pairwise = "red-consistency", True

    def score_pairs(self, originals, edits, prompts, *, batch_size=8):
        red = lambda im: np.asarray(im, dtype=np.float64)[..., 0].mean()  # noqa: E731
        return np.array([[1.0, 1 - abs(red(a) - red(b)) / 255] for a, b in zip(originals, edits)])


def test_the_subject_gate_rejects_edits_that_changed_too_much_and_never_votes():
    gate = SubjectGateConfig(model="-", on_cutout=False, min_consistency=0.9)
    cfg = RelabelConfig(rewards={"green": RewardSpec(kind="clip", model="-")}, subject_gate=gate)
    # a: red 10 -> 20 (consistency 0.96), green up; b: red 10 -> 200 (0.25), green up; c: red 50 -> 50, green down
    images = {"original": [solid(10, 10), solid(10, 10), solid(50, 40)], "edited": [solid(20, 30), solid(200, 30), solid(50, 0)]}
    scorers = {"green": ChannelValue(1), "subject_consistency": Consistency()}
    a, b, c = relabel_stage.relabel_rows(["a", "b", "c"], ["p"] * 3, images, cfg, scorers.__getitem__).to_pylist()
    assert b["status"] == "rejected" and b["reason"].startswith("subject_changed: DINOv2 patch consistency 0.2")
    assert (a["status"], a["chosen"], c["status"], c["chosen"]) == ("ok", 1, "ok", 0)
    # the consistency is recorded, not combined: the composite is green's z alone (over a's and c's images)
    assert a["subject_consistency"] == pytest.approx(1 - 10 / 255)
    z = (np.array([10.0, 30, 40, 0]) - 20) / np.std([10.0, 30, 40, 0])
    assert (a["composite_0"], a["composite_1"]) == (pytest.approx(z[0]), pytest.approx(z[1]))


def test_a_weight_0_reward_is_not_loaded_unless_reported():
    images = {"original": [solid(10, 5), solid(20, 10)], "edited": [solid(30, 0), solid(20, 30)]}
    both = {"red": RewardSpec(kind="clip", model="-"), "green": RewardSpec(kind="clip", model="-", weight=0.0)}
    only_red = {"red": ChannelValue(0)}  # asking for green would raise KeyError
    out = relabel_stage.relabel_rows(["a", "b"], ["p"] * 2, images, RelabelConfig(rewards=both), only_red.__getitem__)
    assert "green_0" not in out.schema.names and out.column("status").to_pylist() == ["ok", "rejected"]
    reported = RelabelConfig(rewards=both, report_only=["green"])
    out = relabel_stage.relabel_rows(["a", "b"], ["p"] * 2, images, reported, {**only_red, "green": ChannelValue(1)}.__getitem__)
    a = out.to_pylist()[0]
    assert (a["green_0"], a["green_1"]) == (5, 0) and a["chosen"] == 1  # green fell, red rose: red alone votes


def test_relabel_config_rules():
    ok = RewardSpec(kind="clip", model="-")
    with pytest.raises(ValidationError, match="subject_gate"):
        RelabelConfig(rewards={"dino": RewardSpec(kind="dino_patch", model="-")})
    with pytest.raises(ValidationError, match="not in relabel.rewards"):
        RelabelConfig(rewards={"clip": ok}, report_only=["hps"])
    with pytest.raises(ValidationError, match="non-zero weight"):
        RelabelConfig(rewards={"clip": ok}, report_only=["clip"])
    with pytest.raises(ValidationError, match="every relabel reward has weight 0"):
        RelabelConfig(rewards={"clip": ok.model_copy(update={"weight": 0.0})})
    default = RelabelConfig()
    assert default.voting() == ["imagereward"] and default.dtype == "float32"  # as RPO and the reference scorer


def test_model_stages_key_on_what_the_models_measure_not_on_thresholds():
    from types import SimpleNamespace

    from richpref.runner import content_key
    from richpref.schemas.config import load_profile
    from richpref.tasks import STAGES

    def keys(*overrides):
        profile = load_profile("tiny", list(overrides))
        inputs = {r: SimpleNamespace(key="same input") for s in STAGES.values() for r in s.reads}
        return {name: content_key(STAGES[name], profile, 0, inputs) for name in ("check", "filter", "score", "relabel")}

    base = keys()
    decisions = ["filter.min_executed=0.1", "filter.executed_reduce=min", "filter.min_attributes_kept=0.9",
                 "relabel.min_margin=0.5", "relabel.rewards.imagereward.weight=3", "relabel.pairing=best_vs_worst",
                 "relabel.standardize=item", "relabel.subject_gate.min_consistency=0.9"]
    for setting in decisions:
        k = keys(setting)
        assert (k["check"], k["score"]) == (base["check"], base["score"]), setting
        assert k["filter"] != base["filter"] or k["relabel"] != base["relabel"], setting
    for setting in ("filter.max_attributes=3", "filter.min_attributes_kept=0"):  # what the VLM is asked
        assert keys(setting)["check"] != base["check"], setting
    for setting in ("relabel.dtype=float16", "relabel.subject_gate.patch=14", "relabel.report_only=[clip]"):
        assert keys(setting)["score"] != base["score"], setting


TUNED = ["filter.min_executed=0.521", "relabel.min_margin=0.5", "relabel.rewards.imagereward.weight=2.0"]


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


def test_relabel_dataset_follows_the_reward_and_drops_near_ties_only_when_asked():
    from richpref.relabel_dataset import dataset_relabel_config

    cfg = RelabelConfig(rewards={"ir": RewardSpec(kind="clip", model="-"), "clip": RewardSpec(kind="clip", model="-", weight=0.0)},
                        min_margin=0.3, subject_gate=SubjectGateConfig(model="-", min_consistency=0.5))
    one = dataset_relabel_config(cfg, "clip")  # a weight-0 reward picked by --reward is the one vote
    assert one.scored() == ["clip"] and one.rewards["clip"].weight == 1.0
    assert one.min_margin == 0.0 and one.subject_gate is None  # the reward's order; nothing was edited
    assert dataset_relabel_config(cfg, "clip", drop_near_ties=True).min_margin == 0.3
