"""relabel: score original and edit with every reward, standardise, combine, choose; flip when the edit loses.

Per reward the 2N scores of a shard (or the two of one item) are z-standardised, then combined with the
profile's weights. The higher composite is chosen; a pair whose margin is at or below
`relabel.min_margin` is a tie and dropped, so exported labels are always 0 or 1.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from ..images import BadImage, decode_image
from ..models.rewards import zscore
from ..models.runtime import resident, resolve_model_ref
from ..schemas.config import Profile, RelabelConfig
from ..schemas.tables import rows_to_table, scores_schema
from .base import Stage, StageInputs, kept, rejected


def load_scorer(name: str, cfg: RelabelConfig, models_root: str | None):
    from ..models.rewards import load_reward

    spec = cfg.rewards[name]
    path = resolve_model_ref(spec.model, models_root)
    return resident.get(("reward", spec.kind, path, cfg.device, cfg.dtype),
                        lambda: load_reward(spec.kind, path, device=cfg.device, dtype=cfg.dtype))


def combine(raw: dict[str, np.ndarray], cfg: RelabelConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """raw[name] has shape (n, 2): column 0 original, 1 edited. Returns z per reward and composites."""
    n = next(iter(raw.values())).shape[0]
    groups = np.repeat(np.arange(n), 2) if cfg.standardize == "item" else None
    z = {name: zscore(v.reshape(-1), groups).reshape(n, 2) for name, v in raw.items()}
    composite = sum(cfg.rewards[name].weight * z[name] for name in raw)
    return z, composite[:, 0], composite[:, 1]


def relabel_rows(rows: pa.Table, prompts: list, originals: list, edits: list, cfg: RelabelConfig, get_scorer) -> pa.Table:
    names = list(cfg.rewards)
    schema = scores_schema(names)
    out, todo = {}, []
    for iid, p, a, b in zip(rows.column("item_id").to_pylist(), prompts, originals, edits):
        try:
            todo.append((iid, p, decode_image(a), decode_image(b)))
        except BadImage as exc:
            out[iid] = rejected(iid, str(exc))
    raw: dict[str, np.ndarray] = {}
    for name in names:
        if not todo:
            break
        scorer = get_scorer(name)
        images = [a for _, _, a, _ in todo] + [b for _, _, _, b in todo]
        texts = [p for _, p, _, _ in todo] * 2
        s = np.asarray(scorer.score(images, texts, batch_size=cfg.batch_size), dtype=np.float64)
        raw[name] = np.stack([s[: len(todo)], s[len(todo):]], axis=1)
    # Non-finite scores cannot be ranked: reject those rows and standardise over the rest.
    finite = [all(np.isfinite(raw[n][k]).all() for n in names) for k in range(len(todo))]
    for k, (iid, *_x) in enumerate(todo):
        if not finite[k]:
            bad = [n for n in names if not np.isfinite(raw[n][k]).all()]
            out[iid] = rejected(iid, f"bad_score: non-finite {', '.join(bad)} score")
    good = [k for k in range(len(todo)) if finite[k]]
    if good:
        sub = {n: raw[n][good] for n in names}
        z, c0, c1 = combine(sub, cfg)
        for j, k in enumerate(good):
            iid = todo[k][0]
            values = {}
            for n in names:
                values.update({f"{n}_0": float(sub[n][j, 0]), f"{n}_1": float(sub[n][j, 1]),
                               f"{n}_z0": float(z[n][j, 0]), f"{n}_z1": float(z[n][j, 1])})
            margin = abs(float(c1[j]) - float(c0[j]))
            chosen = 1 if c1[j] > c0[j] else 0
            values.update(composite_0=float(c0[j]), composite_1=float(c1[j]), margin=margin)
            if margin <= cfg.min_margin or math.isclose(margin, 0.0, abs_tol=1e-12):
                out[iid] = rejected(iid, f"tie: composite margin {margin:.4g} <= relabel.min_margin", **values)
            else:
                out[iid] = kept(iid, chosen=chosen, flipped=chosen == 0, **values)
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], schema)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.relabel
    prompts = inputs.lookup("sample", ["prompt"]).column("prompt").to_pylist()
    originals = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    edits = inputs.lookup("edit", ["image"]).column("image").to_pylist()
    return relabel_rows(inputs.rows.select(["item_id"]), prompts, originals, edits, cfg,
                        lambda name: load_scorer(name, cfg, profile.models_root))


STAGE = Stage(name="relabel", version="1", section="relabel", reads=("filter", "sample", "edit"), compute=compute)
