"""Held-out diagnostics (richpref/training/heldout.py) by hand: the implicit accuracy over pairs x draws
(ties count half), the mean margin, and when the chance warning fires. A whole run evaluating held-out
pairs: tests/training/test_flow_step.py."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from richpref.training.heldout import HeldOut, chance_warning


def _heldout(draws: int, batches: list[str]) -> HeldOut:
    """A HeldOut over named batches (its pairs need no loading here: evaluate only indexes them)."""
    h = HeldOut.__new__(HeldOut)
    h.draws, h.batches, h.n_batches, h.count, h.history, h.warned = draws, batches, len(batches), 4, [], False
    return h


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
