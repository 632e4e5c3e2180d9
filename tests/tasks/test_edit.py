"""The edit stage (richpref/tasks/edit.py): the guard against blank and unchanged edits, the edit
prompt, edit rows on the tiny SD1.5 and SDXL ControlNets, several candidates per item with distinct
seeds. The editors `edit.kind` picks: tests/models/test_editor.py; the backends: tests/scenarios/test_image_backends.py."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from image_helpers import _arr, _png, _scene, _seed_by_hand
from richpref.common.images import encode_png
from richpref.schemas.config import EditConfig
from richpref.schemas.tables import EDITS, INSTRUCTIONS, rows_to_table
from richpref.tasks.edit import edit_prompt, edit_rows, guard_reason, load_editor


def test_guard_rejects_blank_and_unchanged_edits():
    original = _scene(fg=(240, 200, 40))
    assert guard_reason(original, original.copy(), 0.01).startswith("no_visible_change:")
    assert guard_reason(original, Image.new("RGB", (64, 64), (30, 60, 90)), 0.01).startswith("blank_edit:")
    # Every channel of every pixel 10 levels brighter: mean |Δ| / 255 = 10 / 255 = 0.0392.
    brighter = Image.fromarray((np.asarray(original, dtype=np.int16) + 10).clip(0, 255).astype(np.uint8))
    assert (np.asarray(original) <= 245).all()  # so no channel clips and the change is exactly 10
    assert guard_reason(original, brighter, 0.039) is None
    assert guard_reason(original, brighter, 0.040) == "no_visible_change: mean change 0.0392 < edit.min_pixel_change=0.04"
    # One grey level of noise is "flat" only below a standard deviation of 1.
    speckle = np.full((64, 64, 3), 128, np.uint8)
    speckle[::2] = 131  # half the rows 3 levels up: std = 1.5
    assert guard_reason(original, Image.fromarray(speckle), 0.01) is None
    # flat in two channels, not in the third (a red gradient): an image
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 4
    assert guard_reason(original, Image.fromarray(red), 0.01) is None


def test_edit_prompt_join_and_instruction_only():
    cfg = EditConfig()
    assert edit_prompt("a cat", ["make it red", "add a hat"], cfg) == "a cat, make it red, add a hat"
    assert edit_prompt("a cat", ["make it red", "  "], cfg.model_copy(update={"joiner": "; "})) == "a cat; make it red"
    assert edit_prompt("a cat", ["make it red", "add a hat"], cfg.model_copy(update={"prompt_mode": "instructions_only"})) \
        == "make it red, add a hat"


def _edit_inputs(n: int = 3):
    rows = rows_to_table(
        [{"item_id": f"e{i}", "status": "ok", "reason": None, "prompt": "a ball", "instructions": ["make it blue"]}
         for i in range(n)] + [{"item_id": "bad", "status": "ok", "reason": None, "prompt": "a ball",
                                "instructions": ["make it blue"]},
                               {"item_id": "none", "status": "ok", "reason": None, "prompt": "a ball",
                                "instructions": ["  ", ""]}],
        INSTRUCTIONS,
    ).select(["item_id", "prompt", "instructions"])
    originals = [encode_png(_scene(bg=(30 + 40 * i, 60, 90))) for i in range(n)] + [b"not an image", encode_png(_scene())]
    return rows, originals


@pytest.mark.parametrize("model,controlnet", [("sd15", "controlnet-canny"), ("sdxl", "controlnet-sdxl")])
def test_edit_rows_on_tiny_models(model, controlnet, paths, release_resident):
    cfg = EditConfig(model=model, controlnet=controlnet, steps=4, seed=5, batch_size=2, device="cpu", dtype="float32")
    rows, originals = _edit_inputs()
    get = lambda: load_editor(cfg, str(paths.root))  # noqa: E731
    out = edit_rows(rows, originals, cfg, get)
    assert out.schema == EDITS
    by_id = {r["item_id"]: r for r in out.to_pylist()}
    assert by_id["bad"]["status"] == "rejected" and by_id["bad"]["reason"].startswith("bad_image:")
    assert by_id["bad"]["edit_prompt"] == "a ball, make it blue"  # what it would have been edited with
    assert by_id["none"]["reason"] == "no_instructions: nothing to edit with"  # blank instructions are none
    for i in range(3):
        r = by_id[f"e{i}"]
        assert r["status"] == "ok", r["reason"]
        assert r["edit_prompt"] == "a ball, make it blue" and r["control"] == "canny"
        assert r["seed"] == _seed_by_hand(5, f"e{i}")
        assert (r["width"], r["height"]) == (64, 64) == _png(r["image"]).size
        assert r["pixel_change"] == pytest.approx(
            np.abs(_arr(_png(r["image"]).convert("RGB")) - _arr(_png(originals[i]).convert("RGB"))).mean() / 255, abs=1e-6)
        assert controlnet in r["model_id"]
    again = edit_rows(rows, originals, cfg, get)
    assert again.column("image").to_pylist() == out.column("image").to_pylist()
    if model != "sd15":
        return  # the guard's wiring below is model-independent: checked once
    # The guard's threshold reaches the rows: nothing changes by more than 100%.
    strict = edit_rows(rows, originals, cfg.model_copy(update={"min_pixel_change": 1.0}), get).to_pylist()
    assert {r["reason"].split(":")[0] for r in strict if r["item_id"].startswith("e")} == {"no_visible_change"}


def test_several_edit_candidates_per_item_with_distinct_seeds(paths, release_resident):
    cfg = EditConfig(model="sd15", controlnet="controlnet-canny", steps=4, seed=5, batch_size=2, device="cpu",
                     dtype="float32", num_edits=3)
    rows, originals = _edit_inputs(n=2)
    get = lambda: load_editor(cfg, str(paths.root))  # noqa: E731
    out = edit_rows(rows, originals, cfg, get).to_pylist()
    # three rows per input row, in input order, whatever happened to the item
    assert [(r["item_id"], r["candidate"]) for r in out] == [(i, c) for i in ("e0", "e1", "bad", "none") for c in range(3)]
    assert {r["reason"] for r in out if r["item_id"] == "none"} == {"no_instructions: nothing to edit with"}
    assert all(r["reason"].startswith("bad_image:") for r in out if r["item_id"] == "bad")
    for item in ("e0", "e1"):
        cands = [r for r in out if r["item_id"] == item]
        assert [r["seed"] for r in cands] == [_seed_by_hand(5, item), _seed_by_hand(5, f"{item}#edit1"),
                                              _seed_by_hand(5, f"{item}#edit2")]
        images = [_arr(_png(r["image"]).convert("RGB")) for r in cands]
        for a in range(3):
            for b in range(a + 1, 3):
                assert np.abs(images[a] - images[b]).mean() > 1.0, (item, a, b)
    # candidate 0 is the one-edit run's image: same seed, same batch composition per candidate index
    one = edit_rows(rows, originals, cfg.model_copy(update={"num_edits": 1, "batch_size": 1}), get).to_pylist()
    alone = edit_rows(rows, originals, cfg.model_copy(update={"batch_size": 1}), get).to_pylist()
    assert [r["image"] for r in alone if r["candidate"] == 0] == [r["image"] for r in one]
