"""score, relabel and export of `pipeline: relabel_dataset`: a Pick-a-Pic pair's two images rescored
and `label_0` rewritten by the reward's order (richpref relabel-dataset).

jpg_0 plays the original and jpg_1 the edit of the curate pipeline's score and relabel functions
(`score_rows`, `decide_rows`), so the rules are the same: the raw scores first (`score`: model calls,
keyed by the scoring view only), then weights, per-shard z-scores and ties (`relabel`: no model
call), then the kept pairs in Pick-a-Pic format (`pairs`): `label_0` 1 when jpg_0 scores higher, the
source's label kept as `label_0_source`, the pair's `margin` and every score (`scores`, JSON), the
source's other columns as they are (but a `flipped` column, which follows the new label).
"""
from __future__ import annotations

import json

import pyarrow as pa

from ..schemas.config import Profile
from ..schemas.tables import reward_scores_schema, scores_schema
from .base import Stage, StageInputs
from .relabel import decide_rows
from .score import load_models, load_scorer, reward_models, score_rows, scoring_view, templates_key

# Columns of the relabel table that are not a score (they are not in the exported `scores`).
NOT_SCORES = ("item_id", "status", "reason", "chosen", "flipped", "margin", "candidate", "candidate_0", "candidate_1")


def score(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg, rows = profile.score, inputs.rows
    prompts = [c if isinstance(c, str) else "" for c in rows.column("caption").to_pylist()]
    images = {"original": rows.column("jpg_0").to_pylist(), "edited": rows.column("jpg_1").to_pylist()}
    return score_rows(rows.column("item_id").to_pylist(), prompts, images, cfg,
                      lambda name: load_scorer(name, cfg, profile.models_root))


def relabel(inputs: StageInputs, profile: Profile) -> pa.Table:
    return decide_rows(inputs.lookup("score", inputs.tables["score"].schema.names), profile.score, profile.relabel)


def export_pairs(decided: pa.Table, source: pa.Table) -> pa.Table:
    """One Pick-a-Pic row per kept relabel row, in order, with the source row's columns."""
    rows = source
    cols = {"caption": rows.column("caption"), "jpg_0": rows.column("jpg_0"), "jpg_1": rows.column("jpg_1"),
            "label_0": pa.array([1 if c == 0 else 0 for c in decided.column("chosen").to_pylist()], type=pa.int64())}
    cols.update({n: rows.column(n) for n in rows.schema.names
                 if n not in ("caption", "jpg_0", "jpg_1", "label_0", "item_id", "status", "reason")})
    cols["item_id"] = rows.column("item_id")
    if "label_0" in rows.schema.names:
        cols["label_0_source"] = rows.column("label_0").cast(pa.float64())
    cols["margin"] = decided.column("margin")
    if "flipped" in cols:  # a richpref export relabelled: its `flipped` must follow the new label, as margin does
        cols["flipped"] = decided.column("flipped")
    score_cols = [c for c in decided.schema.names if c not in NOT_SCORES]
    cols["scores"] = pa.array([json.dumps(r, sort_keys=True) for r in decided.select(score_cols).to_pylist()], type=pa.string())
    return pa.table(cols)


def export(inputs: StageInputs, profile: Profile) -> pa.Table:
    return export_pairs(inputs.rows, inputs.lookup("source", inputs.tables["source"].schema.names))


# 2: images decoded upright as their EXIF orientation says (common/images.py)
SCORE = Stage(name="pickapic_score", version="2", section="score", reads=("source",), compute=score, output="score",
              key_extra=templates_key, config_view=scoring_view,
              schema=lambda p: reward_scores_schema(p.score.scored()),
              models=lambda p: reward_models(p, gate=False), load=lambda p: load_models(p, gate=False))
RELABEL = Stage(name="pickapic_relabel", version="1", section="relabel", reads=("source", "score"), compute=relabel,
                output="relabel", loads_model=False, schema=lambda p: scores_schema(p.score.scored()))
EXPORT = Stage(name="pickapic_export", version="2", section="export", reads=("relabel", "source"), compute=export,
               output="pairs", config_view=lambda cfg: {}, loads_model=False,  # no export setting applies
               schema=pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                                 ("label_0", pa.int64()), ("item_id", pa.string()), ("margin", pa.float64()),
                                 ("scores", pa.string())]))
