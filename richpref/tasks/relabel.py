"""relabel: score the original and every edit with every reward, standardise, combine, pick the pair.

Per reward, the scores of a shard's images (`standardize: shard`, each original counted once) or of
each item's original and edits (`item`) are z-standardised, then combined with the profile's weights
(RPO §3.4, seeds 000/001). Per item, `pairing` picks the pair: the best edit against the original, or
the item's best image against its worst. The higher composite is chosen; pairs flip when the edit
scores lower than the original; a pair whose margin is at or below `relabel.min_margin` is a tie and is
dropped with a reason, so exported labels are always 0 or 1. A reward with `on_cutout: true` scores the
cutout stage's foreground cut-outs instead of the full images. A pair reward (DINOv2 patch
consistency) gives each edit its consistency with the original and the original 1.

`relabel_dataset` applies the same scoring to an existing Pick-a-Pic-format dataset (jpg_0 vs jpg_1):
RPO §4.1's "ImageReward-aligned" data is `relabel_dataset(..., reward="imagereward")`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import uuid
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..images import BadImage, decode_image
from ..models.rewards import PAIR_KINDS, is_pairwise, load_reward_spec, zscore
from ..models.runtime import resident
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

    def on_release(self) -> None:
        """When the stage ends: a served reward (vlm_score) stops the server it launched."""
        for s in self.scorers.values():
            hook = getattr(getattr(s, "vlm", None), "on_release", None)
            if callable(hook):
                hook()


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
                 originals: dict[str, list]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Raw scores per reward: (one per item's original, one per edit row). `images` holds the decoded
    edits (and edited cut-outs) per row, `originals` the decoded originals (and cut-outs) per item;
    `owner[k]` is the item of row k. A pair reward scores each edit against its original and gives
    the original its value from the item's first pair (1 for patch consistency)."""
    orig_raw, edit_raw = {}, {}
    m, n = len(item_prompts), len(prompts)
    for name in names:
        spec = cfg.rewards[name]
        o_side, e_side = ("original_cutout", "edited_cutout") if spec.on_cutout else ("original", "edited")
        scorer = get_scorer(name)
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
    return orig_raw, edit_raw


def standardise(orig_raw: dict[str, np.ndarray], edit_raw: dict[str, np.ndarray], owner: np.ndarray,
                cfg: RelabelConfig) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """z per reward over the shard's images (each original counted once) or within each item's
    original + edits, and the weighted composites of originals and edits."""
    m = len(next(iter(orig_raw.values())))
    groups = np.concatenate([np.arange(m), owner]) if cfg.standardize == "item" else None
    zo, ze = {}, {}
    for name in orig_raw:
        z = zscore(np.concatenate([orig_raw[name], edit_raw[name]]), groups)
        zo[name], ze[name] = z[:m], z[m:]
    c_orig = sum(cfg.rewards[name].weight * zo[name] for name in orig_raw)
    c_edit = sum(cfg.rewards[name].weight * ze[name] for name in orig_raw)
    return zo, ze, np.asarray(c_orig, dtype=np.float64), np.asarray(c_edit, dtype=np.float64)


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
    """Raw scores of a shard's originals (one per item) and edits, their z-scores and composites."""

    def __init__(self, names: list[str], orig_raw: dict[str, np.ndarray], edit_raw: dict[str, np.ndarray],
                 owner: np.ndarray, cfg: RelabelConfig) -> None:
        self.names, self.orig_raw, self.edit_raw = names, orig_raw, edit_raw
        self.orig_z, self.edit_z, self.orig_c, self.edit_c = standardise(orig_raw, edit_raw, owner, cfg)

    def image(self, item: int, g: int | None) -> dict:
        """Raw, z and composite of an item's original (g None) or of scored edit g."""
        if g is None:
            return {"raw": {n: self.orig_raw[n][item] for n in self.names},
                    "z": {n: self.orig_z[n][item] for n in self.names}, "c": float(self.orig_c[item])}
        return {"raw": {n: self.edit_raw[n][g] for n in self.names},
                "z": {n: self.edit_z[n][g] for n in self.names}, "c": float(self.edit_c[g])}

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
        v = scored.columns(c0, c1, image(c0), image(c1))
        if v["margin"] <= cfg.min_margin or math.isclose(v["margin"], 0.0, abs_tol=1e-12):
            rows[c] = rejected(item_id, f"tie: composite margin {v['margin']:.4g} <= relabel.min_margin", candidate=c, **v)
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
    item_prompts: list[str] = []
    bad_original: dict[str, str] = {}
    rows: list[int] = []  # row indices being scored
    edits: dict[str, list] = {side: [] for side in e_sides}
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
            for side in o_sides:
                originals[side].append(decoded[side])
        try:
            decoded = {side: decode_image(images[side][k]) for side in e_sides}
        except BadImage as exc:
            out[k] = rejected(iid, str(exc), candidate=candidates[k])
            continue
        rows.append(k)
        for side in e_sides:
            edits[side].append(decoded[side])
    owner = np.array([items[item_ids[k]] for k in rows], dtype=np.int64)
    if rows:
        orig_raw, edit_raw = score_images(names, cfg, get_scorer, [prompts[k] for k in rows], edits,
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
                            sub_owner, cfg)
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


