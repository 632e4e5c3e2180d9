"""relabel: from the score stage's raw scores to one labelled pair per item: no model call.

A pair a voting or gating reward could not score (NaN: `bad_score`, `unparsed_answer`) is rejected.
An edit whose DINOv2 consistency with its original (`score.subject_gate`) is below
`relabel.min_consistency` is rejected (`subject_changed`), one an edit judge scores below
`relabel.edit_gate.min_score` (`edit_judged_poor`) too. Per voting reward, the scores of a shard's
images (`standardize: shard`, each original counted once) are z-standardised, or centred within
each item and scaled by the shard's spread around the item means (`item`); they are combined with
`relabel.weights` (RPO §3.4, seeds 000/001). Rewards not named there are standardised and
recorded, not combined.
Per item, `pairing` picks the pair: the best edit against the original, or the item's best image
against its worst. The higher composite is chosen; pairs flip when the edit scores lower than the
original; a pair whose margin is at or below `relabel.min_margin` (within float noise, see
richpref/tasks/pairing.py) or whose two images are the same bytes is a tie and is dropped with a reason, so
exported labels are always 0 or 1.

Everything here is a cheap function of the scores and the thresholds: changing a threshold or a
weight recomputes this stage, never the reward models (`score`, tasks/score.py).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import pyarrow as pa

from richpref.tasks.pairing import relative_noise, standardise, z_noise
from ..schemas.config import Profile, RelabelConfig, ScoreConfig
from ..schemas.tables import OK, rows_to_table, scores_schema
from .base import Stage, StageContractError, StageInputs, kept, rejected
from .score import SUBJECT, score_rows


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
                 owner: np.ndarray, cfg: RelabelConfig, dtypes: dict[str, str], digests: tuple[list, list]) -> None:
        self.names, self.orig_raw, self.edit_raw = names, orig_raw, edit_raw
        m = len(digests[0])
        groups = np.concatenate([np.arange(m), owner]) if cfg.standardize == "item" else None
        self.orig_z, self.edit_z = {}, {}
        self.orig_c, self.edit_c = np.zeros(m), np.zeros(len(owner))
        self.noise = 0.0  # how far float noise can move any one composite (richpref/tasks/pairing.py)
        for name in names:
            raw = np.concatenate([orig_raw[name], edit_raw[name]])
            z, spread = standardise(raw, groups)
            self.orig_z[name], self.edit_z[name] = z[:m], z[m:]
            weight = cfg.weight(name)
            if weight == 0:  # report-only: recorded, and its NaN (no score) must not reach a composite
                continue
            self.orig_c += weight * z[:m]
            self.edit_c += weight * z[m:]
            self.noise += abs(weight) * z_noise(raw, spread, relative_noise(dtypes.get(name)))
        self.orig_digest, self.edit_digest = digests

    def image(self, item: int, g: int | None) -> dict:
        """Raw, z, composite and digest of an item's original (g None) or of scored edit g."""
        if g is None:
            return {"raw": {n: self.orig_raw[n][item] for n in self.names},
                    "z": {n: self.orig_z[n][item] for n in self.names}, "c": float(self.orig_c[item]),
                    "digest": self.orig_digest[item]}
        return {"raw": {n: self.edit_raw[n][g] for n in self.names},
                "z": {n: self.edit_z[n][g] for n in self.names}, "c": float(self.edit_c[g]),
                "digest": self.edit_digest[g]}

    def columns(self, c0: int, c1: int, a: dict, b: dict) -> dict:
        """The score columns of a row comparing image c0 (side 0) with image c1 (side 1)."""
        v: dict[str, Any] = {"candidate_0": c0, "candidate_1": c1}
        for n in self.names:
            v.update({f"{n}_0": float(a["raw"][n]), f"{n}_1": float(b["raw"][n]),
                      f"{n}_z0": float(a["z"][n]), f"{n}_z1": float(b["z"][n])})
        v.update(composite_0=a["c"], composite_1=b["c"], margin=abs(b["c"] - a["c"]))
        return v


def pair_rows(scored: Scored, item_id: str, item: int, g_of: dict[int, int], cfg: RelabelConfig,
              consistency: dict[int, float | None]) -> dict[int, dict]:
    """Rows of one item's scored candidates, by candidate: the pair `cfg.pairing` picks, carried by its
    side-1 candidate (kept, or a tie), and every other candidate not selected."""
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
                               subject_consistency=consistency[c], **scored.columns(-1, c, image(-1), image(c)))
            continue
        a, b = image(c0), image(c1)
        v = scored.columns(c0, c1, a, b)
        tolerance = 2 * scored.noise
        if a["digest"] is not None and a["digest"] == b["digest"]:
            rows[c] = rejected(item_id, "tie: the two images are the same bytes", candidate=c,
                               subject_consistency=consistency[c], **v)
        elif v["margin"] <= cfg.min_margin + tolerance or math.isclose(v["margin"], 0.0, abs_tol=1e-12):
            rows[c] = rejected(item_id, f"tie: composite margin {v['margin']:.4g} <= relabel.min_margin "
                               f"{cfg.min_margin:g} + float noise {tolerance:.2g}", candidate=c,
                               subject_consistency=consistency[c], **v)
        else:
            chosen = 1 if v["composite_1"] > v["composite_0"] else 0
            rows[c] = kept(item_id, candidate=c, chosen=chosen, flipped=(c0 == -1 and chosen == 0),
                           subject_consistency=consistency[c], **v)
    return rows


