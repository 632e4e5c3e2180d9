"""relabel-dataset: rescore an existing Pick-a-Pic-format dataset (jpg_0 vs jpg_1) and rewrite label_0.

RPO §4.1's "ImageReward-aligned" data is `relabel_dataset(..., reward="imagereward")`: the label
follows the reward's order. Only pairs without an order are dropped by default (the same bytes on both
sides, or a margin within float noise of 0); dropping near-ties (margin <= `relabel.min_margin`) is
the `drop_near_ties` option, and the card says which was used.

It is a run like curate's (`pipeline: relabel_dataset`, richpref/tasks/pickapic_*.py): the profile's
source becomes the dataset's Parquet files, and the shard runner (richpref/run/runner.py) computes
source -> score -> relabel -> pairs under `<out_dir>/runs/<run>/`, so a rerun computes only the shards
whose manifests are missing or stale, and `richpref status|summary|inspect --data-dir <out_dir> --run
<run>` read it. The counts come from the manifests: every source row is kept or rejected with a reason.
"""
from __future__ import annotations

import json
import logging
import os

import pyarrow.parquet as pq

from richpref.schemas.config import Profile, RelabelConfig, ScoreConfig
from richpref.schemas.rebuild import independent_pairs_problem
from richpref.sources import SourceError

log = logging.getLogger("richpref")

RUN = "relabel"  # the run's name under <out_dir>/runs/ unless given


class DatasetError(ValueError):
    """A source dataset that cannot be relabelled as given; the message says what to change."""


def dataset_relabel_config(score: ScoreConfig, cfg: RelabelConfig, reward: str | None,
                           drop_near_ties: bool = False) -> tuple[ScoreConfig, RelabelConfig]:
    """The profile's score and relabel configs for independent image pairs: only `reward` (voting,
    weight 1) when given, no subject or edit gate (nothing was edited), and min_margin 0 unless
    near-ties are to be dropped."""
    if reward is not None:
        if reward not in score.rewards:
            raise DatasetError(f"reward {reward!r} is not in the profile's score.rewards ({', '.join(score.rewards)})")
        score = score.model_copy(update={"rewards": {reward: score.rewards[reward]}})
        cfg = cfg.model_copy(update={"weights": {reward: 1.0}})
    score = score.model_copy(update={"subject_gate": None})
    cfg = cfg.model_copy(update={"min_consistency": 0.0, "edit_gate": None,
                                 "min_margin": cfg.min_margin if drop_near_ties else 0.0})
    problem = independent_pairs_problem(score, cfg)
    if problem:
        raise DatasetError(problem)
    return score, cfg


def dataset_profile(src: str, profile: Profile, reward: str | None = None, *, rows_per_shard: int | None = None,
                    drop_near_ties: bool = False) -> Profile:
    """The profile of the run: `pipeline: relabel_dataset`, the dataset as its Parquet source (an
    absolute path, so the run's profile.json names it wherever it is read), the relabel config for
    independent pairs. Refuses a dataset without the Pick-a-Pic columns before any model loads."""
    from richpref.tasks.pickapic_source import check_pickapic_columns, pickapic_files, shard_ranges

    score, cfg = dataset_relabel_config(profile.score, profile.relabel, reward, drop_near_ties)
    path = src if "://" in src else os.path.abspath(src)
    source = profile.source.model_copy(update={"kind": "parquet", "path": path, "offset": 0, "limit": None,
                                               "shard_size": rows_per_shard or profile.source.shard_size})
    prof = profile.model_copy(update={"pipeline": "relabel_dataset", "score": score, "relabel": cfg, "source": source})
    try:
        files = pickapic_files(prof)
        check_pickapic_columns(files)
    except SourceError as exc:
        raise DatasetError(str(exc).replace(f"source.path {path!r}", f"{src!r}")) from exc
    if not shard_ranges(prof):  # else a run of 0 pairs, and a card and plots of nothing
        raise DatasetError(f"{src!r} has no rows in its {len(files)} Parquet file(s): nothing to relabel; give the "
                           "dataset's files")
    return prof


def relabel_dataset(src: str, out_dir: str, profile: Profile, reward: str | None = None, *,
                    rows_per_shard: int | None = None, drop_near_ties: bool = False, run: str = RUN) -> dict:
    """Rescore jpg_0/jpg_1 of a Pick-a-Pic-format Parquet dataset (a file, folder, glob or fsspec URL)
    with the profile's rewards (or only `reward`) as the run `<out_dir>/runs/<run>/`. Its `pairs/`
    folder is the dataset as `part-XXXXX.parquet` with `label_0` rewritten (1 = jpg_0 scores higher),
    pairs without an order (and near-ties, with `drop_near_ties`) and undecodable rows dropped, the
    source label kept as `label_0_source`, plus `margin` and `scores`. Standardised per shard. Also
    writes README.md and plots/ beside them and the summary as the run's relabel.json."""
    from richpref.recipes.inline import run_inline
    from richpref.run.shard_contract import reason_counts
    from richpref.run.storage import RunStore
    from richpref.views.datacard import write_relabel_report

    prof = dataset_profile(src, profile, reward, rows_per_shard=rows_per_shard, drop_near_ties=drop_near_ties)
    score, cfg = prof.score, prof.relabel
    manifests = run_inline(prof, out_dir, run, report=False)
    store = RunStore(out_dir, run)
    source, decided, pairs = manifests["source"], manifests["relabel"], manifests["pairs"]
    rows, kept = sum(m.rows for m in source.values()), sum(m.rows for m in pairs.values())
    reasons = reason_counts([*source.values(), *decided.values()])  # a pair without a caption stops at the source
    if rows != kept + sum(reasons.values()):
        raise RuntimeError(f"run {run}: {rows} source rows but {kept} kept and {sum(reasons.values())} rejected")
    agree = with_label = 0
    for s in sorted(pairs):
        with store.fs.open(store.shard_path("pairs", s), "rb") as f:  # the two label columns, not the images
            pf = pq.ParquetFile(f)
            table = pf.read(columns=["label_0_source", "label_0"]) if "label_0_source" in pf.schema_arrow.names else None
        if table is not None:
            for old, new in zip(table.column("label_0_source").to_pylist(), table.column("label_0").to_pylist()):
                if old in (0.0, 1.0):
                    with_label += 1
                    agree += int(old == new)
    files = [pairs[s].uri for s in sorted(pairs)]
    summary = {"source": src, "out_dir": out_dir, "run": run, "pairs": store.uri(store.stage_dir("pairs")),
               "files": files, "rewards": {n: {**score.rewards[n].model_dump(), "weight": cfg.weight(n)} for n in score.scored()},
               "standardize": cfg.standardize, "min_margin": cfg.min_margin,
               "near_ties": (f"dropped (margin <= relabel.min_margin {cfg.min_margin:g})" if drop_near_ties else
                             "kept: labels follow the reward's order; only pairs without one (same bytes, margin "
                             "within float noise of 0) dropped"), "shards": len(source), "rows": rows,
               "kept": kept, "rejected": reasons,
               "agreement_with_source_label": (agree / with_label) if with_label else None,
               "source_rows_with_a_label": with_label}
    store.write_text("relabel.json", json.dumps(summary, indent=2))
    scores = store.read_stage("relabel") if decided else None
    # The card beside the Parquet files it describes (its usage loads `part-*.parquet`), as curate's.
    summary["report"] = write_relabel_report(summary["pairs"], summary, scores, score.scored(), cfg.min_margin)
    return summary
