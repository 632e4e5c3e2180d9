"""The check stage (richpref/tasks/filter_check.py): the filter's questions to the VLM, answered as
probabilities, nothing decided. On the tiny Qwen2.5-VL: every stored probability is the model's
answer to the rendered question, an item's attributes are listed once for all its edits and not at
all when the attribute check is off, bad images are rejected without a model. With the served
backend's behaviour: a pair whose request failed is rejected with that failure, `p_source` says
where each P(yes) came from, and the filter carries both into its verdicts; the stage's key follows
what changes the answers. The tests named test_filter_* call `filter.filter_rows`, which asks
(this stage) and decides (test_filter.py) in one go."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from richpref.common.images import encode_png
from richpref.models.vlm import YesNo
from richpref.prompts import load_sections, render
from richpref.schemas.config import CheckConfig, FilterConfig
from richpref.schemas.serving import EngineConfig
from richpref.schemas.tables import CHECKS, VERDICTS
from richpref.tasks import filter as filter_stage
from richpref.tasks import filter_check
from richpref.tasks.vlm_text import parse_list
from vlm_helpers import filter_input, image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_old_filter_template_needs_the_attribute_check_off():
    with pytest.raises(ValueError, match="check.attributes=false"):
        filter_stage.load_filter_template(CheckConfig(template="filter_v1"))
    assert "attributes" not in filter_stage.load_filter_template(CheckConfig(template="filter_v1", attributes=False))


def test_filter_probabilities_are_the_models_answers(vlms):
    from richpref.common.images import decode_image, side_by_side

    vlm = vlms["qwen"]
    rows, prompts, instructions, images = filter_input()
    cfg = FilterConfig(min_executed=0, min_no_stray=0, min_subject_kept=0, min_attribute_present=0.5,
                       min_attributes_kept=0.01)
    out = filter_stage.filter_rows(rows, prompts, instructions, images, CheckConfig(max_new_tokens=8, batch_size=4), cfg,
                                   lambda: vlm)
    assert out.schema == VERDICTS
    sections = load_sections("filter_v2")
    for k, r in enumerate(out.to_pylist()):
        pair = side_by_side(decode_image(images["original"][k]), decode_image(images["edited"][k]))
        o_cut, e_cut = decode_image(images["original_cutout"][k]), decode_image(images["edited_cutout"][k])
        each = vlm.p_yes([pair] * len(instructions[k]),
                         [render(sections["executed"], instruction=ins) for ins in instructions[k]])
        np.testing.assert_allclose(r["p_executed_each"], each, atol=1e-6)
        assert r["p_executed"] == pytest.approx(float(np.mean(each)), abs=1e-6)
        stray = vlm.p_yes([pair], [render(sections["no_stray"], prompt=prompts[k],
                                          instructions="\n".join(f"- {s}" for s in instructions[k]))])[0]
        assert r["p_no_stray"] == pytest.approx(float(stray), abs=1e-6)
        subject = vlm.p_yes([side_by_side(o_cut, e_cut)], [sections["subject_kept"]])[0]
        assert r["p_subject_kept"] == pytest.approx(float(subject), abs=1e-6)
        # Attributes: generated from the original cut-out, each verified in both cut-outs.
        [gen] = vlm.generate_detailed([o_cut], [render(sections["attributes"], max_attributes=5)], max_new_tokens=8)
        assert r["attributes_raw"] == gen.text
        assert r["attributes"] == parse_list(gen.text)[:5]
        questions = [render(sections["attribute_present"], attribute=a) for a in r["attributes"]]
        if questions:
            np.testing.assert_allclose(r["p_attr_original"], vlm.p_yes([o_cut] * len(questions), questions), atol=1e-6)
            np.testing.assert_allclose(r["p_attr_edited"], vlm.p_yes([e_cut] * len(questions), questions), atol=1e-6)
        checks = json.loads(r["checks"])
        assert set(checks) == {"executed", "no_stray", "subject_kept", "attributes"}
        assert checks["executed"] == checks["no_stray"] == checks["subject_kept"] == "pass"
        exempt, share, outcome = filter_stage.attribute_check(r["attributes"], r["p_attr_original"], r["p_attr_edited"],
                                                              instructions[k], cfg)
        assert checks["attributes"] == outcome and r["attributes_kept"] == share and r["attr_exempt"] == exempt
        assert (r["verdict"] == "keep") == (r["status"] == "ok") == (not outcome.startswith("fail"))


def test_filter_lists_an_items_attributes_once_for_all_its_edits(vlms):
    vlm = vlms["qwen"]
    calls = []

    class Recording:
        model_id = vlm.model_id

        def generate_detailed(self, images, texts, **kw):
            calls.append(("generate", len(images)))
            return vlm.generate_detailed(images, texts, **kw)

        def p_yes(self, images, texts, **kw):
            return vlm.p_yes(images, texts, **kw)

        def yes_no(self, images, texts, **kw):
            return vlm.yes_no(images, texts, **kw)

    rows, prompts, instructions, images = filter_input(1)
    two = pa.table({"item_id": ["f0", "f0"], "candidate": pa.array([0, 1], pa.int32())})
    images2 = {k: v * 2 for k, v in images.items()}
    images2["edited"] = [images["edited"][0], encode_png(image(77))]
    images2["edited_cutout"] = [images["edited_cutout"][0], encode_png(image(78, (48, 64)))]
    check = CheckConfig(max_new_tokens=8)
    cfg = FilterConfig(min_executed=0, min_no_stray=0, min_subject_kept=0, min_attribute_present=0.5,
                       min_attributes_kept=0.01)
    out = filter_stage.filter_rows(two, prompts * 2, instructions * 2, images2, check, cfg,
                                   lambda: Recording()).to_pylist()
    assert calls == [("generate", 1)]
    assert [r["candidate"] for r in out] == [0, 1]
    assert out[0]["attributes"] == out[1]["attributes"] and out[0]["p_attr_original"] == out[1]["p_attr_original"]
    [alone] = filter_stage.filter_rows(rows, prompts, instructions, images, check, cfg, lambda: vlm).to_pylist()
    # the same verdict as the edit alone (batched CPU matmuls move probabilities by ~1e-8)
    assert (alone["attributes"], alone["checks"], alone["status"]) == (out[0]["attributes"], out[0]["checks"], out[0]["status"])
    for key in ("p_executed", "p_no_stray", "p_subject_kept"):
        assert alone[key] == pytest.approx(out[0][key], abs=1e-6)
    np.testing.assert_allclose(alone["p_attr_original"], out[0]["p_attr_original"], atol=1e-6)


def test_filter_without_the_attribute_check_generates_nothing(vlms):
    rows, prompts, instructions, images = filter_input(1)
    cfg = FilterConfig(min_executed=0, min_no_stray=0, min_subject_kept=0)
    [r] = filter_stage.filter_rows(rows, prompts, instructions, images, CheckConfig(attributes=False), cfg,
                                   lambda: vlms["qwen"]).to_pylist()
    assert r["status"] == "ok" and r["attributes"] is None
    assert json.loads(r["checks"])["attributes"] == "skipped: check.attributes=false"


def test_bad_images_are_rejected_without_loading_a_model():
    rows, prompts, instructions, images = filter_input(1)
    images["edited"] = [b""]

    def no_model():
        raise AssertionError("no row needs the model")

    [r] = filter_stage.filter_rows(rows, prompts, instructions, images, CheckConfig(), FilterConfig(), no_model).to_pylist()
    assert r["status"] == "rejected" and r["reason"].startswith("bad_image:")


class FailingOnePair:
    """The tiny Qwen, except that every question naming `marker` gets a failed request (as the
    served client reports one after its retries)."""

    def __init__(self, vlm, marker: str) -> None:
        self.vlm, self.marker, self.model_id = vlm, marker, vlm.model_id

    def generate_detailed(self, images, texts, **kw):
        return self.vlm.generate_detailed(images, texts, **kw)

    def yes_no(self, images, texts, **kw):
        answers = self.vlm.yes_no(images, texts, **kw)
        return [YesNo(None, "answer", "vlm_request_failed: HTTP 500 after 2 attempt(s)") if self.marker in t else a
                for a, t in zip(answers, texts)]


def test_a_failed_request_rejects_its_pair_in_check_and_filter(vlms):
    rows, prompts, instructions, images = filter_input()
    check = CheckConfig(max_new_tokens=8)
    cfg = FilterConfig(min_executed=0, min_no_stray=0, min_subject_kept=0, min_attributes_kept=0.01)
    vlm = FailingOnePair(vlms["qwen"], "second dog")  # pair f1's instruction
    checks = filter_check.check_rows(rows, prompts, instructions, images, check, lambda: vlm)
    assert checks.schema == CHECKS
    a, b, c = checks.to_pylist()
    assert b["status"] == "rejected" and b["reason"] == "vlm_request_failed: HTTP 500 after 2 attempt(s)"
    assert (a["status"], c["status"]) == ("ok", "ok") and a["p_source"] == c["p_source"] == "logits"
    # the other pairs' answers are those of a run without the failure
    clean = filter_check.check_rows(rows, prompts, instructions, images, check, lambda: vlms["qwen"]).to_pylist()
    for got, want in ((a, clean[0]), (c, clean[2])):
        assert got["p_executed_each"] == pytest.approx(want["p_executed_each"], abs=1e-6)
        assert got["p_attr_edited"] == pytest.approx(want["p_attr_edited"], abs=1e-6)
    verdicts = filter_stage.decide_rows(checks, instructions, cfg)
    assert verdicts.schema == VERDICTS
    va, vb, vc = verdicts.to_pylist()
    assert (vb["status"], vb["verdict"], vb["reason"]) == ("rejected", "drop", b["reason"])
    assert vb["model_id"] == vlm.model_id
    assert va["p_source"] == vc["p_source"] == "logits" and va["verdict"] == "keep"


def test_the_check_key_leaves_out_transport_and_prefix_sharing():
    """The thresholds are another section's (tests/schemas/test_config.py keys the stages)."""
    view = filter_check.checking_view
    base = view(CheckConfig())
    assert view(CheckConfig(share_image_prefix=False, batch_size=2)) == base
    endpoint = EngineConfig(backend="server", endpoint="http://127.0.0.1:8000/v1")
    other = EngineConfig(backend="server", endpoint="http://10.0.0.5:8000/v1", concurrency=4)
    assert view(CheckConfig(engine=endpoint)) == view(CheckConfig(engine=other)) != base  # the backend counts
    assert view(CheckConfig(max_attributes=3)) != base != view(CheckConfig(attributes=False))