# ------------------------------------------------------------------ relabel an existing dataset

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1")


class DatasetError(ValueError):
    """A source dataset that cannot be relabelled as given; the message says what to change."""


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> list:
    """Raw encoded bytes from a binary column, or from a `datasets` Image struct ({bytes, path})."""
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return column.to_pylist()


def _content_id(caption: str | None, a: bytes | None, b: bytes | None) -> str:
    h = hashlib.sha256()
    for part in ((caption or "").encode(), a or b"", b or b""):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def dataset_relabel_config(cfg: RelabelConfig, reward: str | None) -> RelabelConfig:
    if reward is not None:
        if reward not in cfg.rewards:
            raise DatasetError(f"reward {reward!r} is not in the profile's relabel.rewards ({', '.join(cfg.rewards)})")
        cfg = cfg.model_copy(update={"rewards": {reward: cfg.rewards[reward]}})
    unfit = [n for n, s in cfg.rewards.items() if s.kind in PAIR_KINDS or s.on_cutout]
    if unfit:
        raise DatasetError(f"reward(s) {unfit} compare an edit with its original or need cut-outs; a Pick-a-Pic pair "
                           "has two independent images: pick per-image rewards with --reward")
    return cfg


def relabel_pickapic_table(table: pa.Table, cfg: RelabelConfig, get_scorer, *, shard: int = 0) -> tuple[pa.Table, pa.Table]:
    """(kept rows with label_0 rewritten, the scores table of every row). jpg_0 plays the original."""
    missing = [c for c in PICKAPIC_COLUMNS if c not in table.schema.names]
    if missing:
        raise DatasetError(f"source has no column(s) {missing}; a Pick-a-Pic-format dataset has caption, jpg_0, jpg_1 (label_0)")
    captions = table.column("caption").to_pylist()
    a, b = _image_bytes(table.column("jpg_0")), _image_bytes(table.column("jpg_1"))
    keys = [f"{shard:05d}-{k:07d}" for k in range(table.num_rows)]  # unique even for duplicate rows
    prompts = [c if isinstance(c, str) else "" for c in captions]
    scores = relabel_rows(keys, prompts, {"original": a, "edited": b}, cfg, get_scorer)
    ok = pc.equal(scores.column("status"), "ok")
    rows = table.filter(ok)
    sc = scores.filter(ok)
    score_cols = [c for c in sc.schema.names if c not in ("item_id", "status", "reason", "chosen", "flipped", "margin",
                                                          "candidate", "candidate_0", "candidate_1")]
    new_label = pa.array([1 if c == 0 else 0 for c in sc.column("chosen").to_pylist()], type=pa.int64())
    keep_idx = [k for k, s in enumerate(scores.column("status").to_pylist()) if s == "ok"]
    ids = (rows.column("item_id").to_pylist() if "item_id" in rows.schema.names
           else [_content_id(captions[k], a[k], b[k]) for k in keep_idx])
    cols = {name: rows.column(name) for name in rows.schema.names if name not in ("jpg_0", "jpg_1", "label_0", "item_id")}
    out = {"caption": rows.column("caption"),
           "jpg_0": pa.array([a[k] for k in keep_idx], type=pa.binary()),
           "jpg_1": pa.array([b[k] for k in keep_idx], type=pa.binary()),
           "label_0": new_label,
           **{k: v for k, v in cols.items() if k != "caption"},
           "item_id": pa.array(ids, type=pa.string())}
    if "label_0" in rows.schema.names:
        out["label_0_source"] = rows.column("label_0").cast(pa.float64())
    out["margin"] = sc.column("margin")
    out["scores"] = pa.array([json.dumps({c: r[c] for c in score_cols}, sort_keys=True) for r in sc.select(score_cols).to_pylist()],
                             type=pa.string())
    return pa.table(out), scores


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, buf.getvalue())
    fs.mv(tmp, path)


