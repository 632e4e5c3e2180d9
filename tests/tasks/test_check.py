"""The check stage (richpref/tasks/check_stage.py): the filter's questions to the VLM, answered as
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
from richpref.tasks import check as check_stage
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


class OnTinyQwen:
    """The tiny Qwen answering as it does; a subclass changes one kind of answer (as a served
    client reports a failed request, or a model that says nothing)."""

    def __init__(self, vlm) -> None:
        self.vlm, self.model_id = vlm, vlm.model_id

    def generate_detailed(self, images, texts, **kw):
        return self.vlm.generate_detailed(images, texts, **kw)

    def yes_no(self, images, texts, **kw):
        return self.vlm.yes_no(images, texts, **kw)


class FailingOnePair(OnTinyQwen):
    """Every question naming `marker` gets a failed request (as the served client reports one after
    its retries)."""

    def __init__(self, vlm, marker: str) -> None:
        super().__init__(vlm)
        self.marker = marker

    def yes_no(self, images, texts, **kw):
        answers = self.vlm.yes_no(images, texts, **kw)
        return [YesNo(None, "answer", "vlm_request_failed: HTTP 500 after 2 attempt(s)") if self.marker in t else a
                for a, t in zip(answers, texts)]


def test_a_failed_request_rejects_its_pair_in_check_and_filter(vlms):
    rows, prompts, instructions, images = filter_input()
    check = CheckConfig(max_new_tokens=8)
    cfg = FilterConfig(min_executed=0, min_no_stray=0, min_subject_kept=0, min_attributes_kept=0.01)
    vlm = FailingOnePair(vlms["qwen"], "second dog")  # pair f1's instruction
    checks = check_stage.check_rows(rows, prompts, instructions, images, check, lambda: vlm)
    assert checks.schema == CHECKS
    a, b, c = checks.to_pylist()
    assert b["status"] == "rejected" and b["reason"] == "vlm_request_failed: HTTP 500 after 2 attempt(s)"
    assert (a["status"], c["status"]) == ("ok", "ok") and a["p_source"] == c["p_source"] == "logits"
    # the other pairs' answers are those of a run without the failure
    clean = check_stage.check_rows(rows, prompts, instructions, images, check, lambda: vlms["qwen"]).to_pylist()
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
    view = check_stage.checking_view
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
    monkeypatch.setattr(check_stage, "load_vlm", lambda cfg, root: vlms["qwen"])
    out = check_stage.compute(StageInputs(0, cutout, tables), profile).to_pylist()
    assert [len(r["p_executed_each"]) for r in out] == [2, 1]
    sections = load_sections(profile.check.template)
    from richpref.common.images import decode_image, side_by_side

    pair = side_by_side(decode_image(images["original"][0]), decode_image(images["edited"][0]))
    np.testing.assert_allclose(out[0]["p_executed_each"], vlms["qwen"].p_yes(
        [pair] * 2, [render(sections["executed"], instruction=s) for s in every[0][:2]]), atol=1e-6)


def test_undecodable_images_reject_their_rows_by_item_and_candidate_without_a_model():
    rows, prompts, instructions, images = filter_input(2)
    rows = pa.table({"item_id": ["f0", "f1"], "candidate": pa.array([0, 2], pa.int32())})
    images["original_cutout"] = [b"", images["original_cutout"][1]]
    images["edited"] = [images["edited"][0], b"broken"]

    def no_model():
        raise AssertionError("no row needs the model")

    out = check_stage.check_rows(rows, prompts, instructions, images, CheckConfig(), no_model).to_pylist()
    assert [(r["item_id"], r["candidate"], r["status"], r["template"]) for r in out] == [
        ("f0", 0, "rejected", "filter_v2"), ("f1", 2, "rejected", "filter_v2")]
    assert out[0]["reason"] == "bad_image: empty image bytes" and out[1]["reason"].startswith("bad_image: cannot decode")


class FailingOriginalCutout(OnTinyQwen):
    """Every question about one original cut-out (its attributes, asked once per item) gets a failed
    request."""

    def __init__(self, vlm, original_cutout: bytes) -> None:
        from richpref.common.images import decode_image

        super().__init__(vlm)
        self.original = np.asarray(decode_image(original_cutout))

    def yes_no(self, images, texts, **kw):
        answers = self.vlm.yes_no(images, texts, **kw)
        return [YesNo(None, "answer", "vlm_request_failed: HTTP 503 after 2 attempt(s)")
                if np.array_equal(np.asarray(im), self.original) else a for a, im in zip(answers, images)]


def test_a_failed_question_about_an_items_original_rejects_every_edit_of_that_item(vlms):
    """The original's attributes are asked once, with the item's first pair, and serve all its edits:
    without them a later edit's attribute check would be decided on an empty list."""
    rows, prompts, instructions, images = filter_input(2)
    three = pa.table({"item_id": ["f0", "f0", "f1"], "candidate": pa.array([0, 1, 0], pa.int32())})
    by_row = {k: [v[0], v[0], v[1]] for k, v in images.items()}
    by_row["edited"][1], by_row["edited_cutout"][1] = encode_png(image(77)), encode_png(image(78, (48, 64)))
    args = (three, [prompts[0], prompts[0], prompts[1]], [instructions[0], instructions[0], instructions[1]], by_row,
            CheckConfig(max_new_tokens=8))
    clean = check_stage.check_rows(*args, lambda: vlms["qwen"]).to_pylist()
    assert clean[0]["attributes"] and clean[1]["attributes"]  # there are questions about f0's original
    failing = FailingOriginalCutout(vlms["qwen"], images["original_cutout"][0])
    out = check_stage.check_rows(*args, lambda: failing).to_pylist()
    assert [(r["item_id"], r["candidate"], r["status"]) for r in out] == [
        ("f0", 0, "rejected"), ("f0", 1, "rejected"), ("f1", 0, "ok")]
    assert out[0]["reason"] == out[1]["reason"] == "vlm_request_failed: HTTP 503 after 2 attempt(s)"
    assert out[1]["model_id"] == vlms["qwen"].model_id and out[1]["template"] == "filter_v2"
    assert out[2]["p_attr_original"] == pytest.approx(clean[2]["p_attr_original"], abs=1e-6)
    assert out[2]["attributes_error"] == clean[2]["attributes_error"]


