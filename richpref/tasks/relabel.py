"""relabel: score the original and every edit with every reward, standardise, combine, pick the pair.

Per reward, the scores of a shard's images (`standardize: shard`, each original counted once) or of
each item's original and edits (`item`) are z-standardised, then combined with the profile's weights
(RPO §3.4, seeds 000/001). Per item, `pairing` picks the pair: the best edit against the original, or
the item's best image against its worst. The higher composite is chosen; pairs flip when the edit
scores lower than the original; a pair whose margin is at or below `relabel.min_margin` (within float
noise, see richpref/pairing.py) or whose two images are the same bytes is a tie and is dropped with a
reason, so exported labels are always 0 or 1. A reward with `on_cutout: true` scores the
cutout stage's foreground cut-outs instead of the full images. A pair reward (DINOv2 patch
consistency) gives each edit its consistency with the original and the original 1.

`richpref.relabel_dataset` applies the same scoring to an existing Pick-a-Pic-format dataset (jpg_0
vs jpg_1): RPO §4.1's "ImageReward-aligned" data is `relabel_dataset(..., reward="imagereward")`.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from ..images import BadImage, decode_image
from ..models.rewards import is_pairwise, load_reward_spec, zscore
from ..models.runtime import resident
from ..pairing import relative_noise, scorer_dtype, z_noise
from ..prompts import template_hash
from ..schemas.config import Profile, RelabelConfig
from ..schemas.tables import rows_to_table, scores_schema
from .base import Stage, StageInputs, kept, rejected

log = logging.getLogger("richpref")


class RewardSet:
    """Every scorer of a relabel config, each loaded on first use and kept for the stage: a stage runs
    shard after shard, and reloading every reward per shard would dominate its time. Held in the
    one-resident-model slot as a unit, so the next stage's model releases all of them."""

    def __init__(self, cfg: RelabelConfig, models_root: str | None) -> None:
        self.cfg, self.models_root = cfg, models_root
        self.scorers: dict[str, Any] = {}

    def get(self, name: str):
        if name not in self.scorers:
            spec = self.cfg.rewards[name]
            self.scorers[name] = load_reward_spec(spec, self.models_root, device=self.cfg.device, dtype=self.cfg.dtype)
        return self.scorers[name]

    def close(self) -> None:
        for s in self.scorers.values():
            if hasattr(s, "close"):
                s.close()
        self.scorers.clear()


def reward_set(cfg: RelabelConfig, models_root: str | None) -> RewardSet:
    key = ("rewards", json.dumps({n: s.model_dump() for n, s in cfg.rewards.items()}, sort_keys=True),
           models_root, cfg.device, cfg.dtype)
    return resident.get(key, lambda: RewardSet(cfg, models_root))


def load_scorer(name: str, cfg: RelabelConfig, models_root: str | None):
    return reward_set(cfg, models_root).get(name)


def needs_cutouts(cfg: RelabelConfig) -> bool:
    return any(spec.on_cutout for spec in cfg.rewards.values())


