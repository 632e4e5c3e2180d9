"""export: kept, relabelled pairs -> Pick-a-Pic format (`caption`, `jpg_0`, `jpg_1`, `label_0`) + provenance.

jpg_0 is the image relabel put on side 0 (`candidate_0`: -1 = the original, else the lower-numbered of
two edits) and jpg_1 the edit on side 1 (`candidate_1`); `label_0` is 1 when jpg_0 won (with the
original as jpg_0: a flipped pair), 0 when jpg_1 won. Both images leave at the edit's size in one
encoding (`export.image_format`), with `edit_mask`, the PNG mask of where they differ
(richpref/tasks/pair_images.py), read by the trainers as encoded bytes.
"""
from __future__ import annotations

import json
import math

import pyarrow as pa

from richpref.tasks.pair_images import edit_mask, pair_images, pair_quality
from ..schemas.config import ExportConfig, Profile, profile_hash
from ..schemas.tables import PAIRS, rows_to_table
from .base import Stage, StageInputs


SCORE_META = ("item_id", "status", "reason", "candidate", "candidate_0", "candidate_1", "chosen", "flipped", "margin")


def scores_json(row: dict, columns: list[str]) -> str:
    """The row's scores as strict JSON: a report-only reward's missing score (NaN) is null."""
    return json.dumps({c: None if isinstance(row[c], float) and not math.isfinite(row[c]) else row[c] for c in columns},
                      sort_keys=True, allow_nan=False)


def export_rows(scores: pa.Table, samples: pa.Table, edits: pa.Table, critiques: pa.Table, instructions: pa.Table,
                sources: pa.Table, config_hash: str, side0_edits: pa.Table | None = None,
                cfg: ExportConfig | None = None) -> pa.Table:
    """One pair per kept scores row. `edits` are the side-1 edits; `side0_edits` the side-0 edits
    where candidate_0 is an edit (null image elsewhere), else the original is jpg_0."""
    cfg = cfg or ExportConfig()
    out = []
    score_cols = [c for c in scores.schema.names if c not in SCORE_META]
    for k, r in enumerate(scores.to_pylist()):
        chosen = r["chosen"]
        if chosen not in (0, 1):
            raise ValueError(f"relabel row {r['item_id']} has chosen={chosen!r}; expected 0 or 1")
        model_ids = {"sample": samples["model_id"][k].as_py(), "critique": critiques["model_id"][k].as_py(),
                     "instruct": instructions["model_id"][k].as_py(), "edit": edits["model_id"][k].as_py()}
        original = samples["image"][k].as_py()
        is_original = r.get("candidate_0") is None or r["candidate_0"] < 0
        jpg_0, jpg_1 = pair_images(original if is_original else side0_edits["image"][k].as_py(), edits["image"][k].as_py(),
                                   image_format=cfg.image_format, side0_is_source=is_original,
                                   quality=pair_quality(original, cfg.jpeg_quality))
        out.append({
            "caption": samples["prompt"][k].as_py(),
            "jpg_0": jpg_0,
            "jpg_1": jpg_1,
            "edit_mask": edit_mask(jpg_0, jpg_1, threshold=cfg.mask_threshold, dilation=cfg.mask_dilation),
            "label_0": 1 if chosen == 0 else 0,
            "item_id": r["item_id"],
            "source": sources["source"][k].as_py(),
            "critique": critiques["critique"][k].as_py(),
            "instructions": instructions["instructions"][k].as_py(),
            "edit_prompt": edits["edit_prompt"][k].as_py(),
            "candidate_0": -1 if r.get("candidate_0") is None else r["candidate_0"],
            "candidate_1": r.get("candidate_1", r.get("candidate", 0)),
            "margin": r["margin"],
            "flipped": r["flipped"],
            "scores": scores_json(r, score_cols),
            "model_ids": json.dumps(model_ids, sort_keys=True),
            "config_hash": config_hash,
            "editor": edits["editor"][k].as_py(),
        })
    return rows_to_table(out, PAIRS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    look = inputs.lookup
    rows = inputs.rows
    # Rows pairing the original look up edit 0 (every item has one); that image is not used.
    side0 = [max(c, 0) for c in rows.column("candidate_0").to_pylist()]
    return export_rows(
        rows,
        look("sample", ["prompt", "image", "model_id"]),
        look("edit", ["image", "edit_prompt", "model_id", "editor"], candidates=rows.column("candidate_1").to_pylist()),
        look("critique", ["critique", "model_id"]),
        look("instruct", ["instructions", "model_id"]),
        look("source", ["source"]),
        profile_hash(profile),
        side0_edits=look("edit", ["image"], candidates=side0),
        cfg=profile.export,
    )


# 5: a source JPEG turned by EXIF is re-encoded upright, not kept as stored (pair_images.py)
STAGE = Stage(name="export", version="5", section="export", reads=("relabel", "sample", "edit", "critique", "instruct", "source"),
              compute=compute, output="pairs", key_extra=lambda p: profile_hash(p),
              loads_model=False, schema=PAIRS)
