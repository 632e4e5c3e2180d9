"""The cutout stage (richpref/tasks/cutout.py): masks, foreground ratios and white backgrounds per row,
an item's original cut once for all its edits, a missing model failing at once. The rembg sessions
themselves: tests/scenarios/test_image_backends.py."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from image_helpers import _arr, _png, _scene
from richpref.common.images import encode_png
from richpref.models.runtime import ModelNotAvailable
from richpref.models.tiny.rembg import MODEL_FILENAME
from richpref.schemas.config import CutoutConfig
from richpref.schemas.tables import CUTOUTS, EDITS, rows_to_table
from richpref.tasks.cutout import cutout_rows, load_remover


def test_cutout_rows_store_masks_and_ratios(paths, monkeypatch, release_resident):
    monkeypatch.setenv("U2NET_HOME", str(paths.rembg_home))
    cfg = CutoutConfig(model="u2net_custom", home="rembg", model_path=f"rembg/{MODEL_FILENAME}")
    get = lambda: load_remover(cfg, str(paths.root))  # noqa: E731
    ids = ["ok", "flat_edit", "undecodable"]
    rows = rows_to_table([{"item_id": i, "status": "ok", "reason": None, "candidate": 0} for i in ids], EDITS)
    originals = [encode_png(_scene()), encode_png(_scene()), encode_png(_scene())]
    edits = [encode_png(_scene(bg=(90, 30, 60))), encode_png(Image.new("RGB", (64, 64), (200, 200, 200))), b"\x89PNG"]
    out = cutout_rows(rows, originals, edits, cfg, get)
    assert out.schema == CUTOUTS
    by_id = {r["item_id"]: r for r in out.to_pylist()}
    ok = by_id["ok"]
    assert ok["status"] == "ok"
    for side, image in (("original", originals[0]), ("edited", edits[0])):
        mask = _png(ok[f"{side}_mask"])
        assert mask.mode == "L" and mask.size == (64, 64)
        assert ok[f"{side}_fg_ratio"] == pytest.approx((np.asarray(mask) >= 128).mean())
        assert 0.0 < ok[f"{side}_fg_ratio"] < 1.0
        # Background pixels (mask 0) of the cut-out are white.
        cut, m = _arr(_png(ok[f"{side}_cutout"]).convert("RGB")), np.asarray(mask)
        assert (cut[m == 0] == 255).all()
    flat = by_id["flat_edit"]  # a flat image has no foreground: a reason, not a crash
    assert flat["status"] == "rejected" and flat["edited_fg_ratio"] == 0.0
    assert flat["reason"] == "empty_foreground: edited foreground ratio 0.000 <= cutout.min_fg_ratio=0.0"
    assert by_id["undecodable"]["reason"].startswith("bad_image:")
    strict = cutout_rows(rows.slice(0, 1), originals[:1], edits[:1], cfg.model_copy(update={"min_fg_ratio": 0.99}), get)
    assert strict.column("reason").to_pylist()[0].startswith("empty_foreground: original foreground ratio")


def test_cutout_cuts_an_items_original_once_for_all_its_edits(paths, monkeypatch, release_resident):
    monkeypatch.setenv("U2NET_HOME", str(paths.rembg_home))
    cfg = CutoutConfig(model="u2net_custom", home="rembg", model_path=f"rembg/{MODEL_FILENAME}")
    remover = load_remover(cfg, str(paths.root))
    seen = []

    class Counting:
        model_id = remover.model_id

        def remove(self, images):
            seen.append(len(images))
            return remover.remove(images)

    rows = rows_to_table([{"item_id": "x", "status": "ok", "reason": None, "candidate": c} for c in (0, 2)], EDITS)
    original = encode_png(_scene())
    edits = [encode_png(_scene(bg=(90, 30, 60))), encode_png(_scene(bg=(20, 130, 60)))]
    out = cutout_rows(rows, [original, original], edits, cfg, lambda: Counting()).to_pylist()
    assert seen == [3]  # one original + two edits
    assert [r["candidate"] for r in out] == [0, 2] and all(r["status"] == "ok" for r in out)
    assert out[0]["original_cutout"] == out[1]["original_cutout"] and out[0]["edited_cutout"] != out[1]["edited_cutout"]


def test_cutout_stage_missing_model_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailable, match=r"'bria-rmbg' is not available.*bria-rmbg\.onnx"):
        load_remover(CutoutConfig(model="bria-rmbg", home=str(tmp_path / "home")), None)
    assert time.monotonic() - start < 10.0  # no download retries (minutes); the margin is for a loaded machine