def score_images(names: list[str], cfg: RelabelConfig, get_scorer: Callable, prompts: list[str],
                 images: dict[str, list], owner: list[int], item_prompts: list[str],
                 originals: dict[str, list]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """Raw scores per reward: (one per item's original, one per edit row). `images` holds the decoded
    edits (and edited cut-outs) per row, `originals` the decoded originals (and cut-outs) per item;
    `owner[k]` is the item of row k. A pair reward scores each edit against its original and gives
    the original its value from the item's first pair (1 for patch consistency). Also the dtype each
    reward computed in."""
    orig_raw, edit_raw, dtypes = {}, {}, {}
    m, n = len(item_prompts), len(prompts)
    for name in names:
        spec = cfg.rewards[name]
        o_side, e_side = ("original_cutout", "edited_cutout") if spec.on_cutout else ("original", "edited")
        scorer = get_scorer(name)
        dtypes[name] = scorer_dtype(scorer)
        if is_pairwise(scorer):
            a = [originals[o_side][owner[k]] for k in range(n)]
            s = np.asarray(scorer.score_pairs(a, images[e_side], prompts, batch_size=cfg.batch_size), dtype=np.float64)
            if s.shape != (n, 2):
                raise RuntimeError(f"reward {name!r} returned shape {s.shape} for {n} pairs")
            first = {}
            for k in range(n):
                first.setdefault(owner[k], k)
            o, e = np.array([s[first[j], 0] for j in range(m)]), s[:, 1]
        else:
            flat = np.asarray(scorer.score(originals[o_side] + images[e_side], item_prompts + prompts,
                                           batch_size=cfg.batch_size), dtype=np.float64)
            if flat.shape != (m + n,):
                raise RuntimeError(f"reward {name!r} returned shape {flat.shape} for {m + n} images")
            o, e = flat[:m], flat[m:]
        orig_raw[name], edit_raw[name] = o, e
    return orig_raw, edit_raw, dtypes


def standardise(orig_raw: dict[str, np.ndarray], edit_raw: dict[str, np.ndarray], owner: np.ndarray,
                cfg: RelabelConfig, dtypes: dict[str, str] | None = None) -> tuple[dict, dict, np.ndarray, np.ndarray, np.ndarray]:
    """z per reward over the shard's images (each original counted once) or within each item's
    original + edits, the weighted composites of originals and edits, and how far float noise in the
    raw scores can move each image's composite (richpref/pairing.py)."""
    m = len(next(iter(orig_raw.values())))
    groups = np.concatenate([np.arange(m), owner]) if cfg.standardize == "item" else None
    zo, ze = {}, {}
    noise = np.zeros(m + len(owner))
    for name in orig_raw:
        raw = np.concatenate([orig_raw[name], edit_raw[name]])
        z = zscore(raw, groups)
        zo[name], ze[name] = z[:m], z[m:]
        noise += abs(cfg.rewards[name].weight) * z_noise(raw, groups, relative_noise((dtypes or {}).get(name)))
    c_orig = sum(cfg.rewards[name].weight * zo[name] for name in orig_raw)
    c_edit = sum(cfg.rewards[name].weight * ze[name] for name in orig_raw)
    return zo, ze, np.asarray(c_orig, dtype=np.float64), np.asarray(c_edit, dtype=np.float64), noise


def choose_pair(composites: dict[int, float], pairing: str) -> tuple[int, int]:
    """(candidate_0, candidate_1) of an item's pair from the composites of its images (-1 = the
    original, k = edit k). Side 0 is the lower number, so the original is always jpg_0 when paired."""
    edits = [c for c in composites if c >= 0]
    best_edit = max(edits, key=lambda c: (composites[c], -c))
    if pairing == "best_vs_original":
        return -1, best_edit
    best = max(composites, key=lambda c: (composites[c], -c))
    worst = min(composites, key=lambda c: (composites[c], c))
    if best == worst:  # every image scored the same: the best edit against the original, a tie
        return -1, best_edit
    return min(best, worst), max(best, worst)


class Scored:
    """Raw scores of a shard's originals (one per item) and edits, their z-scores and composites, the
    float noise of each composite and a digest of each image's bytes."""

    def __init__(self, names: list[str], orig_raw: dict[str, np.ndarray], edit_raw: dict[str, np.ndarray],
                 owner: np.ndarray, cfg: RelabelConfig, dtypes: dict[str, str] | None = None,
                 digests: tuple[list, list] | None = None) -> None:
        self.names, self.orig_raw, self.edit_raw = names, orig_raw, edit_raw
        self.orig_z, self.edit_z, self.orig_c, self.edit_c, noise = standardise(orig_raw, edit_raw, owner, cfg, dtypes)
        m = len(self.orig_c)
        self.orig_noise, self.edit_noise = noise[:m], noise[m:]
        self.orig_digest, self.edit_digest = digests or ([None] * m, [None] * len(owner))

    def image(self, item: int, g: int | None) -> dict:
        """Raw, z, composite, composite noise and digest of an item's original (g None) or of scored edit g."""
        if g is None:
            return {"raw": {n: self.orig_raw[n][item] for n in self.names},
                    "z": {n: self.orig_z[n][item] for n in self.names}, "c": float(self.orig_c[item]),
                    "noise": float(self.orig_noise[item]), "digest": self.orig_digest[item]}
        return {"raw": {n: self.edit_raw[n][g] for n in self.names},
                "z": {n: self.edit_z[n][g] for n in self.names}, "c": float(self.edit_c[g]),
                "noise": float(self.edit_noise[g]), "digest": self.edit_digest[g]}

    def columns(self, c0: int, c1: int, a: dict, b: dict) -> dict:
        """The score columns of a row comparing image c0 (side 0) with image c1 (side 1)."""
        v: dict[str, Any] = {"candidate_0": c0, "candidate_1": c1}
        for n in self.names:
            v.update({f"{n}_0": float(a["raw"][n]), f"{n}_1": float(b["raw"][n]),
                      f"{n}_z0": float(a["z"][n]), f"{n}_z1": float(b["z"][n])})
        v.update(composite_0=a["c"], composite_1=b["c"], margin=abs(b["c"] - a["c"]))
        return v


def pair_rows(scored: Scored, item_id: str, item: int, g_of: dict[int, int], cfg: RelabelConfig) -> dict[int, dict]:
    """Rows of one item's scored candidates, by candidate: the pair `cfg.pairing`
    picks, carried by its side-1 candidate (kept, or a tie), and every other candidate not selected."""
    def image(c: int) -> dict:
        return scored.image(item, None if c < 0 else g_of[c])

    composites = {c: image(c)["c"] for c in [-1, *g_of]}
    c0, c1 = choose_pair(composites, cfg.pairing)
    rows = {}
    for c in g_of:
        if c != c1:
            why = (f"jpg_0 of candidate {c1}'s pair" if c == c0 else
                   f"composite {composites[c]:.4g} vs the pair's {composites[c0]:.4g} / {composites[c1]:.4g}")
            rows[c] = rejected(item_id, f"not_selected: {why} (relabel.pairing={cfg.pairing})", candidate=c,
                               **scored.columns(-1, c, image(-1), image(c)))
            continue
        a, b = image(c0), image(c1)
        v = scored.columns(c0, c1, a, b)
        tolerance = a["noise"] + b["noise"]
        if a["digest"] is not None and a["digest"] == b["digest"]:
            rows[c] = rejected(item_id, "tie: the two images are the same bytes", candidate=c, **v)
        elif v["margin"] <= cfg.min_margin + tolerance or math.isclose(v["margin"], 0.0, abs_tol=1e-12):
            rows[c] = rejected(item_id, f"tie: composite margin {v['margin']:.4g} <= relabel.min_margin "
                               f"{cfg.min_margin:g} + float noise {tolerance:.2g}", candidate=c, **v)
        else:
            chosen = 1 if v["composite_1"] > v["composite_0"] else 0
            rows[c] = kept(item_id, candidate=c, chosen=chosen, flipped=(c0 == -1 and chosen == 0), **v)
    return rows


def relabel_rows(item_ids: list[str], prompts: list, images: dict[str, list], cfg: RelabelConfig, get_scorer,
                 candidates: list[int] | None = None) -> pa.Table:
    """One scores row per (item, edit candidate) row, in input order.

    `images` maps original/edited (and original_cutout/edited_cutout when a reward needs them) to
    encoded bytes per row; an item's rows share its original. Per item, `relabel.pairing` picks one
    pair among the original and the edits that scored: the row of the pair's side-1 edit is kept with
    `chosen`/`flipped` (or rejected as a tie); every other row is rejected as `not_selected`, with its
    own comparison against the original in its score columns. Undecodable images and non-finite
    scores reject the row (the whole item when the original is at fault).
    """
    names = list(cfg.rewards)
    n_rows = len(item_ids)
    candidates = list(candidates) if candidates is not None else [0] * n_rows
    cut = needs_cutouts(cfg)
    o_sides = ["original"] + (["original_cutout"] if cut else [])
    e_sides = ["edited"] + (["edited_cutout"] if cut else [])
    out: dict[int, dict] = {}
    items: dict[str, int] = {}  # item_id -> index among decoded originals
    originals: dict[str, list] = {side: [] for side in o_sides}
    orig_digest: list[bytes] = []  # of each decoded original's encoded bytes: identical images are a tie
    item_prompts: list[str] = []
    bad_original: dict[str, str] = {}
    rows: list[int] = []  # row indices being scored
    edits: dict[str, list] = {side: [] for side in e_sides}
    edit_digest: list[bytes] = []
    for k, iid in enumerate(item_ids):
        if iid in bad_original:
            out[k] = rejected(iid, bad_original[iid], candidate=candidates[k])
            continue
        if iid not in items:
            try:
                decoded = {side: decode_image(images[side][k]) for side in o_sides}
            except BadImage as exc:
                bad_original[iid] = str(exc)
                out[k] = rejected(iid, str(exc), candidate=candidates[k])
                continue
            items[iid] = len(item_prompts)
            item_prompts.append(prompts[k])
            orig_digest.append(hashlib.sha256(images["original"][k]).digest())
            for side in o_sides:
                originals[side].append(decoded[side])
        try:
            decoded = {side: decode_image(images[side][k]) for side in e_sides}
        except BadImage as exc:
            out[k] = rejected(iid, str(exc), candidate=candidates[k])
            continue
        rows.append(k)
        edit_digest.append(hashlib.sha256(images["edited"][k]).digest())
        for side in e_sides:
            edits[side].append(decoded[side])
    owner = np.array([items[item_ids[k]] for k in rows], dtype=np.int64)
    if rows:
        orig_raw, edit_raw, dtypes = score_images(names, cfg, get_scorer, [prompts[k] for k in rows], edits,
                                          list(owner), item_prompts, originals)
        # Non-finite scores cannot be ranked: reject those rows (all of an item's rows when its
        # original's score is at fault) and standardise over the rest.
        bad_items = {j: [n for n in names if not np.isfinite(orig_raw[n][j])] for j in range(len(item_prompts))}
        good = []
        for r, k in enumerate(rows):
            bad = sorted(set(bad_items[owner[r]]) | {n for n in names if not np.isfinite(edit_raw[n][r])})
            if bad:
                out[k] = rejected(item_ids[k], f"bad_score: non-finite {', '.join(bad)} score", candidate=candidates[k])
            else:
                good.append(r)
        if good:
            used_items = sorted({int(owner[r]) for r in good})
            remap = {j: i for i, j in enumerate(used_items)}
            sub_owner = np.array([remap[int(owner[r])] for r in good], dtype=np.int64)
            scored = Scored(names, {n: orig_raw[n][used_items] for n in names}, {n: edit_raw[n][good] for n in names},
                            sub_owner, cfg, dtypes, ([orig_digest[j] for j in used_items], [edit_digest[r] for r in good]))
            by_item: dict[int, dict[int, int]] = {}  # item -> candidate -> index among scored edits
            for g, r in enumerate(good):
                by_item.setdefault(int(sub_owner[g]), {})[candidates[rows[r]]] = g
            for j, g_of in by_item.items():
                item_id = item_ids[rows[good[next(iter(g_of.values()))]]]
                for c, row in pair_rows(scored, item_id, j, g_of, cfg).items():
                    out[rows[good[g_of[c]]]] = row
    return rows_to_table([out[k] for k in range(n_rows)], scores_schema(names))


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.relabel
    sample = inputs.lookup("sample", ["prompt", "image"])
    images = {"original": sample.column("image").to_pylist(),
              "edited": inputs.lookup("edit", ["image"]).column("image").to_pylist()}
    if needs_cutouts(cfg):
        cut = inputs.lookup("cutout", ["original_cutout", "edited_cutout"])
        images.update(original_cutout=cut.column("original_cutout").to_pylist(),
                      edited_cutout=cut.column("edited_cutout").to_pylist())
    return relabel_rows(inputs.rows.column("item_id").to_pylist(), sample.column("prompt").to_pylist(), images, cfg,
                        lambda name: load_scorer(name, cfg, profile.models_root),
                        candidates=inputs.rows.column("candidate").to_pylist())


def _templates_key(profile: Profile) -> str:
    """The text of every VLM question a reward asks is part of the key, like the VLM stages' templates."""
    names = sorted({s.template or "reward_score_v1" for s in profile.relabel.rewards.values() if s.kind == "vlm_score"})
    return ",".join(f"{n}={template_hash(n)}" for n in names)


STAGE = Stage(name="relabel", version="3", section="relabel", reads=("filter", "sample", "edit", "cutout"),
              compute=compute, key_extra=_templates_key)
