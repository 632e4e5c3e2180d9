"""relabel: score original and edit with every reward, standardise, combine, choose; flip when the edit loses.

Per reward, the 2N scores of a shard (`standardize: shard`) or the two of each item (`item`) are
z-standardised, then combined with the profile's weights (RPO §3.4, seeds 000/001). The higher
composite is chosen; a pair whose margin is at or below `relabel.min_margin` is a tie and is dropped
with a reason, so exported labels are always 0 or 1. A reward with `on_cutout: true` scores the
cutout stage's foreground cut-outs instead of the full images. A pair reward (DINOv2 patch
consistency) gives the edit its consistency with the original and the original 1.

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


def reward_set(cfg: RelabelConfig, models_root: str | None) -> RewardSet:
    key = ("rewards", json.dumps({n: s.model_dump() for n, s in cfg.rewards.items()}, sort_keys=True),
           models_root, cfg.device, cfg.dtype)
    return resident.get(key, lambda: RewardSet(cfg, models_root))


def load_scorer(name: str, cfg: RelabelConfig, models_root: str | None):
    return reward_set(cfg, models_root).get(name)


def needs_cutouts(cfg: RelabelConfig) -> bool:
    return any(spec.on_cutout for spec in cfg.rewards.values())


def combine(raw: dict[str, np.ndarray], cfg: RelabelConfig) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """raw[name] has shape (n, 2): column 0 original, 1 edited. Returns z per reward and composites."""
    n = next(iter(raw.values())).shape[0]
    groups = np.repeat(np.arange(n), 2) if cfg.standardize == "item" else None
    z = {name: zscore(v.reshape(-1), groups).reshape(n, 2) for name, v in raw.items()}
    composite = sum(cfg.rewards[name].weight * z[name] for name in raw)
    return z, composite[:, 0], composite[:, 1]


def score_rewards(names: list[str], cfg: RelabelConfig, get_scorer: Callable, prompts: list[str],
                  images: dict[str, list]) -> dict[str, np.ndarray]:
    """(n, 2) raw scores per reward; `images` holds decoded original/edited (and cut-out) images."""
    raw = {}
    n = len(prompts)
    for name in names:
        spec = cfg.rewards[name]
        a, b = ((images["original_cutout"], images["edited_cutout"]) if spec.on_cutout
                else (images["original"], images["edited"]))
        scorer = get_scorer(name)
        if is_pairwise(scorer):
            s = np.asarray(scorer.score_pairs(a, b, prompts, batch_size=cfg.batch_size), dtype=np.float64)
        else:
            flat = np.asarray(scorer.score(a + b, prompts * 2, batch_size=cfg.batch_size), dtype=np.float64)
            s = np.stack([flat[:n], flat[n:]], axis=1)
        if s.shape != (n, 2):
            raise RuntimeError(f"reward {name!r} returned shape {s.shape} for {n} pairs")
        raw[name] = s
    return raw


def relabel_rows(item_ids: list[str], prompts: list, images: dict[str, list], cfg: RelabelConfig, get_scorer) -> pa.Table:
    """One scores row per item: kept with `chosen`/`flipped`, or rejected (bad image, bad score, tie).
    `images` maps original/edited (and original_cutout/edited_cutout when a reward needs them) to bytes."""
    names = list(cfg.rewards)
    sides = ["original", "edited"] + (["original_cutout", "edited_cutout"] if needs_cutouts(cfg) else [])
    out, todo = {}, []
    for k, iid in enumerate(item_ids):
        try:
            todo.append((iid, prompts[k], {side: decode_image(images[side][k]) for side in sides}))
        except BadImage as exc:
            out[iid] = rejected(iid, str(exc))
    raw: dict[str, np.ndarray] = {}
    if todo:
        decoded = {side: [d[side] for _, _, d in todo] for side in sides}
        raw = score_rewards(names, cfg, get_scorer, [p for _, p, _ in todo], decoded)
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
    return rows_to_table([out[i] for i in item_ids], scores_schema(names))


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
                        lambda name: load_scorer(name, cfg, profile.models_root))


def _templates_key(profile: Profile) -> str:
    """The text of every VLM question a reward asks is part of the key, like the VLM stages' templates."""
    names = sorted({s.template or "reward_score_v1" for s in profile.relabel.rewards.values() if s.kind == "vlm_score"})
    return ",".join(f"{n}={template_hash(n)}" for n in names)


STAGE = Stage(name="relabel", version="2", section="relabel", reads=("filter", "sample", "edit", "cutout"),
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
    score_cols = [c for c in sc.schema.names if c not in ("item_id", "status", "reason", "chosen", "flipped", "margin")]
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
