"""A training pair's file and row (richpref/training/pair_rows.py): an image that cannot be decoded is
named by the file it is in and its row there, not by its number among the pairs left once ties,
caption-less rows and the held-out split are taken out."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from image_helpers import encoded
from richpref.schemas.training import PairSourceConfig
from richpref.training.data import Augment, DataError, PairBatches, PairMixture, load_pair_source, split_heldout
from richpref.training.remote_pairs import RemotePairs

GOOD = encoded(Image.new("RGB", (16, 16), (200, 10, 10)))


def _write(path, captions, labels, jpg_1=None):
    n = len(captions)
    pq.write_table(pa.table({"caption": captions, "jpg_0": [GOOD] * n, "jpg_1": jpg_1 or [GOOD] * n,
                             "label_0": pa.array(labels, pa.float64())}), path)
    return str(path)


def test_a_pair_is_named_by_its_file_and_row_there(tmp_path, caplog):
    _write(tmp_path / "a.parquet", ["kept", "a tie", None], [1.0, 0.5, 0.0])  # rows 1 and 2 dropped
    _write(tmp_path / "b.parquet", [], [])  # a run's shard that kept no pair: left out
    broken = _write(tmp_path / "c.parquet", ["c0", "c1", "c2", "c3"], [0.0, 1.0, 0.0, 1.0],
                    jpg_1=[GOOD, GOOD, b"not an image", GOOD])
    with caplog.at_level("INFO", logger="richpref"):
        ds = load_pair_source(PairSourceConfig(name="pairs", path=str(tmp_path)))
    assert len(ds) == 5 and ds["caption"] == ["kept", "c0", "c1", "c2", "c3"] and ds["label_0"] == [1, 0, 1, 0, 1]
    assert "data source pairs: dropped 1 of 7 rows whose label_0 is not 0 or 1 (ties)" in caplog.text
    assert "data source pairs: dropped 1 of 6 rows without a caption" in caplog.text
    limited = [load_pair_source(PairSourceConfig(name="pairs", path=str(tmp_path), limit=n)) for n in (2, 100)]
    assert [x["caption"] for x in limited] == [["kept"], ds["caption"]]  # the limit counts rows before the drops
    assert [ds.where(k) for k in (0, 3)] == [f"{tmp_path / 'a.parquet'} row 0", f"{broken} row 2"]
    named = dict(zip(ds["caption"], (ds.where(k) for k in range(len(ds)))))  # the captions are unique
    train, held = split_heldout(ds, 0.5, 0, "pairs")
    for part in (train, held):  # each pair keeps its file and row on either side
        assert len(part) and [part.where(k) for k in range(len(part))] == [named[c] for c in part["caption"]]
    batches = PairBatches([ds], PairMixture([5], [1.0], 0), Augment(16), batch_size=5, labels=["pairs"])
    with pytest.raises(DataError, match=f"data source 'pairs' {broken} row 2 jpg_1: cannot decode"):
        batches[0]  # a first pass over the source draws every pair


def test_remote_pairs_name_the_file_and_row_too(tmp_path):
    first = _write(tmp_path / "a.parquet", ["a0", "a1"], [1.0, 0.0])
    second = _write(tmp_path / "b.parquet", ["b0", "b1", "b2"], [1.0, 0.0, 1.0])
    pairs = RemotePairs([first, second]).select([4, 1, 2])
    assert [pairs.where(k) for k in range(3)] == [f"{second} row 2", f"{first} row 1", f"{second} row 0"]
    assert pairs["caption"] == ["b2", "a1", "b0"]


def test_masks_present_are_counted_among_the_kept_pairs(tmp_path, caplog):
    import datasets

    from richpref.training.pair_rows import LocalPairs

    masks = [None, b"m1", None, b"m3", b"m4"]
    local = LocalPairs(datasets.Dataset.from_dict({"edit_mask": masks})).select([0, 1, 2])
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"edit_mask": pa.array(masks, pa.binary())}), path)
    remote = RemotePairs([str(path)]).select([2, 3, 4])
    assert (local.present("edit_mask"), remote.present("edit_mask")) == (1, 2)
    assert (local["edit_mask"], remote["edit_mask"]) == ([None, b"m1", None], [None, b"m3", b"m4"])
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "jpg_0": [GOOD] * 3, "jpg_1": [GOOD] * 3,
                             "label_0": [1.0, 0.0, 1.0], "edit_mask": pa.array([b"m0", None, b"m2"], pa.binary())}),
                   tmp_path / "pairs.parquet")
    with caplog.at_level("INFO", logger="richpref"):
        load_pair_source(PairSourceConfig(name="pairs", path=str(tmp_path / "pairs.parquet")), need_mask=True)
    assert "data source pairs: 1 of 3 pairs have no edit_mask; their loss covers the whole image" in caplog.text
