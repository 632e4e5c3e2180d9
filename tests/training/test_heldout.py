"""Held-out diagnostics (richpref/training/heldout.py) by hand: the implicit accuracy over pairs x draws
(ties count half), the mean margin, and when the chance warning fires. A whole run evaluating held-out
pairs: tests/training/test_flow_step.py."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from richpref.training.heldout import EachPairOnce, HeldOut, chance_warning


def _heldout(draws: int, batches: list[str], count: int = 4) -> HeldOut:
    """A HeldOut over named batches (its pairs need no loading here: evaluate only indexes them)."""
    h = HeldOut.__new__(HeldOut)
    h.draws, h.batches, h.n_batches, h.count, h.history, h.warned = draws, batches, len(batches), count, [], False
    return h


def test_each_held_out_pair_is_scored_once_and_sources_count_by_their_pairs():
    # before: a mixture of the sources at equal weights, so a source of 4 pairs beside one of 60 had each
    # of its pairs scored about 8 times, and a batch's filling past the last pair was counted as well
    every = EachPairOnce([2, 3], 64, seed=1)
    assert every.pairs == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert every.locate([4, 5, 6]) == [(1, 2), (0, 0), (0, 1)]  # past the end: the filling of a last batch
    assert EachPairOnce([1, 2, 1], 64, seed=1).pairs == [(0, 0), (1, 0), (1, 1), (2, 0)]
    some = EachPairOnce([60, 4], 10, seed=1)
    assert len(set(some.pairs)) == 10 and some.pairs == sorted(some.pairs)
    assert all(r < (60, 4)[s] for s, r in some.pairs) and EachPairOnce([60, 4], 10, seed=1).pairs == some.pairs
    drawn = [s for seed in range(200) for s, _ in EachPairOnce([60, 4], 10, seed).pairs]
    assert drawn.count(1) / len(drawn) == pytest.approx(4 / 64, abs=0.02)  # by its share of the pairs


def test_a_last_batchs_filling_is_not_counted():
    def step(batch, tag):
        return SimpleNamespace(margin=torch.tensor({"b0": [1.0, 1.0], "b1": [-1.0, 9.0]}[batch]))

    out = _heldout(2, ["b0", "b1"], count=3).evaluate(step)  # 3 pairs in batches of 2: b1's second is filling
    assert out["heldout_implicit_acc"] == pytest.approx(2 / 3) and out["heldout_reward_margin"] == pytest.approx(1 / 3)


def test_accuracy_counts_ties_half_over_every_batch_and_draw():
    margins = {("b0", "heldout-0"): [1.0, -1.0], ("b1", "heldout-0"): [0.0, 2.0],
               ("b0", "heldout-1"): [3.0, 0.0], ("b1", "heldout-1"): [-2.0, 5.0]}
    asked = []

    def step(batch, tag):
        asked.append((batch, tag))
        return SimpleNamespace(margin=torch.tensor(margins[(batch, tag)]))

    out = _heldout(2, ["b0", "b1"]).evaluate(step)
    assert asked == list(margins)  # each draw over every batch, the draw named by its tag
    # 4 of 8 margins above 0, 2 ties (half each): 5 / 8; the margins sum to 8
    assert out == {"heldout_implicit_acc": 0.625, "heldout_reward_margin": 1.0, "heldout_pairs": 4, "heldout_draws": 2}


def test_the_chance_warning_at_its_bounds():
    # the loss fell by exactly 10% (LOSS_DROP) of its first value: counted as fallen
    assert chance_warning([10.0, 9.5, 9.0], [0.5, 0.5]) is not None
    assert chance_warning([10.0, 9.5, 9.01], [0.5, 0.5]) is None
    # the lowest of the last three losses counts, not the last
    assert chance_warning([1.0, 0.5, 0.99, 0.99], [0.5, 0.5]) is not None
    assert chance_warning([1.0, 0.5, 0.99, 0.99, 0.99], [0.5, 0.5]) is None
    # within 0.05 of 0.5 is chance, 0.55 is not; only the last two evaluations count
    assert chance_warning([1.0, 0.5], [0.9, 0.46, 0.54]) is not None
    assert chance_warning([1.0, 0.5], [0.5, 0.55]) is None
    assert chance_warning([1.0, 0.5], [0.5]) is None and chance_warning([1.0], [0.5, 0.5]) is None
    assert chance_warning([0.0, 0.0], [0.5, 0.5]) is None  # no first loss to fall from


def test_record_marks_every_evaluation_at_chance_and_logs_once(caplog):
    h = _heldout(1, ["b0"])
    at_chance = {"heldout_implicit_acc": 0.5, "heldout_reward_margin": 0.0, "heldout_pairs": 4, "heldout_draws": 1}
    with caplog.at_level(logging.WARNING, logger="richpref"):
        first = h.record(10, at_chance, [1.0, 0.5])
        second = h.record(20, at_chance, [1.0, 0.5])
        third = h.record(30, at_chance, [1.0, 0.5])
    assert "warning" not in first  # one evaluation is not yet a trend
    assert second["step"] == 20 and second["kind"] == "heldout" and "stays near 0.5" in second["warning"]
    assert "warning" in third and len([r for r in caplog.records if "stays near 0.5" in r.message]) == 1
    assert [e["step"] for e in h.history] == [10, 20, 30]
    assert pytest.approx(h.history[0]["heldout_implicit_acc"]) == 0.5


def test_held_out_batches_cover_each_pair_once_at_the_runs_resolution():
    import datasets
    from PIL import Image

    from image_helpers import encoded

    png = encoded(Image.new("RGB", (24, 24), (9, 9, 9)))
    ds = datasets.Dataset.from_dict({"caption": ["a", "b", "c"], "jpg_0": [png] * 3, "jpg_1": [png] * 3,
                                     "label_0": [1, 0, 1]})
    cfg = SimpleNamespace(heldout_max_pairs=64, seed=0, resolution=16, loss_mask="none", heldout_draws=2)
    h = HeldOut([ds], cfg, batch_size=2, labels=["pairs"])
    assert (h.count, h.n_batches, h.draws, h.warned, h.history) == (3, 2, 2, False, [])
    # the same pixels at every evaluation: no flip, no random crop; masks only under edit_region
    assert (h.batches.augment.hflip, h.batches.augment.random_crop, h.batches.masks) == (False, False, False)
    assert HeldOut([ds], SimpleNamespace(**{**vars(cfg), "loss_mask": "edit_region"}), 2).batches.masks
    batches = [h.batches[m] for m in range(h.n_batches)]
    assert [c for b in batches for c in b["captions"]][:3] == ["a", "b", "c"]
    assert batches[0]["pixels"].shape == (4, 3, 16, 16)  # chosen and rejected of 2 pairs



def test_the_plot_draws_the_logged_steps_and_each_evaluation(tmp_path):
    from richpref.training.heldout import PLOT, metric_series, plot_metrics

    rows = [{"launch": "a1", "step": 0},  # a record with no loss: not a training point
            {"step": 1, "loss": 0.69, "implicit_acc": 0.5},
            {"step": 2, "loss": 0.60, "implicit_acc": 0.75},
            {"step": 2, "kind": "heldout", "heldout_implicit_acc": 0.625, "heldout_reward_margin": 0.1},
            {"step": 4, "loss": 0.41, "implicit_acc": 1.0},
            {"step": 4, "kind": "heldout", "heldout_implicit_acc": 0.5, "loss": 9.9}]  # held out, whatever it holds
    assert metric_series(rows) == {"train_loss": ([1, 2, 4], [0.69, 0.60, 0.41]),
                                   "train_acc": ([1, 2, 4], [0.5, 0.75, 1.0]),
                                   "heldout_acc": ([2, 4], [0.625, 0.5])}
    assert plot_metrics(tmp_path) is None  # no metrics file, no plot
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert plot_metrics(tmp_path) == tmp_path / PLOT and (tmp_path / PLOT).stat().st_size > 0