def relabel_dataset(src: str | list[str], out_dir: str, profile: Profile, reward: str | None = None, *,
                    rows_per_shard: int | None = None) -> dict:
    """Rescore jpg_0/jpg_1 of a Pick-a-Pic-format Parquet dataset (glob, file list or fsspec URLs) with
    the profile's rewards (or only `reward`) and write it to `out_dir` as `part-XXXXX.parquet` with
    `label_0` rewritten (1 = jpg_0 scores higher), ties and undecodable rows dropped, the source label
    kept as `label_0_source`, plus `margin` and `scores`. Standardisation groups are the shards
    (`relabel.standardize: shard`) or the pairs (`item`). Also writes relabel.json, README.md and plots."""
    import fsspec

    from ..datacard import write_relabel_report

    cfg = dataset_relabel_config(profile.relabel, reward)
    files: list[str] = []
    for pattern in [src] if isinstance(src, str) else src:
        fs, _ = fsspec.core.url_to_fs(pattern)
        found = sorted(fs.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        files += [fs.unstrip_protocol(f) if "://" in pattern else f for f in found]
    if not files:
        raise DatasetError(f"no Parquet files match {src!r}")
    out_fs, out_root = fsspec.core.url_to_fs(out_dir)
    out_fs.makedirs(out_root, exist_ok=True)
    step = rows_per_shard or profile.source.shard_size
    scorers = RewardSet(cfg, profile.models_root)
    shard, total, kept_rows, reasons = 0, 0, 0, {}
    agree, with_label, all_scores = 0, 0, []
    try:
        for f in files:
            with fsspec.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                for batch in pf.iter_batches(batch_size=step):
                    table = pa.Table.from_batches([batch])
                    rows, scores = relabel_pickapic_table(table, cfg, scorers.get, shard=shard)
                    _write_parquet(out_fs, f"{out_root.rstrip('/')}/part-{shard:05d}.parquet", rows)
                    all_scores.append(scores)
                    total += table.num_rows
                    kept_rows += rows.num_rows
                    for s, r in zip(scores.column("status").to_pylist(), scores.column("reason").to_pylist()):
                        if s != "ok":
                            code = (r or "").split(":", 1)[0]
                            reasons[code] = reasons.get(code, 0) + 1
                    if "label_0_source" in rows.schema.names:
                        for old, new in zip(rows.column("label_0_source").to_pylist(), rows.column("label_0").to_pylist()):
                            if old in (0.0, 1.0):
                                with_label += 1
                                agree += int(old == new)
                    log.info("relabel-dataset shard %05d: %d rows, kept %d", shard, table.num_rows, rows.num_rows)
                    shard += 1
    finally:
        scorers.close()
    summary = {"source": files, "out_dir": out_dir, "rewards": {n: s.model_dump() for n, s in cfg.rewards.items()},
               "standardize": cfg.standardize, "min_margin": cfg.min_margin, "shards": shard, "rows": total,
               "kept": kept_rows, "rejected": reasons,
               "agreement_with_source_label": (agree / with_label) if with_label else None,
               "source_rows_with_a_label": with_label}
    out_fs.pipe_file(f"{out_root.rstrip('/')}/relabel.json", json.dumps(summary, indent=2).encode())
    summary["report"] = write_relabel_report(out_dir, summary, pa.concat_tables(all_scores) if all_scores else None,
                                             list(cfg.rewards), cfg.min_margin)
    return summary
