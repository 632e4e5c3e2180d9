"""The filter stage (richpref/tasks/filter.py): keep or drop each pair from the check stage's answers,
no model call: the attribute rule by hand, and every failed check named in the reason. The VLM's
answers themselves: test_check.py."""
from __future__ import annotations

import json

import pytest

from richpref.schemas.config import CheckConfig, FilterConfig
from richpref.tasks import filter as filter_stage
from vlm_helpers import filter_input


class TestAttributeCheck:
    cfg = FilterConfig(min_attribute_present=0.5, min_attributes_kept=0.6)

    def test_share_of_kept_attributes_by_hand(self):
        attrs = ["red scarf", "long brown hair", "round glasses", "green shirt"]
        p_orig = [0.9, 0.8, 0.3, 0.9]  # round glasses: not in the original -> not checked
        p_edit = [0.7, 0.2, 0.9, 0.1]
        # "green shirt" is named by the instruction -> exempt; checked: scarf (kept), hair (lost) -> 1/2
        exempt, share, outcome = filter_stage.attribute_check(attrs, p_orig, p_edit, ["Make the shirt blue"], self.cfg)
        assert exempt == [False, False, False, True]
        assert share == 0.5
        assert outcome.startswith("fail: 0.50 of 2 attributes kept") and "'long brown hair' (P=0.200)" in outcome
        lenient = self.cfg.model_copy(update={"min_attributes_kept": 0.5})
        assert filter_stage.attribute_check(attrs, p_orig, p_edit, ["Make the shirt blue"], lenient)[2] == "pass"
        no_exempt = self.cfg.model_copy(update={"exempt_instructed_attributes": False})
        # the shirt now counts and is lost too: 1/3
        assert filter_stage.attribute_check(attrs, p_orig, p_edit, ["Make the shirt blue"], no_exempt)[1] == pytest.approx(1 / 3)

    def test_nothing_to_check(self):
        _, share, outcome = filter_stage.attribute_check(["red scarf"], [0.1], [0.9], [], self.cfg)
        assert share is None and outcome.startswith("skipped:")
        strict = self.cfg.model_copy(update={"on_no_attributes": "drop"})
        assert filter_stage.attribute_check(["red scarf"], [0.1], [0.9], [], strict)[2].startswith("fail:")

    def test_parse_attributes(self):
        assert filter_stage.parse_attributes("- a\n- b\n- c", 2) == (["a", "b"], None)
        assert filter_stage.parse_attributes("", 5)[1] == "the model listed no attribute"
        assert filter_stage.parse_attributes("[1", 5)[1].startswith("unparseable")


def test_filter_names_every_failed_check(vlms):
    rows, prompts, instructions, images = filter_input(2)
    cfg = FilterConfig(min_executed=1.0, min_no_stray=1.0, min_subject_kept=1.0, min_attribute_present=0.0,
                       min_attributes_kept=1.0, executed_reduce="min")
    out = filter_stage.filter_rows(rows, prompts, instructions, images, CheckConfig(max_new_tokens=6), cfg,
                                   lambda: vlms["qwen"]).to_pylist()
    for r in out:
        assert r["status"] == "rejected" and r["verdict"] == "drop"
        codes = [part.split(":")[0] for part in r["reason"].split("; ")]
        assert codes[:3] == ["not_executed", "stray_content", "subject_changed"]
        assert r["p_executed"] == pytest.approx(min(r["p_executed_each"]))
        checks = json.loads(r["checks"])
        # P(present) >= 0 always holds: every non-exempt attribute is checked and kept -> the check passes.
        assert checks["attributes"] in ("pass",) or checks["attributes"].startswith("skipped")


def answers(**rows: dict):
    """A check stage table of hand-set answers, one kept row per item (P(yes) 0.5 everywhere unless given)."""
    from richpref.schemas.tables import CHECKS, rows_to_table
    from richpref.tasks.base import kept

    base = {"candidate": 0, "p_executed_each": [0.5], "p_no_stray": 0.5, "p_subject_kept": 0.5, "attributes": [],
            "p_attr_original": [], "p_attr_edited": [], "template": "t", "model_id": "m", "p_source": "logits"}
    return rows_to_table([kept(item, **{**base, **given}) for item, given in rows.items()], CHECKS)