def unscored_reason(row: dict, names: list[str], deciding: set[str]) -> str | None:
    """Why a pair cannot be decided: a reward that votes or gates has no score for one of its images
    (the judge's unparsed answer, from the score stage's `unscored`); None when every one has."""
    bad = [n for n in names if n in deciding and not all(math.isfinite(row[f"{n}_{s}"]) for s in (0, 1))]
    if not bad:
        return None
    split = re.compile("; (?=(?:" + "|".join(map(re.escape, names)) + ")(?: answered |: non-finite score))")
    entries = split.split(row.get("unscored") or "")
    for n in bad:
        said = next((e for e in entries if e.startswith(f"{n} answered ")), None)
        if said is not None:
            return f"unparsed_answer: {said}"
    return f"bad_score: non-finite {', '.join(sorted(bad))} score"


def decide_rows(scores: pa.Table, score: ScoreConfig, cfg: RelabelConfig) -> pa.Table:
    """One relabel row per score row, in order: rows the score stage rejected stay rejected, and rows
    a voting or gating reward could not score; edits below the subject gate or the edit gate are
    rejected; per item, the pair `relabel.pairing` picks among the rest is kept with `chosen`/`flipped`
    (or rejected as a tie), every other edit rejected as `not_selected` with its own comparison
    against the original in its score columns. `score` is the score stage's section (its rewards,
    whether it measured the subject gate)."""
    names = score.scored()
    missing = [f"{n}_1" for n in names if f"{n}_1" not in scores.schema.names]
    if missing:
        raise StageContractError(f"the scores lack {missing}: the score stage ran with other score.rewards")
    rows = scores.to_pylist()
    deciding = cfg.deciding(names)
    gate, edit_gate = score.subject_gate, cfg.edit_gate
    out: dict[int, dict] = {}
    good: list[int] = []
    for k, r in enumerate(rows):
        raw = {c: r[c] for n in names for c in (f"{n}_0", f"{n}_1")}
        unscored = unscored_reason(r, names, deciding) if r["status"] == OK else None
        if r["status"] != OK or unscored:
            out[k] = rejected(r["item_id"], unscored or r["reason"], candidate=r["candidate"], **raw)
        elif gate is not None and (r[SUBJECT] is None or r[SUBJECT] < cfg.min_consistency):
            why = ("not scored: run the score stage with score.subject_gate set" if r[SUBJECT] is None else
                   f"DINOv2 patch consistency {r[SUBJECT]:.4g} < relabel.min_consistency {cfg.min_consistency:g}")
            out[k] = rejected(r["item_id"], f"subject_changed: {why}", candidate=r["candidate"],
                              subject_consistency=r[SUBJECT], **raw)
        elif edit_gate is not None and r[f"{edit_gate.reward}_1"] < edit_gate.min_score:
            out[k] = rejected(r["item_id"], f"edit_judged_poor: {edit_gate.reward} {r[f'{edit_gate.reward}_1']:.4g} < "
                              f"relabel.edit_gate.min_score {edit_gate.min_score:g}", candidate=r["candidate"],
                              subject_consistency=r[SUBJECT], **raw)
        else:
            good.append(k)
    if good:
        items: dict[str, int] = {}
        for k in good:
            items.setdefault(rows[k]["item_id"], len(items))
        first = {}
        for k in good:
            first.setdefault(rows[k]["item_id"], k)
        owner = np.array([items[rows[k]["item_id"]] for k in good], dtype=np.int64)
        orig_raw = {n: np.array([rows[k][f"{n}_0"] for k in first.values()], dtype=np.float64) for n in names}
        edit_raw = {n: np.array([rows[k][f"{n}_1"] for k in good], dtype=np.float64) for n in names}
        dtypes = json.loads(rows[good[0]]["dtypes"] or "{}")
        scored = Scored(names, orig_raw, edit_raw, owner, cfg, dtypes,
                        ([rows[k]["digest_0"] for k in first.values()], [rows[k]["digest_1"] for k in good]))
        by_item: dict[int, dict[int, int]] = {}  # item -> candidate -> index among scored edits
        for g, k in enumerate(good):
            by_item.setdefault(int(owner[g]), {})[rows[k]["candidate"]] = g
        for j, g_of in by_item.items():
            ks = {c: good[g] for c, g in g_of.items()}
            item_id = rows[next(iter(ks.values()))]["item_id"]
            consistency = {c: rows[k][SUBJECT] for c, k in ks.items()}
            for c, row in pair_rows(scored, item_id, j, g_of, cfg, consistency).items():
                out[ks[c]] = row
    return rows_to_table([out[k] for k in range(len(rows))], scores_schema(names))


def relabel_rows(item_ids: list[str], prompts: list, images: dict[str, list], score: ScoreConfig, cfg: RelabelConfig,
                 get_scorer, candidates: list[int] | None = None) -> pa.Table:
    """Score (model calls) and decide in one go: `decide_rows(score_rows(...))`."""
    return decide_rows(score_rows(item_ids, prompts, images, score, get_scorer, candidates=candidates), score, cfg)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    """The pairs the filter kept, decided from their scores."""
    return decide_rows(inputs.lookup("score", inputs.tables["score"].schema.names), profile.score, profile.relabel)


STAGE = Stage(name="relabel", version="6", section="relabel", reads=("filter", "score"), compute=compute,
              loads_model=False, schema=lambda p: scores_schema(p.score.scored()))
