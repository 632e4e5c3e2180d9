"""critique, instruct and filter: text rules on fixed strings, then the stages on the tiny VLMs.

Part 1 tests the parsers and guards on fixed strings: random-weight models cannot write a bullet
list, a "No issues." or an instruction about an apple. Part 2 runs the stage functions on the tiny
LLaVA-OneVision / Qwen2.5-VL models and checks every number they store against a direct call of
the model on the same rendered question.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from richpref.images import encode_png
from richpref.prompts import load_sections, load_template, render
from richpref.schemas.config import CritiqueConfig, FilterConfig, InstructConfig, Profile
from richpref.schemas.tables import CRITIQUES, INSTRUCTIONS, VERDICTS
from richpref.tasks import critique as critique_stage
from richpref.tasks import filter as filter_stage
from richpref.tasks import instruct as instruct_stage
from richpref.tasks.vlm_text import (
    ListParseError,
    content_words,
    grounding,
    instruction_target,
    parse_list,
    says_no_issues,
)

# =========================================================================== part 1: fixed strings


class TestParseList:
    def test_bullets_numbers_and_prose_around_them(self):
        text = "Here are the edits:\n- Remove the hand.\n2) Make the sky blue\n\u2022 \"Add a boat\"\nStep 4: Fix the sign\nHope this helps!"
        assert parse_list(text) == ["Remove the hand.", "Make the sky blue", "Add a boat", "Fix the sign"]

    def test_plain_lines_when_nothing_is_marked(self):
        assert parse_list("Remove the hand\n\n  Make the sky blue  \n") == ["Remove the hand", "Make the sky blue"]

    def test_json_array_in_a_fence(self):
        assert parse_list('```json\n["Remove the hand", " ", "Add a boat"]\n```') == ["Remove the hand", "Add a boat"]

    @pytest.mark.parametrize("text", ['["Remove the hand", "Add', '[1, 2]', '[{"a": 1}]'])
    def test_broken_json_is_an_error(self, text):
        with pytest.raises(ListParseError):
            parse_list(text)

    def test_empty(self):
        assert parse_list("") == [] and parse_list("  \n ") == [] and parse_list(None) == []


class TestContentWords:
    def test_function_words_and_edit_vocabulary_are_left_out(self):
        assert content_words("Change the colour of the apples to red, on the left side") == {"apple", "red"}

    def test_plurals_and_possessives_fold(self):
        assert content_words("boxes dogs' cherries dog's glass") == {"box", "dog", "cherry", "glass"}

    def test_grounding_share_by_hand(self):
        context = "a red apple on a wooden table. The apple is green."
        # {apple, green, red} all in the context -> 3/3
        assert grounding("Change the apple's color from green to red", context) == 1.0
        # {cat, sitting, apple}: only apple -> 1/3
        assert grounding("Add a cat sitting next to the apple", context) == pytest.approx(1 / 3)
        assert grounding("Fix it.", context) is None


class TestInstructionTarget:
    @pytest.mark.parametrize("instruction,target", [
        ("Remove the extra hand from the person on the left.", "the extra hand"),
        ("Replace the yellow umbrella with a black one.", "the yellow umbrella"),
        ("Change the color of the shirt from green to blue.", "the shirt"),
        ("Make the sky orange and purple at sunset.", "the sky"),
        ("Turn the red car blue", "the red car"),
        ("Please move the lamp to the right side of the desk.", "the lamp"),
        ("Get rid of the second dog", "the second dog"),
        ("Recolor the apple", "the apple"),
    ])
    def test_edits_of_existing_things(self, instruction, target):
        assert instruction_target(instruction) == target

    @pytest.mark.parametrize("instruction", [
        "Add a small boat on the water behind the bridge.",  # new content: absent by design
        "Insert a sign reading OPEN",
        "The sky should be blue",  # no leading edit verb
        "Fix it.",  # nothing named
        "",
    ])
    def test_no_target(self, instruction):
        assert instruction_target(instruction) is None


def test_says_no_issues():
    for text in ["No issues.", "no issues", "None", "No problems found!", "  No misalignment. "]:
        assert says_no_issues(text), text
    for text in ["No issues with the dog, but the cat is missing.", "The apple is green.", ""]:
        assert not says_no_issues(text), text


def test_critique_reason():
    cfg = CritiqueConfig()
    assert critique_stage.critique_reason("The apple is green, not red.", cfg) is None
    assert critique_stage.critique_reason("  ", cfg).startswith("empty_critique:")
    assert critique_stage.critique_reason("No issues.", cfg).startswith("no_issues:")
    assert critique_stage.critique_reason("No issues.", CritiqueConfig(reject_no_issues=False)) is None


PROMPT = "a red apple on a wooden table"
CRITIQUE = "The apple is green instead of red. A blue cup appears that the prompt does not ask for."


class TestInstructGuards:
    def check(self, text, finished=True, **cfg):
        config = InstructConfig(**cfg)
        return instruct_stage.check_text(text, finished, PROMPT, CRITIQUE, config)

    def test_grounded_list_is_kept(self):
        c = self.check("- Change the apple from green to red\n- Remove the blue cup")
        assert c.items == ["Change the apple from green to red", "Remove the blue cup"] and not c.dropped
        assert instruct_stage.finish(c, InstructConfig()) is None

    def test_stray_and_vague_instructions_are_dropped_with_reasons(self):
        c = self.check("- Remove the blue cup\n- Add a cat playing with a ball\n- Fix it")
        assert c.items == ["Remove the blue cup"]
        assert c.dropped == ["Add a cat playing with a ball", "Fix it"]
        assert c.reasons[0].startswith("ungrounded: 0.00 of its content words")  # {cat, playing, ball}: none
        assert c.reasons[1].startswith("vague_instruction:")
        assert instruct_stage.finish(c, InstructConfig()) is None
        assert instruct_stage.finish(c, InstructConfig(on_guard_fail="reject_row")).startswith("ungrounded:")

    def test_grounding_threshold_is_inclusive_and_can_be_turned_off(self):
        # {apple, cat}: 1/2 in prompt+critique
        assert self.check("- Put a cat next to the apple", min_grounding=0.5).items == ["Put a cat next to the apple"]
        assert self.check("- Put a cat next to the apple", min_grounding=0.6).items == []
        assert self.check("- Add a cat", min_grounding=0).items == ["Add a cat"]

    def test_one_step_grounds_on_the_prompt_only(self):
        kept_two_step = self.check("- Remove the blue cup")
        kept_one_step = self.check("- Remove the blue cup", one_step=True)
        assert kept_two_step.items == ["Remove the blue cup"]
        assert kept_one_step.items == [] and "in the prompt (" in kept_one_step.reasons[0]

    def test_truncated_output_loses_its_last_instruction(self):
        c = self.check("- Remove the blue cup\n- Change the apple from green to", finished=False)
        assert c.items == ["Remove the blue cup"]
        assert c.dropped == ["Change the apple from green to"] and c.reasons[0].startswith("truncated:")
        assert instruct_stage.finish(c, InstructConfig(on_guard_fail="reject_row")) is None  # not a guard failure
        only = self.check("- Change the apple from green to", finished=False)
        assert only.reject.startswith("truncated:")
        assert self.check("- Remove the blue cup", finished=False, drop_truncated=False).items == ["Remove the blue cup"]

    @pytest.mark.parametrize("text,code", [
        ("", "no_instructions"),
        ('["Remove the cup", ', "unparseable_instructions"),
        ("- " + "red apple " * 30, "overlong_instruction"),
        ("\n".join(f"- Remove apple {k}" for k in range(6)), "too_many_instructions"),
    ])
    def test_unusable_lists_reject_the_row_and_name_why(self, text, code):
        c = self.check(text)
        assert instruct_stage.finish(c, InstructConfig()).split(":")[0] == code

    def test_everything_dropped_rejects_the_row(self):
        c = self.check("- Add a cat\n- Add a dog")
        assert instruct_stage.finish(c, InstructConfig()).startswith("no_instructions_left:")

    def test_one_step_prompt_never_contains_the_critique(self):
        for one_step in (False, True):
            cfg = InstructConfig(one_step=one_step)
            text = instruct_stage.instruct_prompt(load_template(instruct_stage.template_name(cfg)), PROMPT, CRITIQUE, cfg)
            assert PROMPT in text
            assert (CRITIQUE in text) is (not one_step)
        assert instruct_stage.template_name(InstructConfig(one_step=True)) == "instruct_onestep_v1"


def test_one_step_is_one_config_value_and_changes_the_cache_key():
    from richpref.schemas.config import config_hash

    two, one = Profile(name="t"), Profile(name="t", instruct=InstructConfig(one_step=True))
    assert config_hash(two.instruct) != config_hash(one.instruct)
    assert instruct_stage.STAGE.key_extra(two) != instruct_stage.STAGE.key_extra(one)
    # The visibility question's template is part of the key only while the check is on.
    off = Profile(name="t", instruct=InstructConfig(min_visible=0))
    assert len(instruct_stage.STAGE.key_extra(two).split(":")) == 2
    assert len(instruct_stage.STAGE.key_extra(off).split(":")) == 1


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


def test_old_filter_template_needs_the_attribute_check_off():
    with pytest.raises(ValueError, match="min_attributes_kept=0"):
        filter_stage.load_filter_template(FilterConfig(template="filter_v1"))
    assert "attributes" not in filter_stage.load_filter_template(FilterConfig(template="filter_v1", min_attributes_kept=0))


# =========================================================================== part 2: tiny models


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    from richpref.models.tiny.vlm import build_tiny_llava_onevision, build_tiny_qwen2_5_vl
    from richpref.models.vlm import VisionLanguageModel

    root = tmp_path_factory.mktemp("vlms")
    models = {
        "critic": VisionLanguageModel.load(str(build_tiny_llava_onevision(root / "critic", seed=2)), device="cpu"),
        "qwen": VisionLanguageModel.load(str(build_tiny_qwen2_5_vl(root / "qwen", seed=3)), device="cpu"),
    }
    yield models
    for m in models.values():
        m.close()


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


PROMPTS = ["a red apple on a wooden table", "two dogs playing near a lake", "a blue car in front of a white house"]


def test_critique_rows_on_the_tiny_critic(vlms):
    vlm = vlms["critic"]
    cfg = CritiqueConfig(max_new_tokens=8, batch_size=2)
    rows = pa.table({"item_id": ["a", "b", "c", "bad"], "prompt": PROMPTS + ["x"]})
    images = [encode_png(image(k)) for k in range(3)] + [b"not an image"]
    out = critique_stage.critique_rows(rows, images, cfg, lambda: vlm)
    assert out.schema == CRITIQUES and out.column("item_id").to_pylist() == ["a", "b", "c", "bad"]
    rec = out.to_pylist()
    assert rec[3]["status"] == "rejected" and rec[3]["reason"].startswith("bad_image:")
    template = load_template("critique_v2")
    want = vlm.generate([image(k) for k in range(3)], [render(template, prompt=p) for p in PROMPTS], max_new_tokens=8)
    for r, text in zip(rec[:3], want):
        assert r["raw"] == text and r["template"] == "critique_v2"
        assert (r["status"] == "ok") == (critique_stage.critique_reason(text, cfg) is None)


def instruct_input(n=3):
    rows = pa.table({"item_id": [f"i{k}" for k in range(n)], "prompt": PROMPTS[:n],
                     "critique": ["The apple is green.", "Only one dog.", "The car is red."][:n]})
    return rows, [encode_png(image(10 + k)) for k in range(n)]


def test_instruct_rows_record_every_guard_decision(vlms):
    vlm = vlms["qwen"]
    rows, images = instruct_input()
    cfg = InstructConfig(max_new_tokens=10, batch_size=3)
    out = instruct_stage.instruct_rows(rows, images, cfg, lambda: vlm)
    assert out.schema == INSTRUCTIONS
    gens = vlm.generate_detailed([image(10 + k) for k in range(3)],
                                 [instruct_stage.instruct_prompt(load_template("instruct_v1"), p, c, cfg)
                                  for p, c in zip(PROMPTS, rows.column("critique").to_pylist())], max_new_tokens=10)
    for r, g, crit in zip(out.to_pylist(), gens, rows.column("critique").to_pylist()):
        assert r["raw"] == g.text and r["truncated"] is (not g.finished)
        # Everything the model wrote is accounted for: kept or dropped with a reason (or the row rejected).
        parsed = instruct_stage.instruction_items(g.text)
        assert len(r["dropped_instructions"]) == len(r["drop_reasons"])
        if r["status"] == "ok":
            assert sorted((r["instructions"] or []) + r["dropped_instructions"]) == sorted(parsed)
        else:
            assert r["reason"].split(":")[0] in {"truncated", "no_instructions", "no_instructions_left", "ungrounded",
                                                  "vague_instruction", "overlong_instruction", "too_many_instructions",
                                                  "unparseable_instructions", "contradicts_prompt", "no_edit_needed"}


def test_instruct_rows_keep_the_parsed_list_when_guards_are_off(vlms):
    vlm = vlms["qwen"]
    rows, images = instruct_input()
    cfg = InstructConfig(max_new_tokens=10, batch_size=2, min_grounding=0, min_visible=0, drop_truncated=False,
                         drop_contradictions=False, drop_vague=False, max_instruction_chars=500)
    out = instruct_stage.instruct_rows(rows, images, cfg, lambda: vlm).to_pylist()
    texts = vlm.generate([image(10 + k) for k in range(3)],
                         [instruct_stage.instruct_prompt(load_template("instruct_v1"), p, c, cfg)
                          for p, c in zip(PROMPTS, rows.column("critique").to_pylist())], max_new_tokens=10)
    for r, text in zip(out, texts):
        assert r["status"] == "ok", r
        assert r["instructions"] == instruct_stage.instruction_items(text) and r["dropped_instructions"] == []


def test_one_step_rows_use_their_template(vlms):
    rows, images = instruct_input(1)
    cfg = InstructConfig(one_step=True, max_new_tokens=6, min_grounding=0, min_visible=0, drop_truncated=False)
    [r] = instruct_stage.instruct_rows(rows, images, cfg, lambda: vlms["qwen"]).to_pylist()
    assert r["template"] == "instruct_onestep_v1"
    text = vlms["qwen"].generate([image(10)], [render(load_template("instruct_onestep_v1"), prompt=PROMPTS[0],
                                                      max_instructions=5)], max_new_tokens=6)[0]
    assert r["raw"] == text


@pytest.mark.parametrize("min_visible,dropped", [(0.01, False), (0.99, True)])
def test_visibility_check_asks_the_vlm_about_each_target(vlms, min_visible, dropped):
    vlm = vlms["qwen"]
    img = image(20)
    checked = [instruct_stage.Checked(items=["Remove the red apple", "Add a small boat"])]
    instruct_stage.drop_invisible(vlm, [img], checked, InstructConfig(min_visible=min_visible))
    p = float(vlm.p_yes([img], [render(load_template("instruct_visible_v1"), target="the red apple")])[0])
    assert "Add a small boat" in checked[0].items  # additive: never looked for
    if dropped:
        assert checked[0].dropped == ["Remove the red apple"]
        assert checked[0].reasons == [f"not_visible: P(yes)={p:.3f} that the image shows 'the red apple' "
                                      f"(< instruct.min_visible=0.99)"]
    else:
        assert checked[0].items == ["Remove the red apple", "Add a small boat"] and not checked[0].dropped


def filter_input(n=3):
    rows = pa.table({"item_id": [f"f{k}" for k in range(n)], "candidate": pa.array([0] * n, pa.int32())})
    instructions = [["Make the apple red", "Remove the blue cup"], ["Add a second dog"], ["Turn the car blue"]][:n]
    images = {
        "original": [encode_png(image(30 + k)) for k in range(n)],
        "edited": [encode_png(image(40 + k)) for k in range(n)],
        "original_cutout": [encode_png(image(50 + k, (48, 64))) for k in range(n)],
        "edited_cutout": [encode_png(image(60 + k, (48, 64))) for k in range(n)],
    }
    return rows, PROMPTS[:n], instructions, images


def test_filter_probabilities_are_the_models_answers(vlms):
    from richpref.images import decode_image, side_by_side

    vlm = vlms["qwen"]
    rows, prompts, instructions, images = filter_input()
    cfg = FilterConfig(max_new_tokens=8, batch_size=4, min_executed=0, min_no_stray=0, min_subject_kept=0,
                       min_attribute_present=0.5, min_attributes_kept=0.01)
    out = filter_stage.filter_rows(rows, prompts, instructions, images, cfg, lambda: vlm)
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
    cfg = FilterConfig(max_new_tokens=8, min_executed=0, min_no_stray=0, min_subject_kept=0,
                       min_attribute_present=0.5, min_attributes_kept=0.01)
    out = filter_stage.filter_rows(two, prompts * 2, instructions * 2, images2, cfg, lambda: Recording()).to_pylist()
    assert calls == [("generate", 1)]
    assert [r["candidate"] for r in out] == [0, 1]
    assert out[0]["attributes"] == out[1]["attributes"] and out[0]["p_attr_original"] == out[1]["p_attr_original"]
    [alone] = filter_stage.filter_rows(rows, prompts, instructions, images, cfg, lambda: vlm).to_pylist()
    # the same verdict as the edit alone (batched CPU matmuls move probabilities by ~1e-8)
    assert (alone["attributes"], alone["checks"], alone["status"]) == (out[0]["attributes"], out[0]["checks"], out[0]["status"])
    for key in ("p_executed", "p_no_stray", "p_subject_kept"):
        assert alone[key] == pytest.approx(out[0][key], abs=1e-6)
    np.testing.assert_allclose(alone["p_attr_original"], out[0]["p_attr_original"], atol=1e-6)


def test_filter_names_every_failed_check(vlms):
    rows, prompts, instructions, images = filter_input(2)
    cfg = FilterConfig(max_new_tokens=6, min_executed=1.0, min_no_stray=1.0, min_subject_kept=1.0,
                       min_attribute_present=0.0, min_attributes_kept=1.0, executed_reduce="min")
    out = filter_stage.filter_rows(rows, prompts, instructions, images, cfg, lambda: vlms["qwen"]).to_pylist()
    for r in out:
        assert r["status"] == "rejected" and r["verdict"] == "drop"
        codes = [part.split(":")[0] for part in r["reason"].split("; ")]
        assert codes[:3] == ["not_executed", "stray_content", "subject_changed"]
        assert r["p_executed"] == pytest.approx(min(r["p_executed_each"]))
        checks = json.loads(r["checks"])
        # P(present) >= 0 always holds: every non-exempt attribute is checked and kept -> the check passes.
        assert checks["attributes"] in ("pass",) or checks["attributes"].startswith("skipped")


def test_filter_without_the_attribute_check_generates_nothing(vlms):
    rows, prompts, instructions, images = filter_input(1)
    cfg = FilterConfig(min_attributes_kept=0, min_executed=0, min_no_stray=0, min_subject_kept=0)
    [r] = filter_stage.filter_rows(rows, prompts, instructions, images, cfg, lambda: vlms["qwen"]).to_pylist()
    assert r["status"] == "ok" and r["attributes"] is None
    assert json.loads(r["checks"])["attributes"] == "skipped: filter.min_attributes_kept=0"


def test_bad_images_are_rejected_without_loading_a_model():
    rows, prompts, instructions, images = filter_input(1)
    images["edited"] = [b""]

    def no_model():
        raise AssertionError("no row needs the model")

    [r] = filter_stage.filter_rows(rows, prompts, instructions, images, FilterConfig(), no_model).to_pylist()
    assert r["status"] == "rejected" and r["reason"].startswith("bad_image:")


@pytest.mark.parametrize("min_faithful,dropped", [(0.01, False), (0.99, True)])
def test_faithfulness_check_asks_the_vlm_about_each_instruction(vlms, min_faithful, dropped):
    vlm = vlms["qwen"]
    img = image(21)
    checked = [instruct_stage.Checked(items=["Remove the red apple", "Add a small boat"]),
               instruct_stage.Checked(reject="no_instructions: nothing")]  # rejected rows are not asked about
    cfg = InstructConfig(min_faithful=min_faithful)
    instruct_stage.drop_unfaithful(vlm, [img, img], [PROMPT, PROMPT], checked, cfg)
    question = load_template("instruct_faithful_v1")
    p = vlm.p_yes([img, img], [render(question, prompt=PROMPT, instruction=s) for s in ["Remove the red apple", "Add a small boat"]])
    if dropped:
        assert checked[0].dropped == ["Remove the red apple", "Add a small boat"] and not checked[0].items
        assert checked[0].reasons[1] == (f"judged_unfaithful: P(yes)={float(p[1]):.3f} that it serves the prompt "
                                         f"without contradicting it (< instruct.min_faithful=0.99)")
    else:
        assert checked[0].items == ["Remove the red apple", "Add a small boat"] and not checked[0].dropped
    assert checked[1].dropped == []


def test_faithfulness_check_runs_in_the_stage_and_keys_its_template(vlms):
    rows, images = instruct_input(2)
    cfg = InstructConfig(max_new_tokens=10, min_grounding=0, min_visible=0, drop_truncated=False, drop_contradictions=False,
                         drop_vague=False, max_instruction_chars=500, min_faithful=0.999)
    out = instruct_stage.instruct_rows(rows, images, cfg, lambda: vlms["qwen"]).to_pylist()
    for r in out:  # a random model is never that sure: every instruction is judged and dropped
        assert r["status"] == "rejected" and r["reason"].startswith("no_instructions_left: every instruction was dropped (judged_unfaithful")
    on = Profile(name="t", instruct=InstructConfig(min_faithful=0.5))
    assert len(instruct_stage.STAGE.key_extra(on).split(":")) == 3
