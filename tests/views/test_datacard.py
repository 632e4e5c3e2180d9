"""The dataset card's figures (richpref/views/datacard.py), against values computed by hand."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from richpref.views.datacard import _score_table, _votes_line, plot_inputs, plots_for, score_stats

NAN = float("nan")


def _scores() -> pa.Table:
    """Kept pairs of an original and its edit; a pair of two edits (candidate_0 set); a tie and an edit
    not selected for its item's pair (scored, not kept); a row rejected before scoring; a kept pair a
    report-only reward gave no score. Reward `q` scored nothing (all NaN)."""
    rows = [("ok", None, -1, 1.0, 0.5, 0.5, False), ("ok", None, -1, 4.0, 2.0, 0.2, True),
            ("ok", None, 0, 0.0, 0.0, 0.9, False), ("rejected", "tie: margin 0", -1, 2.0, 2.0, 0.0, None),
            ("rejected", "not_selected: a better edit", -1, 5.0, 1.0, 0.1, None),
            ("rejected", "bad_image", -1, NAN, NAN, None, None), ("ok", None, -1, NAN, 1.0, 0.3, False)]
    names = ["status", "reason", "candidate_0", "r_0", "r_1", "margin", "flipped"]
    table = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}).append_column("r_z0", pa.array([0.0] * 7))
    return (table.append_column("q_0", pa.array([NAN] * 7)).append_column("q_1", pa.array([NAN] * 7))
            .append_column("q_z0", pa.array([0.0] * 7)))


def test_score_stats_count_the_rows_each_figure_is_over():
    stats = score_stats(_scores())
    assert stats["scored"] == 5  # the pair of two edits and the rejected row are not
    r = stats["rewards"]["r"]  # over the 4 of them with both scores: side 0 = 1, 4, 2, 5; side 1 = 0.5, 2, 2, 1
    assert r["side_0"] == pytest.approx({"mean": 3.0, "std": math.sqrt(10 / 4), "min": 1.0, "max": 5.0})
    assert r["side_1"] == pytest.approx({"mean": 1.375, "std": math.sqrt(1.6875 / 4), "min": 0.5, "max": 2.0})
    assert r["side_1_lower"] == 0.75  # all but the tie
    assert stats["kept"] == 4
    assert stats["composite_flip_rate"] == pytest.approx(1 / 3)  # kept pairs with the original: 1 of 3 flipped
    # margins of the 4 kept pairs, 0.2, 0.3, 0.5, 0.9, at linearly interpolated quantiles
    assert stats["margin"] == pytest.approx({"min": 0.2, "p10": 0.23, "median": 0.4, "p90": 0.78, "max": 0.9})
    assert stats["rewards"]["q"] == {"side_0": {}, "side_1": {}, "side_1_lower": None}


def test_the_score_table_gives_each_reward_its_weight_spread_and_share_lower():
    lines = _score_table(score_stats(_scores()), {"r": 1.0, "q": 0.0}, ("original", "edited"), {"r": "Reward R"})
    assert lines[2:] == ["| Reward R | 1 | 3 ± 1.58 [1, 5] | 1.375 ± 0.65 [0.5, 2] | 75.0% |",
                         "| q | 0 | – | – | – |"]  # no score on any row: no figures


def test_the_plots_draw_the_scored_rows_the_shares_lower_and_the_kept_margins():
    dist, rates, margins = plot_inputs(_scores())
    side_0, side_1 = dist["r"]  # the 5 scored rows, NaN left for the plot to drop
    assert side_0[:4] == [1.0, 4.0, 2.0, 5.0] and math.isnan(side_0[4]) and side_1 == [0.5, 2.0, 2.0, 1.0, 1.0]
    assert rates == pytest.approx({"r": 0.75, "composite": 1 / 3})  # q has no share: no bar
    assert margins == [0.5, 0.2, 0.9, 0.3]  # the kept pairs'
    # nothing scored (every row rejected before scoring), no rows, no table: empty plots, not an error
    rejected = _scores().slice(5, 1)
    assert plot_inputs(rejected) == plot_inputs(rejected.slice(0, 0)) == plot_inputs(None) == ({}, {}, [])
    for scores in (_scores(), None):
        pngs = plots_for(scores, 0.0, ("original", "edited"))
        assert sorted(pngs) == ["flip_rate.png", "margin_histogram.png", "reward_distributions.png"]
        assert all(png.startswith(b"\x89PNG") for png in pngs.values())


def test_the_card_says_which_rewards_vote_and_the_subject_gate():
    profile = {"score": {"rewards": {"imagereward": {"kind": "imagereward"}, "hpsv2": {"kind": "hpsv2"}},
                         "subject_gate": {"model": "facebook/dinov2-base"}},
               "relabel": {"weights": {"imagereward": 1.0}, "min_consistency": 0.6}}
    assert _votes_line(profile) == ("Labels decided by `imagereward` (1); recorded without a vote: `hpsv2`; "
                                    "subject gate: DINOv2 patch consistency ≥ 0.6 (`facebook/dinov2-base`).")
    del profile["relabel"]["weights"], profile["score"]["subject_gate"]  # no weights: every scored reward votes
    assert _votes_line(profile) == ("Labels decided by `imagereward` (1), `hpsv2` (1); recorded without a vote: "
                                    "none; subject gate: off.")
