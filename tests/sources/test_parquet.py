"""Parquet sources (richpref/sources/parquet.py): a shard's key follows the rows it holds, also after an
edit that keeps every footer fact (a word for one as long, a label flipped); a run's folder is refused."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from richpref.schemas.config import SourceConfig
from richpref.sources import parquet as parquet_reader
from richpref.tasks.source import open_view


def _write(path, captions: list[str], labels: list[int]) -> None:
    images = [bytes([i]) * 3000 for i in range(len(captions))]
    table = pa.table({"caption": captions, "jpg_0": pa.array(images, pa.binary()),
                      "jpg_1": pa.array(images[::-1], pa.binary()), "label_0": pa.array(labels, pa.float64())})
    pq.write_table(table, path, row_group_size=10, compression="none")  # sizes and min/max unchanged by the edits


def _keys(path, **kw) -> list[str]:
    view = open_view(SourceConfig(kind="parquet", path=str(path), shard_size=10, dedupe="none", **kw))
    return [view.shard_key(k) for k in range(3)]


def test_an_edit_that_keeps_every_footer_fact_changes_the_key_of_its_shard_only(tmp_path, monkeypatch):
    captions = [f"{i:02d}: a photo of a red cat" for i in range(30)]
    labels = [i % 2 for i in range(30)]
    edited = list(captions)
    edited[15] = edited[15].replace("red cat", "red dog")  # before: the same key, the old prompt kept
    flipped = list(labels)
    flipped[25] = 1 - flipped[25]
    path = tmp_path / "source.parquet"  # edited in place, as a user fixes a source

    read = []
    opened = parquet_reader.open_stored

    class Counted:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, pos):
            self.f.seek(pos)

        def read(self, n):
            read.append(n)
            return self.f.read(n)

    monkeypatch.setattr(parquet_reader, "open_stored", lambda path, size: Counted(opened(path, size)))
    parquet_reader.ROW_GROUPS_READ.clear()
    keys, footers = [], []
    for rows in ((captions, labels), (edited, labels), (captions, flipped)):
        _write(path, *rows)
        keys.append(_keys(path, pickapic_preferred=True))
        footers.append(pq.ParquetFile(path).metadata.to_dict()["row_groups"])
    assert footers[0] == footers[1] == footers[2]  # the footer cannot tell them apart
    a, b, c = keys
    assert [x == y for x, y in zip(a, b)] == [True, False, True]
    assert [x == y for x, y in zip(a, c)] == [True, True, False]
    assert parquet_reader.ROW_GROUPS_READ == []  # no page decoded to key a shard
    assert sum(read) < 10 * 3000  # captions and labels of 9 row groups: less than the images of one
    before = sum(read)
    assert _keys(path, pickapic_preferred=True) == c  # kept per file version: not read again
    assert sum(read) == before


def test_a_runs_folder_as_parquet_source_is_refused_naming_its_pairs_and_only_a_runs_folder(tmp_path):
    from richpref.sources import SourceError
    from richpref.tasks.source import check_source

    run = tmp_path / "run"
    for stage in ("pairs", "source"):
        (run / stage).mkdir(parents=True)
        pq.write_table(pa.table({"caption": ["a red cat"]}), run / stage / "part-00000.parquet")
    (run / "run.json").write_text("{}")
    with pytest.raises(SourceError, match=rf"^source.path '{run}' is a run's folder: give its pairs, '{run}/pairs'$"):
        check_source(SourceConfig(kind="parquet", path=str(run)))
    (run / "run.json").unlink()  # a folder of Parquet files with a pairs/ among them: read as it is
    assert check_source(SourceConfig(kind="parquet", path=str(run), shard_size=1)) == 2
    (run / "run.json").write_text("{}")
    shutil.rmtree(run / "pairs")  # a run.json beside no pairs/: no run's folder
    assert check_source(SourceConfig(kind="parquet", path=str(run), shard_size=1)) == 1
