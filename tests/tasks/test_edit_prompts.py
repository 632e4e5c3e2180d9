"""Edit prompts past a text encoder's limit (tasks/edit_prompts.py): instructions that do not reach
the editor are left out (`cap`) or marked past the encoder's cut (`truncate`), recorded with a reason,
and not asked about by check (tests/tasks/test_check.py)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from richpref.schemas.config import EditConfig, load_profile
from richpref.tasks.edit_prompts import edit_prompt, fit_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _words(limit):
    """A counter that reads words, with a start and an end token, as CLIP counts its 77."""
    return lambda text: [("words", len(text.replace(",", " ").split()) + 2, limit)]


def test_a_prompt_that_fits_is_given_whole():
    f = fit_prompt("a cat", ["make it red", "add a hat"], EditConfig(), _words(77))
    assert (f.text, f.used, f.dropped, f.note, f.reject) == ("a cat, make it red, add a hat", ["make it red", "add a hat"],
                                                              [], None, None)
    # exactly at the encoder's limit (8 words + 2 tokens = 10) it still fits; a blank instruction is no step
    exact = fit_prompt("a cat", ["make it red", "  ", "add a hat"], EditConfig(), _words(10))
    assert (exact.text, exact.used, exact.note) == (f.text, f.used, None)


def test_cap_keeps_the_leading_instructions_that_fit_and_records_the_rest():
    steps = ["make it red", "add a hat", "remove the dog", "paint the sky"]
    f = fit_prompt("a cat", steps, EditConfig(), _words(12))  # 2 + 3 + 3 = 8 words + 2 <= 12; 3 more: 13
    assert f.text == "a cat, make it red, add a hat" and f.used == steps[:2] and f.dropped == steps[2:]
    assert f.note.startswith("over_token_limit: instructions 3..4 left out of the prompt (words reads 12 tokens, the whole prompt has 16)")
    t = fit_prompt("a cat", steps, EditConfig(long_prompt="truncate"), _words(12))
    assert t.text == "a cat, make it red, add a hat, remove the dog, paint the sky"  # the encoder cuts it
    assert t.used == steps[:2] and t.dropped == steps[2:] and t.note.startswith("cut_by_encoder: instructions 3..4")
    one = fit_prompt("a cat", steps, EditConfig(), _words(14))
    assert one.dropped == steps[3:] and one.note.startswith("over_token_limit: instruction 4 left out")


def test_no_instruction_fitting_rejects_the_row():
    f = fit_prompt("a very long prompt " * 10, ["make it red", "add a hat"], EditConfig(), _words(12))
    assert f.reject == ("prompt_too_long: no instruction fits the text encoder "
                        "(words reads 12 tokens, the whole prompt has 48)")  # 40 + 3 + 3 words + 2
    assert f.used == [] and f.dropped == ["make it red", "add a hat"] and f.text.endswith("prompt , make it red, add a hat")


def test_the_edit_prompt_is_the_prompt_and_its_instructions_or_the_instructions_alone():
    steps = ["make it red", " ", "", "add a hat"]
    assert edit_prompt("a cat", steps, EditConfig()) == "a cat, make it red, add a hat"
    assert edit_prompt("a cat", steps, EditConfig(joiner=". ")) == "a cat. make it red. add a hat"
    alone = EditConfig(prompt_mode="instructions_only")
    assert edit_prompt("a cat", steps, alone) == "make it red, add a hat"
    f = fit_prompt("a cat", ["make it red", "add a hat"], alone, _words(6))  # 3 words + 2 fit, 6 + 2 do not
    assert (f.text, f.used, f.dropped) == ("make it red", ["make it red"], ["add a hat"])


def test_an_edit_prompt_past_77_clip_tokens_drops_and_records_its_last_instructions(tiny_models):
    from richpref.tasks.edit import edit_rows, load_editor

    cfg = load_profile("tiny", ["edit.device=cpu", "edit.dtype=float32", "edit.steps=2"]).edit
    editor = load_editor(cfg, str(tiny_models))
    tok = editor.pipe.tokenizer
    assert tok.model_max_length == 77
    steps = [f"make the {c} ball in the {p} corner shiny and bright with a soft shadow under it" for c, p in
             [("red", "left"), ("blue", "right"), ("green", "top"), ("yellow", "bottom"), ("white", "middle")]]
    whole = "a picture of balls, " + ", ".join(steps)
    assert len(tok(whole)["input_ids"]) > 77  # CLIP would cut it
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    rows = pa.table({"item_id": ["a"], "prompt": ["a picture of balls"], "instructions": [steps]})
    row = edit_rows(rows, [buf.getvalue()], cfg, lambda: editor).to_pylist()[0]
    assert row["dropped_instructions"] and row["edit_instructions"] + row["dropped_instructions"] == steps
    assert len(tok(row["edit_prompt"])["input_ids"]) <= 77  # every instruction it names reaches the encoder
    assert row["edit_prompt"] == "a picture of balls, " + ", ".join(row["edit_instructions"])
    assert row["prompt_note"].startswith("over_token_limit:") and "tokenizer (CLIPTokenizer" in row["prompt_note"]
    short = edit_rows(rows.set_column(2, "instructions", pa.array([steps[:1]])), [buf.getvalue()], cfg,
                      lambda: editor).to_pylist()[0]
    assert short["edit_instructions"] == steps[:1] and short["dropped_instructions"] == [] and short["prompt_note"] is None


def test_kontext_and_qwen_count_with_their_own_encoders(tiny_models):
    from richpref.tasks.edit import load_editor

    kontext = load_editor(load_profile("tiny-flux-kontext", ["edit.device=cpu"]).edit, str(tiny_models))
    qwen = load_editor(load_profile("tiny-qwen-image-edit", ["edit.device=cpu"]).edit, str(tiny_models))
    long = "a cat, " + ", ".join(["make the fur a little more orange and fluffy"] * 8)  # past CLIP's 77
    [(name, n, limit)] = kontext.count_tokens(long)
    assert "T5" in name and limit == 512 and 77 < n <= 512
    [(name, n, limit)] = qwen.count_tokens(long)
    assert "Qwen2" in name and limit == 512 and n <= 512