def test_thresholds_pass_at_equality_and_each_decision_is_the_rows_own():
    cfg = FilterConfig(min_executed=0.5, min_no_stray=0.5, min_subject_kept=0.5, min_attribute_present=0.5,
                       min_attributes_kept=1.0, on_no_attributes="drop")
    scarf = {"attributes": ["red scarf", "blue hat"], "p_attr_original": [0.5, 0.9], "p_attr_edited": [0.5, 0.1]}
    table = answers(
        equal=scarf,  # every P at its threshold passes; the hat is lost, but the instruction names it: exempt
        hat_lost={**scarf},  # the same answers, an instruction that names no attribute: the hat is lost
        unlisted={"attributes": [], "attributes_error": "the model listed no attribute"},
        low={"p_no_stray": 0.4999})
    instructions = [["Take off the hat"], ["Make the sky pink"], ["Make the sky pink"], ["Make the sky pink"]]
    out = {r["item_id"]: r for r in filter_stage.decide_rows(table, instructions, cfg).to_pylist()}
    assert out["equal"]["status"] == "ok" and out["equal"]["attr_exempt"] == [False, True]
    assert out["hat_lost"]["reason"].startswith("attributes_lost: 0.50 of 2 attributes kept")
    assert out["unlisted"]["reason"] == "attributes_lost: the model listed no attribute"
    # a P just under its threshold reads as under it (before: "P(yes)=0.500 < filter.min_no_stray=0.5")
    assert out["low"]["reason"].startswith("stray_content: P(yes)=0.4999 < filter.min_no_stray=0.5")
    assert filter_stage.threshold_outcome(0.3, 0.5, "min_executed") == "fail: P(yes)=0.300 < filter.min_executed=0.5"
    assert filter_stage.below(2 / 3, 0.67, 2) == "0.667" and filter_stage.below(0.5, 1.0, 2) == "0.50"
    lenient = cfg.model_copy(update={"on_no_attributes": "skip", "min_attributes_kept": 0.0})
    out = {r["item_id"]: r for r in filter_stage.decide_rows(table, instructions, lenient).to_pylist()}
    assert json.loads(out["hat_lost"]["checks"])["attributes"] == "skipped: filter.min_attributes_kept=0"
    kept_all = lenient.model_copy(update={"min_attributes_kept": 1.0})
    out = {r["item_id"]: r for r in filter_stage.decide_rows(table, instructions, kept_all).to_pylist()}
    assert out["unlisted"]["status"] == "ok"
    assert json.loads(out["unlisted"]["checks"])["attributes"] == "skipped: the model listed no attribute"


def test_the_executed_check_reduces_each_instructions_p_by_its_min_or_mean_by_hand():
    # the mean was untested: a sum in its place passed (found by a mutation sweep)
    table = answers(two={"p_executed_each": [0.3, 0.4]}, spread={"p_executed_each": [0.2, 0.9]})
    instructions = [["Add a hat", "Make it red"]] * 2
    for reduce, expected in (("min", {"two": "P(yes)=0.300", "spread": "P(yes)=0.200"}),
                             ("mean", {"two": "P(yes)=0.350", "spread": None})):
        cfg = FilterConfig(min_executed=0.5, min_no_stray=0.5, min_subject_kept=0.5, on_no_attributes="keep",
                           executed_reduce=reduce)
        out = {r["item_id"]: r for r in filter_stage.decide_rows(table, instructions, cfg).to_pylist()}
        for item, p in expected.items():
            if p is None:  # mean 0.55: passes
                assert out[item]["status"] == "ok", (reduce, item)
            else:
                assert out[item]["reason"].startswith(f"not_executed: {p} < filter.min_executed=0.5"), (reduce, item)
