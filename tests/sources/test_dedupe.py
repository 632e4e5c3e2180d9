"""Dedupe across source shards (richpref/sources/dedupe.py): the first occurrence in row order wins,
whichever worker computes which shard in which order, with or without a scratch folder of digests."""
from __future__ import annotations

import multiprocessing
import os

from richpref.schemas.config import SourceConfig
from richpref.sources import parquet as parquet_reader
from richpref.tasks.source import compute_shard, open_view, shard_source
from test_source import _pickapic, _rows


def _dupes_source(tmp_path) -> SourceConfig:
    """Pick-a-Pic rows whose preferred images repeat across shards (every image once per 7 rows)."""
    path = tmp_path / "dupes.parquet"
    _pickapic(path, 40, row_group_size=6, image_of=lambda i: i % 7, label_of=lambda i: 1.0)
    return SourceConfig(kind="parquet", path=str(path), pickapic_preferred=True, shard_size=5)


def _worker(cfg_json: str, shards: list[int], scratch: str | None) -> dict[int, list[dict]]:
    cfg = SourceConfig.model_validate_json(cfg_json)
    return {k: compute_shard(cfg, k, scratch).to_pylist() for k in shards}


def test_dedupe_keeps_the_first_occurrence_across_shards_whatever_order_and_workers(tmp_path):
    from richpref.sources import dedupe

    cfg = _dupes_source(tmp_path)
    one = _rows(shard_source(cfg))
    kept = [r for r in one if r["status"] == "ok"]
    assert [r["source_row"] for r in kept] == list(range(7))
    first = {i % 7: one[i]["item_id"] for i in range(7)}
    for r in one[7:]:
        assert r["reason"] == f"duplicate: {first[r['source_row'] % 7]}"

    # two worker processes, each computing every other shard backwards, sharing a scratch folder
    scratch = str(tmp_path / "scratch")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        parts = pool.starmap(_worker, [(cfg.model_dump_json(), [7, 5, 3, 1], scratch),
                                       (cfg.model_dump_json(), [6, 4, 2, 0], scratch)])
    two = [r for k in range(8) for part in parts if k in part for r in part[k]]
    assert two == one
    assert len(os.listdir(scratch)) == 8  # one digest per shard, written once
    # a resumed process with nothing in memory reads the digests back instead of the earlier rows
    dedupe._INDEXES.clear()
    parquet_reader.ROW_GROUPS_READ.clear()
    parquet_reader._LAST_GROUP.clear()
    assert _worker(cfg.model_dump_json(), [7], scratch)[7] == [r for r in one if r["source_row"] >= 35]
    assert {rg for _, rg in parquet_reader.ROW_GROUPS_READ} == {5, 6}  # rows 35-39 only

    by_prompt = _rows(shard_source(cfg.model_copy(update={"dedupe": "prompt"})))
    assert all(r["status"] == "ok" for r in by_prompt)  # every caption differs
    assert all(r["status"] == "ok" for r in _rows(shard_source(cfg.model_copy(update={"dedupe": "none"}))))


def test_one_process_without_a_scratch_folder_dedupes_shards_in_any_order_and_reads_each_row_group_once(tmp_path):
    """Rows 2k and 2k+1 share an image, so a first occurrence can sit in the range just before a shard
    (rows 14 and 15: shards 2 and 3). One process, no scratch folder: in order, each shard reads only its
    own row group (the earlier ranges' digests are kept, not computed again); out of order, a shard
    computes every earlier range it has not seen, past the ones it has."""
    from richpref.sources import dedupe

    path = tmp_path / "neighbours.parquet"
    _pickapic(path, 40, row_group_size=5, image_of=lambda i: i // 2, label_of=lambda i: 1.0)
    cfg = SourceConfig(kind="parquet", path=str(path), pickapic_preferred=True, shard_size=5)
    dedupe._INDEXES.clear()
    parquet_reader.ROW_GROUPS_READ.clear()
    parquet_reader._LAST_GROUP.clear()
    in_order = _rows(shard_source(cfg))
    assert [r["status"] for r in in_order] == ["ok", "rejected"] * 20
    assert in_order[15]["reason"] == f"duplicate: {in_order[14]['item_id']}"
    assert parquet_reader.ROW_GROUPS_READ == [("neighbours.parquet", g) for g in range(8)]

    dedupe._INDEXES.clear()
    view = open_view(cfg)
    shuffled = {k: compute_shard(cfg, k, view=view).to_pylist() for k in (1, 3, 0, 2, 7, 5, 4, 6)}
    assert [r for k in range(8) for r in shuffled[k]] == in_order