class ListingNothing(OnTinyQwen):
    """The attribute listing is answered with an empty text (a model that ends at once); `listings`
    counts the listing calls."""

    def __init__(self, vlm) -> None:
        super().__init__(vlm)
        self.listings = 0

    def generate_detailed(self, images, texts, **kw):
        from richpref.models.vlm import Generation

        self.listings += 1
        return [Generation("", True, 0) for _ in images]


def test_an_item_with_no_attribute_listed_is_kept_with_why_and_no_attribute_answers(vlms):
    rows, prompts, instructions, images = filter_input(1)
    vlm = ListingNothing(vlms["qwen"])
    [r] = check_stage.check_rows(rows, prompts, instructions, images, CheckConfig(), lambda: vlm).to_pylist()
    assert (r["status"], r["attributes"], r["attributes_raw"]) == ("ok", [], "")
    assert r["attributes_error"] == "the model listed no attribute"
    assert r["p_attr_original"] == r["p_attr_edited"] == [] and vlm.listings == 1
    vlm.listings = 0
    [off] = check_stage.check_rows(rows, prompts, instructions, images, CheckConfig(attributes=False),
                                    lambda: vlm).to_pylist()
    assert vlm.listings == 0 and off["attributes"] is None and off["p_attr_original"] is None
    assert off["p_executed_each"] == pytest.approx(r["p_executed_each"], abs=1e-6)


def test_a_template_asking_about_all_instructions_at_once_gets_one_executed_answer(vlms):
    from richpref.common.images import decode_image, side_by_side

    rows, prompts, instructions, images = filter_input(1)
    assert len(instructions[0]) == 2
    cfg = CheckConfig(template="filter_v1", attributes=False)
    [r] = check_stage.check_rows(rows, prompts, instructions, images, cfg, lambda: vlms["qwen"]).to_pylist()
    pair = side_by_side(decode_image(images["original"][0]), decode_image(images["edited"][0]))
    asked = render(load_sections("filter_v1")["executed"], instructions=check_stage.bullets(instructions[0]))
    assert r["p_executed_each"] == pytest.approx(vlms["qwen"].p_yes([pair], [asked]), abs=1e-6)


