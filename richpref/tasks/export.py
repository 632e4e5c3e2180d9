"""export: kept, relabelled pairs -> Pick-a-Pic format (`caption`, `jpg_0`, `jpg_1`, `label_0`) + provenance.

jpg_0 is the original image and jpg_1 the edit; `label_0` is 1 when the original won (a flipped pair),
0 when the edit won. Image bytes are stored as encoded, exactly as the Diffusion-DPO trainers read them.
"""
from __future__ import annotations

import json

import pyarrow as pa

from ..schemas.config import Profile, profile_hash
from ..schemas.tables import PAIRS, rows_to_table
from .base import Stage, StageInputs


def export_rows(scores: pa.Table, samples: pa.Table, edits: pa.Table, critiques: pa.Table, instructions: pa.Table,
                sources: pa.Table, config_hash: str) -> pa.Table:
    out = []
    score_cols = [c for c in scores.schema.names if c not in ("item_id", "status", "reason", "chosen", "flipped", "margin")]
    for k, r in enumerate(scores.to_pylist()):
        chosen = r["chosen"]
        if chosen not in (0, 1):
            raise ValueError(f"relabel row {r['item_id']} has chosen={chosen!r}; expected 0 or 1")
        model_ids = {"sample": samples["model_id"][k].as_py(), "critique": critiques["model_id"][k].as_py(),
                     "instruct": instructions["model_id"][k].as_py(), "edit": edits["model_id"][k].as_py()}
        out.append({
            "caption": samples["prompt"][k].as_py(),
            "jpg_0": samples["image"][k].as_py(),
            "jpg_1": edits["image"][k].as_py(),
            "label_0": 1 if chosen == 0 else 0,
            "item_id": r["item_id"],
            "source": sources["source"][k].as_py(),
            "critique": critiques["critique"][k].as_py(),
            "instructions": instructions["instructions"][k].as_py(),
            "edit_prompt": edits["edit_prompt"][k].as_py(),
            "margin": r["margin"],
            "flipped": r["flipped"],
            "scores": json.dumps({c: r[c] for c in score_cols}, sort_keys=True),
            "model_ids": json.dumps(model_ids, sort_keys=True),
            "config_hash": config_hash,
        })
    return rows_to_table(out, PAIRS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    look = inputs.lookup
    return export_rows(
        inputs.rows,
        look("sample", ["prompt", "image", "model_id"]),
        look("edit", ["image", "edit_prompt", "model_id"]),
        look("critique", ["critique", "model_id"]),
        look("instruct", ["instructions", "model_id"]),
        look("source", ["source"]),
        profile_hash(profile),
    )


STAGE = Stage(name="export", version="1", section="export", reads=("relabel", "sample", "edit", "critique", "instruct", "source"),
              compute=compute, output="pairs", key_extra=lambda p: profile_hash(p))
