"""The instruct stage (richpref/tasks/instruct.py): its guards and the one-step variant on fixed
strings (random-weight models cannot write an instruction about an apple), then instruct rows and
the visibility and faithfulness questions on the tiny Qwen2.5-VL, checked against direct calls of the
model. The text guards on a corpus of realistic answers: tests/tasks/test_instruction_guards.py; list
parsing, grounding and edit targets: tests/tasks/test_vlm_text.py."""
from __future__ import annotations

import pytest

from richpref.prompts import load_template, render
from richpref.schemas.config import InstructConfig, Profile
from richpref.schemas.tables import INSTRUCTIONS
from richpref.tasks import instruct as instruct_stage
from vlm_helpers import PROMPTS, image, instruct_input


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

    def test_size_limits_are_inclusive(self):
        item = "Remove the blue cup"
        assert self.check(f"- {item}", max_instruction_chars=len(item)).reject is None
        assert self.check(f"- {item}", max_instruction_chars=len(item) - 1).reject.startswith("overlong_instruction:")
        three = "- Remove the blue cup\n- Make the apple red\n- Remove the cup"
        assert self.check(three, max_instructions=3).reject is None
        assert self.check(three, max_instructions=2).reject.startswith("too_many_instructions: 3")

    def test_a_no_edit_answer_rejects_the_row_only_when_nothing_else_is_an_edit(self):
        alone = self.check("- No edits are needed.\n- These changes make the apple match the prompt.")
        assert alone.reject.startswith("no_edit_needed:")  # a no-edit answer and a remark: nothing to edit
        mixed = self.check("- No edits are needed.\n- Remove the blue cup")
        assert mixed.reject is None and mixed.items == ["Remove the blue cup"]
        assert mixed.reasons[0].startswith("no_edit_needed:")

    def test_a_remark_is_dropped_after_the_first_item_only(self):
        # "This apple should be red" reads as a remark, but a list's first item is the model's first edit
        c = self.check("- This apple should be red\n- Remove the blue cup\n- This keeps the scene faithful to the prompt.")
        assert c.items == ["This apple should be red", "Remove the blue cup"]
        assert c.reasons == ["commentary: a remark about the edits, not an edit"]

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


def test_a_yes_no_question_left_unanswered_rejects_its_row_with_the_reason():
    """A served VLM whose request failed for good answers no P(yes): the row is rejected naming why,
    not kept as if its instructions had passed."""
    from richpref.models.vlm import YesNo

    class Answers:  # the VLM's yes_no as a served engine returns it after its retries
        def yes_no(self, images, questions, batch_size):
            return [YesNo(0.9, "logprobs"), YesNo(None, "logprobs", error="server_error: 503 after 4 tries")]

    checked = [instruct_stage.Checked(items=["Remove the blue cup"]), instruct_stage.Checked(items=["Make it red"])]
    asks = [(0, 0, "is there a cup?"), (1, 0, "is it red?")]
    instruct_stage.ask_and_drop(Answers(), ["img0", "img1"], checked, asks, 0.5, 2, lambda j, p: "low")
    assert checked[0].reject is None and checked[0].items == ["Remove the blue cup"]
    assert checked[1].reject == "server_error: 503 after 4 tries"
