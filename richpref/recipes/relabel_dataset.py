"""relabel-dataset: rescore an existing Pick-a-Pic-format dataset (jpg_0 vs jpg_1) and rewrite label_0.

RPO §4.1's "ImageReward-aligned" data is `relabel_dataset(..., reward="imagereward")`: the label
follows the reward's order. Only pairs without an order are dropped by default (the same bytes on both
sides, or a margin within float noise of 0); dropping near-ties (margin <= `relabel.min_margin`) is
the `drop_near_ties` option, and the card says which was used. jpg_0 plays the original of the
curate pipeline's scoring and decision functions.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from richpref.schemas.config import Profile, RelabelConfig, ScoreConfig
from richpref.schemas.relabel import EDIT_JUDGES
from richpref.tasks.relabel import relabel_rows
from richpref.tasks.relabel_score import RewardSet
from richpref.common.atomic import write_atomic

log = logging.getLogger("richpref")

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


def dataset_relabel_config(score: ScoreConfig, cfg: RelabelConfig, reward: str | None,
                           drop_near_ties: bool = False) -> tuple[ScoreConfig, RelabelConfig]:
    """The profile's score and relabel configs for independent image pairs: only `reward` (voting,
    weight 1) when given, no subject gate (nothing was edited), and min_margin 0 unless near-ties are
    to be dropped."""
    if reward is not None:
        if reward not in score.rewards:
            raise DatasetError(f"reward {reward!r} is not in the profile's score.rewards ({', '.join(score.rewards)})")
        score = score.model_copy(update={"rewards": {reward: score.rewards[reward]}})
        cfg = cfg.model_copy(update={"weights": {reward: 1.0}})
    unfit = [n for n in score.scored() if score.rewards[n].on_cutout]
    if unfit:
        raise DatasetError(f"reward(s) {unfit} score cut-outs of an edit and its original; a Pick-a-Pic pair has "
                           "two independent images and no cut-outs: pick a full-image reward with --reward")
    judges = [n for n in score.scored() if score.rewards[n].kind in EDIT_JUDGES]
    if judges:
        raise DatasetError(f"reward(s) {judges} judge an edit against its original and instructions; a Pick-a-Pic "
                           "pair has two independent images: pick an image reward with --reward")
    if cfg.standardize == "item":
        raise DatasetError("relabel.standardize=item groups an original with its edits; a Pick-a-Pic pair has two "
                           "independent images: use relabel.standardize=shard (--set relabel.standardize=shard)")
    return (score.model_copy(update={"subject_gate": None}),
            cfg.model_copy(update={"min_consistency": 0.0, "edit_gate": None,
                                   "min_margin": cfg.min_margin if drop_near_ties else 0.0}))


def relabel_pickapic_table(table: pa.Table, score: ScoreConfig, cfg: RelabelConfig, get_scorer, *, shard: int = 0) -> tuple[pa.Table, pa.Table]:
    """(kept rows with label_0 rewritten, the scores table of every row). jpg_0 plays the original."""
    missing = [c for c in PICKAPIC_COLUMNS if c not in table.schema.names]
    if missing:
        raise DatasetError(f"source has no column(s) {missing}; a Pick-a-Pic-format dataset has caption, jpg_0, jpg_1 (label_0)")
    captions = table.column("caption").to_pylist()
    a, b = _image_bytes(table.column("jpg_0")), _image_bytes(table.column("jpg_1"))
    keys = [f"{shard:05d}-{k:07d}" for k in range(table.num_rows)]  # unique even for duplicate rows
    prompts = [c if isinstance(c, str) else "" for c in captions]
    scores = relabel_rows(keys, prompts, {"original": a, "edited": b}, score, cfg, get_scorer)
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
    write_atomic(path, buf.getvalue(), fs=fs)


def relabel_dataset(src: str | list[str], out_dir: str, profile: Profile, reward: str | None = None, *,
                    rows_per_shard: int | None = None, drop_near_ties: bool = False) -> dict:
    """Rescore jpg_0/jpg_1 of a Pick-a-Pic-format Parquet dataset (glob, file list or fsspec URLs) with
    the profile's rewards (or only `reward`) and write it to `out_dir` as `part-XXXXX.parquet` with
    `label_0` rewritten (1 = jpg_0 scores higher), pairs without an order (and near-ties, with
    `drop_near_ties`) and undecodable rows dropped, the source label kept as `label_0_source`, plus
    `margin` and `scores`. Standardised per shard. Also writes relabel.json, README.md and plots."""
    import fsspec

    from richpref.views.datacard import write_relabel_report

    score, cfg = dataset_relabel_config(profile.score, profile.relabel, reward, drop_near_ties)
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
    scorers = RewardSet(score, profile.models_root)
    shard, total, kept_rows, reasons = 0, 0, 0, {}
    agree, with_label, all_scores = 0, 0, []
    try:
        for f in files:
            with fsspec.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                for batch in pf.iter_batches(batch_size=step):
                    table = pa.Table.from_batches([batch])
                    rows, scores = relabel_pickapic_table(table, score, cfg, scorers.get, shard=shard)
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
    summary = {"source": files, "out_dir": out_dir, "rewards": {n: {**score.rewards[n].model_dump(), "weight": cfg.weight(n)}
                                                               for n in score.scored()},
               "standardize": cfg.standardize, "min_margin": cfg.min_margin,
               "near_ties": (f"dropped (margin <= relabel.min_margin {cfg.min_margin:g})" if drop_near_ties else
                             "kept: labels follow the reward's order; only pairs without one (same bytes, margin "
                             "within float noise of 0) dropped"), "shards": shard, "rows": total,
               "kept": kept_rows, "rejected": reasons,
               "agreement_with_source_label": (agree / with_label) if with_label else None,
               "source_rows_with_a_label": with_label}
    out_fs.pipe_file(f"{out_root.rstrip('/')}/relabel.json", json.dumps(summary, indent=2).encode())
    summary["report"] = write_relabel_report(out_dir, summary, pa.concat_tables(all_scores) if all_scores else None,
                                             score.scored(), cfg.min_margin)
    return summary
