"""export (rebuild): kept pairs of samples -> Pick-a-Pic (`caption`, `jpg_0`, `jpg_1`, `label_0`) + provenance.

jpg_0 is sample `candidate_0`, jpg_1 sample `candidate_1` (the lower index first, so either side can
win); `label_0` is 1 when jpg_0's composite reward is higher, else 0. Both images leave in one
encoding (`export.image_format`) at their sampled size. Provenance: the generator's model id, both
seeds, every raw and z-scored reward of both images (`scores`, JSON) and the profile's hash.
`critique`, `instructions`, `edit_prompt`, `editor` and `edit_mask` are null: nothing was edited.
"""
from __future__ import annotations

import json

import pyarrow as pa

from richpref.tasks.pair_images import pair_images, pair_quality
from ..schemas.config import Profile, profile_hash
from ..schemas.tables import REBUILD_PAIRS, rows_to_table
from .base import Stage, StageInputs

META = ("item_id", "status", "reason", "candidate", "candidate_0", "candidate_1", "seed_0", "seed_1", "chosen",
        "flipped", "margin")


def samples_by_key(samples: pa.Table) -> dict[tuple[str, int], dict]:
    cols = samples.select(["item_id", "candidate", "prompt", "image", "model_id"]).to_pylist()
    return {(r["item_id"], r["candidate"]): r for r in cols}


def export_pairs(ranked: pa.Table, samples: pa.Table, sources: pa.Table, profile: Profile) -> pa.Table:
    """One Pick-a-Pic row per kept ranked row, in order."""
    by_key = samples_by_key(samples)
    source_of = dict(zip(sources.column("item_id").to_pylist(), sources.column("source").to_pylist()))
    cfg, config_hash = profile.export, profile_hash(profile)
    score_cols = [c for c in ranked.schema.names if c not in META]
    out = []
    for r in ranked.to_pylist():
        if r["chosen"] not in (0, 1):
            raise ValueError(f"ranked row {r['item_id']} pair {r['candidate']} has chosen={r['chosen']!r}; expected 0 or 1")
        a, b = by_key[(r["item_id"], r["candidate_0"])], by_key[(r["item_id"], r["candidate_1"])]
        jpg_0, jpg_1 = pair_images(a["image"], b["image"], image_format=cfg.image_format, side0_is_source=False,
                                   quality=pair_quality(a["image"], cfg.jpeg_quality))
        out.append({
            "caption": a["prompt"], "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": 1 if r["chosen"] == 0 else 0,
            "item_id": r["item_id"], "source": source_of.get(r["item_id"]),
            "candidate": r["candidate"], "candidate_0": r["candidate_0"], "candidate_1": r["candidate_1"],
            "seed_0": r["seed_0"], "seed_1": r["seed_1"], "margin": r["margin"],
            "scores": json.dumps({c: r[c] for c in score_cols}, sort_keys=True),
            "model_ids": json.dumps({"sample": a["model_id"]}, sort_keys=True),
            "config_hash": config_hash,
        })
    return rows_to_table(out, REBUILD_PAIRS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    return export_pairs(inputs.rows, inputs.tables["samples"], inputs.tables["source"], profile)


# 2: a source JPEG turned by EXIF is re-encoded upright, not kept as stored (pair_images.py)
STAGE = Stage(name="rebuild_export", version="2", section="export", reads=("ranked", "samples", "source"),
              compute=compute, output="pairs", key_extra=lambda p: profile_hash(p), loads_model=False,
              schema=REBUILD_PAIRS)
