"""The flip rate the card and `richpref summary` report, on a run with a tie: the product's definition
(of the kept pairs that hold the original, the share where the edit scored lower)."""
from __future__ import annotations

import json

import pytest

from richpref.run.storage import RunStore
from richpref.tasks import export as export_stage
from richpref.tasks import relabel as relabel_stage
from richpref.tasks import score as score_stage
from relabel_helpers import _flip_rate, run_stage, write_upstream


def test_flip_rate_of_a_run_with_ties_counts_only_its_pairs(mini_run, capsys):
    """The mini run again with `relabel.min_margin` at its smallest margin: that pair becomes a tie, so
    a flip rate over every relabel row would differ from the product's."""
    from richpref.cli.commands import main
    from richpref.views.inspect import summary

    data, store, profile = mini_run
    kept = sorted((r for r in store.read_shard("relabel", 0).to_pylist() if r["status"] == "ok"), key=lambda r: r["margin"])
    assert any(r["flipped"] for r in kept[1:])  # a flipped pair stays: the two definitions can differ
    cfg = profile.relabel.model_copy(update={"min_margin": float(kept[0]["margin"])})
    tied_profile = profile.model_copy(update={"relabel": cfg})
    tied = RunStore(str(data), "mini-ties")
    tied.write_text("profile.json", tied_profile.model_dump_json(indent=2))
    manifests = write_upstream(tied)
    run_stage(score_stage.STAGE, tied, tied_profile, manifests)
    run_stage(relabel_stage.STAGE, tied, tied_profile, manifests)
    run_stage(export_stage.STAGE, tied, tied_profile, manifests)
    relabel = tied.read_shard("relabel", 0).to_pylist()
    ties = [r for r in relabel if r["status"] == "rejected" and r["reason"].startswith("tie:")]
    assert ties and len(ties) < len(relabel)
    want = _flip_rate(relabel)
    over_all_rows = sum(bool(r["flipped"]) for r in relabel if r["status"] == "ok") / len(relabel)
    assert f"{want:.1%}" != f"{over_all_rows:.1%}"  # the two definitions tell apart on this run
    assert main(["--data-dir", str(data), "card", "mini-ties"]) == 0
    card = open(json.loads(capsys.readouterr().out)["README.md"], encoding="utf-8").read()
    assert f"flip rate (of the pairs holding the original: the edit scored lower, label_0 = 1): {want:.1%}" in card
    assert summary(str(data), "mini-ties")["flip_rate"] == pytest.approx(want)
