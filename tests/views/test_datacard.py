"""The dataset card's figures (richpref/views/datacard.py), against values computed by hand."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from richpref.views.datacard import score_stats

NAN = float("nan")


def test_score_stats_count_the_rows_each_figure_is_over():
    # kept pairs of an original and its edit; a pair of two edits (candidate_0 set); a tie and an edit not
    # selected for its item's pair (scored, not kept); a row rejected before scoring; a kept pair a
    # report-only reward gave no score
    rows = [("ok", None, -1, 1.0, 0.5, 0.5, False), ("ok", None, -1, 4.0, 2.0, 0.2, True),
            ("ok", None, 0, 0.0, 0.0, 0.9, False), ("rejected", "tie: margin 0", -1, 2.0, 2.0, 0.0, None),
            ("rejected", "not_selected: a better edit", -1, 5.0, 1.0, 0.1, None),
            ("rejected", "bad_image", -1, NAN, NAN, None, None), ("ok", None, -1, NAN, 1.0, 0.3, False)]
    names = ["status", "reason", "candidate_0", "r_0", "r_1", "margin", "flipped"]
    table = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}).append_column("r_z0", pa.array([0.0] * 7))
    stats = score_stats(table)
    assert stats["scored"] == 5  # the pair of two edits and the rejected row are not
    r = stats["rewards"]["r"]  # over the 4 of them with both scores: side 0 = 1, 4, 2, 5; side 1 = 0.5, 2, 2, 1
    assert r["side_0"] == pytest.approx({"mean": 3.0, "std": math.sqrt(10 / 4), "min": 1.0, "max": 5.0})
    assert r["side_1"] == pytest.approx({"mean": 1.375, "std": math.sqrt(1.6875 / 4), "min": 0.5, "max": 2.0})
    assert r["side_1_lower"] == 0.75  # all but the tie
    assert stats["kept"] == 4
    assert stats["composite_flip_rate"] == pytest.approx(1 / 3)  # kept pairs with the original: 1 of 3 flipped
    # margins of the 4 kept pairs, 0.2, 0.3, 0.5, 0.9, at linearly interpolated quantiles
    assert stats["margin"] == pytest.approx({"min": 0.2, "p10": 0.23, "median": 0.4, "p90": 0.78, "max": 0.9})
