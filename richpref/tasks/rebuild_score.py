"""rewards (rebuild): the raw score of every sample under every reward the profile scores; nothing decided.

The rewards are the edit pipeline's (the `score:` section, loaded once per stage through the score
stage's reward set); their weights, the z-scores, pairing and ties are the `ranked` stage's
(`relabel:`), so changing a weight or the margin re-runs no reward model (the key is the `score:`
section, `scoring_view`). An undecodable image or a non-finite score rejects that sample with its reason.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from richpref.common.images import BadImage, decode_image
from richpref.tasks.pairing import scorer_dtype
from ..schemas.config import Profile, ScoreConfig
from ..schemas.tables import rows_to_table, sample_scores_schema
from .base import Stage, StageInputs, kept, rejected
from .score import digest, load_models, load_scorer, reward_models, scoring_view, templates_key


def score_samples(rows: pa.Table, cfg: ScoreConfig, get_scorer) -> pa.Table:
    """One row per sample row (item_id, candidate, prompt, image, seed), in input order."""
    names = cfg.scored()
    out: dict[int, dict] = {}
    todo, images = [], []
    records = rows.select(["item_id", "candidate", "prompt", "image", "seed"]).to_pylist()
    for k, r in enumerate(records):
        try:
            images.append(decode_image(r["image"]))
        except BadImage as exc:
            out[k] = rejected(r["item_id"], str(exc), candidate=r["candidate"], seed=r["seed"])
            continue
        todo.append(k)
    if todo:
        prompts = [records[k]["prompt"] for k in todo]
        raw, dtypes = {}, {}
        for name in names:
            scorer = get_scorer(name)
            dtypes[name] = scorer_dtype(scorer)
            raw[name] = np.asarray(scorer.score(images, prompts, batch_size=cfg.batch_size), dtype=np.float64)
            if raw[name].shape != (len(todo),):
                raise RuntimeError(f"reward {name!r} returned shape {raw[name].shape} for {len(todo)} images")
        for j, k in enumerate(todo):
            r = records[k]
            values = {"candidate": r["candidate"], "seed": r["seed"], "digest": digest(r["image"]),
                      "dtypes": json.dumps(dtypes, sort_keys=True), **{n: float(raw[n][j]) for n in names}}
            bad = [n for n in names if not np.isfinite(raw[n][j])]
            out[k] = (rejected(r["item_id"], f"bad_score: non-finite {', '.join(bad)} score", **values) if bad
                      else kept(r["item_id"], **values))
    return rows_to_table([out[k] for k in range(len(records))], sample_scores_schema(names))


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.score
    return score_samples(inputs.rows, cfg, lambda name: load_scorer(name, cfg, profile.models_root))


STAGE = Stage(name="rewards", version="1", section="score", reads=("samples",), compute=compute,
              key_extra=templates_key, config_view=scoring_view, schema=lambda p: sample_scores_schema(p.score.scored()),
              models=lambda p: reward_models(p, gate=False), load=lambda p: load_models(p, gate=False))