def _questions(*sizes: int) -> list[tuple]:
    return [(pair, f"q{k}") for pair, n in enumerate(sizes) for k in range(n)]


@pytest.mark.parametrize("sizes,batch_size,batches", [
    ((3, 2, 5, 1), 4, [[0], [1], [2], [3]]),  # 3+2 > 4; a pair of 5 goes alone, whole
    ((3, 2, 5, 1), 6, [[0, 1], [2, 3]]),  # 3+2 <= 6 < 3+2+5; 5+1 = 6 fits
    ((1, 1, 1, 1, 1), 2, [[0, 1], [2, 3], [4]]),
    ((2,), 1, [[0]]),
])
def test_in_process_batches_hold_whole_pairs_up_to_the_batch_size(sizes, batch_size, batches):
    got = check_stage.pair_batches(_questions(*sizes), batch_size, served=False)
    assert [sorted({q[0] for q in b}) for b in got] == batches
    assert [q for b in got for q in b] == _questions(*sizes)  # every question once, in order


def test_a_served_model_gets_every_question_in_one_list():
    qs = _questions(3, 2, 5)
    assert check_stage.pair_batches(qs, 2, served=True) == [qs]
    assert check_stage.pair_batches([], 2, served=True) == check_stage.pair_batches([], 2, served=False) == []


def test_a_failed_attribute_listing_rejects_the_pair_with_that_failure(vlms):
    from richpref.models.vlm import Generation

    class ListingFailed(ListingNothing):
        def generate_detailed(self, images, texts, **kw):
            return [Generation("", False, 0, error="vlm_request_failed: timed out after 3 attempt(s)") for _ in images]

    rows, prompts, instructions, images = filter_input(1)
    [r] = check_stage.check_rows(rows, prompts, instructions, images, CheckConfig(), lambda: ListingFailed(vlms["qwen"])).to_pylist()
    assert (r["item_id"], r["status"]) == ("f0", "rejected")
    assert r["reason"] == "vlm_request_failed: timed out after 3 attempt(s)"


@pytest.mark.parametrize("batch_size", [1, 4])
def test_in_process_questions_are_asked_in_batches_of_the_check_batch_size(vlms, batch_size):
    """Batch size 1 (where out-of-memory retries end) asks one question at a time, not a pair at once."""
    vlm, sizes = vlms["qwen"], []

    class Recording:
        model_id = vlm.model_id

        def generate_detailed(self, images, texts, **kw):
            return vlm.generate_detailed(images, texts, **kw)

        def yes_no(self, images, texts, **kw):
            sizes.append((len(images), kw["batch_size"]))
            return vlm.yes_no(images, texts, **kw)

    rows, prompts, instructions, images = filter_input(1)
    cfg = FilterConfig(min_executed=0, min_no_stray=0, min_subject_kept=0)
    filter_stage.filter_rows(rows, prompts, instructions, images, CheckConfig(max_new_tokens=8, batch_size=batch_size),
                             cfg, lambda: Recording())
    # (questions in the call, the batch the VLM runs them in): a batch of whole pairs in one forward, or
    # one question a forward at batch size 1
    assert sizes == ([(6, 1)] if batch_size == 1 else [(6, 6)])


def test_in_process_questions_sharing_an_image_run_in_batches_of_the_check_batch_size(vlms, monkeypatch):
    from richpref.models import vlm_prefix

    seen, real = [], vlm_prefix.p_yes_sharing_image
    monkeypatch.setattr(vlm_prefix, "p_yes_sharing_image",
                        lambda vlm, img, prompts, batch_size: seen.append(batch_size) or real(vlm, img, prompts, batch_size))
    rows, prompts, instructions, images = filter_input(1)
    check_stage.check_rows(rows, prompts, instructions, images, CheckConfig(max_new_tokens=8, batch_size=3),
                            lambda: vlms["qwen"])
    assert seen and set(seen) == {3}
