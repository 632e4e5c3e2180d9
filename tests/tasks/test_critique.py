"""The critique stage (richpref/tasks/critique.py): the reject rules on fixed strings, then critique
rows on the tiny LLaVA-OneVision critic checked against a direct call of the model. "No issues." on
fixed strings: tests/tasks/test_vlm_text.py."""
from __future__ import annotations

import pyarrow as pa

from richpref.common.images import encode_png
from richpref.prompts import load_template, render
from richpref.schemas.config import CritiqueConfig
from richpref.schemas.tables import CRITIQUES
from richpref.tasks import critique as critique_stage
from vlm_helpers import PROMPTS, image


def test_critique_reason():
    cfg = CritiqueConfig()
    assert critique_stage.critique_reason("The apple is green, not red.", cfg) is None
    assert critique_stage.critique_reason("  ", cfg).startswith("empty_critique:")
    assert critique_stage.critique_reason("No issues.", cfg).startswith("no_issues:")
    assert critique_stage.critique_reason("No issues.", CritiqueConfig(reject_no_issues=False)) is None


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