def test_check_asks_only_about_the_instructions_that_reached_the_editor(vlms, monkeypatch):
    """An edit whose prompt dropped instructions past the text encoder's limit (edit's
    `edit_instructions`) is checked on those it kept; an edit table without the column falls back
    to every instruction."""
    from richpref.schemas.config import load_profile
    from richpref.tasks.base import StageInputs

    rows, prompts, instructions, images = filter_input(2)
    every = [["Make the apple red", "Remove the blue cup", "Add a hat", "Paint the wall green"], ["Add a second dog"]]
    profile = load_profile("tiny", ["check.max_new_tokens=4", "check.attributes=false"])
    cutout = rows.append_column("original_cutout", pa.array(images["original_cutout"], pa.binary())) \
        .append_column("edited_cutout", pa.array(images["edited_cutout"], pa.binary()))
    tables = {
        "cutout": cutout,
        "sample": pa.table({"item_id": rows.column("item_id"), "image": pa.array(images["original"], pa.binary())}),
        "edit": pa.table({"item_id": rows.column("item_id"), "candidate": rows.column("candidate"),
                          "image": pa.array(images["edited"], pa.binary()),
                          "edit_instructions": pa.array([every[0][:2], None], pa.list_(pa.string()))}),
        "instruct": pa.table({"item_id": rows.column("item_id"), "prompt": prompts, "instructions": every}),
    }
    monkeypatch.setattr(filter_check, "load_vlm", lambda cfg, root: vlms["qwen"])
    out = filter_check.compute(StageInputs(0, cutout, tables), profile).to_pylist()
    assert [len(r["p_executed_each"]) for r in out] == [2, 1]
    sections = load_sections(profile.check.template)
    from richpref.common.images import decode_image, side_by_side

    pair = side_by_side(decode_image(images["original"][0]), decode_image(images["edited"][0]))
    np.testing.assert_allclose(out[0]["p_executed_each"], vlms["qwen"].p_yes(
        [pair] * 2, [render(sections["executed"], instruction=s) for s in every[0][:2]]), atol=1e-6)
