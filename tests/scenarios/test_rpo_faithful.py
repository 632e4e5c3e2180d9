"""The `rpo-faithful` profiles: RPO's pipeline and nothing else. Their settings turn off everything
`sd15-paper` adds; on the tiny models every edit that reaches relabel leaves as a pair, flipped
(label_0 = 1) exactly when ImageReward scores the edit lower; the card names the profile."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from relabel_helpers import run_stage, write_upstream
from richpref.schemas.config import load_profile
from richpref.run.storage import RunStore
from richpref.tasks import export as export_stage
from richpref.tasks import relabel as relabel_stage
from richpref.tasks import score as score_stage
from richpref.tasks.filter import decide_rows


@pytest.mark.parametrize("name", ["rpo-faithful", "tiny-rpo-faithful"])
def test_rpo_faithful_turns_off_what_sd15_paper_adds(name):
    p = load_profile(name)
    assert p.description and "RPO's pipeline and nothing else" in p.description
    assert p.critique.reject_no_issues is False  # no early exit
    ins = p.instruct
    assert (ins.drop_contradictions, ins.drop_vague, ins.drop_truncated) == (False, False, False)
    assert ins.min_grounding == ins.min_visible == ins.min_faithful == 0
    assert p.edit.min_pixel_change == 0
    f = p.filter
    assert f.min_executed == f.min_no_stray == f.min_subject_kept == f.min_attributes_kept == 0  # no pair filter
    r = p.relabel
    assert r.min_margin == 0 and p.score.subject_gate is None and p.score.scored() == ["imagereward"]
    assert r.weights == {"imagereward": 1.0}  # ImageReward alone votes
    paper = load_profile("sd15-paper" if name == "rpo-faithful" else "tiny")
    assert "plus" in paper.description and paper.description != p.description
    if name == "rpo-faithful":  # the same models as sd15-paper
        for section in ("source", "sample"):
            assert getattr(p, section) == getattr(paper, section)
        assert (p.critique.model, p.instruct.model, p.edit.model, p.edit.controlnet) == \
            (paper.critique.model, paper.instruct.model, paper.edit.model, paper.edit.controlnet)


def test_rpo_faithful_filter_keeps_every_pair_whatever_the_answers():
    rows = [{"item_id": f"i{k}", "status": "ok", "reason": None, "candidate": 0, "p_executed_each": [p],
             "p_no_stray": p, "p_subject_kept": p, "template": "filter_v2", "model_id": "vlm", "attributes": None}
            for k, p in enumerate([0.0, 0.01, 0.5, 1.0])]
    checks = pa.Table.from_pylist(rows)
    faithful = decide_rows(checks, [["fix it"]] * 4, load_profile("tiny-rpo-faithful").filter)
    assert faithful.column("status").to_pylist() == ["ok"] * 4
    paper_filter = load_profile("sd15-paper").filter.model_copy(update={"min_attributes_kept": 0})  # no lists here
    paper = decide_rows(checks, [["fix it"]] * 4, paper_filter)
    assert paper.column("status").to_pylist() == ["rejected", "rejected", "ok", "ok"]


def test_every_edit_that_reaches_relabel_leaves_as_a_pair_flipped_when_it_scores_lower(tiny_models, tmp_path, capsys):
    from richpref.cli.commands import main

    store = RunStore(str(tmp_path), "faithful")
    profile = load_profile("tiny-rpo-faithful", models_root=str(tiny_models))
    store.write_text("profile.json", profile.model_dump_json(indent=2))
    manifests = write_upstream(store)  # the mini run's upstream shards: 6 items, the filter keeps 5
    for stage in (score_stage.STAGE, relabel_stage.STAGE, export_stage.STAGE):
        run_stage(stage, store, profile, manifests)
    passed = [r["item_id"] for r in store.read_shard("filter", 0).to_pylist() if r["status"] == "ok"]
    relabel = {r["item_id"]: r for r in store.read_shard("relabel", 0).to_pylist()}
    assert len(passed) == 5
    assert all(relabel[i]["status"] == "ok" for i in passed), {i: relabel[i]["reason"] for i in passed}
    pairs = {r["item_id"]: r for r in store.read_shard("pairs", 0).to_pylist()}
    assert sorted(pairs) == sorted(passed)
    flips = 0
    for i in passed:
        r = relabel[i]
        lower = r["imagereward_1"] < r["imagereward_0"]
        assert r["flipped"] == lower and (pairs[i]["label_0"] == 1) == lower
        flips += lower
    assert 0 < flips < len(passed)  # both kinds of pair occur on these images

    assert main(["--data-dir", str(tmp_path), "card", "faithful"]) == 0
    card = open(json.loads(capsys.readouterr().out)["README.md"], encoding="utf-8").read()
    assert f"Profile: `tiny-rpo-faithful`: {profile.description.strip()}" in card
