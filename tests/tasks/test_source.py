"""The source stage (richpref/tasks/source.py), read shard by shard: same rows as reading it whole,
only the rows asked for, cheap honest keys, Pick-a-Pic's preferred image, and bad rows and prompts as
rejected rows (a missing column fails the whole input). Dedupe across shards: tests/sources/test_dedupe.py."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from richpref.schemas.config import SourceConfig
from richpref.sources import parquet as parquet_reader
from richpref.sources import SourceError
from richpref.tasks.source import check_source, open_view, shard_source
from test_bad_inputs import GOOD
from image_helpers import encoded


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return encoded(Image.fromarray(pixels), "JPEG")


def _rows(tables) -> list[dict]:
    return [r for t in tables for r in t.to_pylist()]


def _pickapic(path, n: int, *, row_group_size: int, image_of=lambda i: i, label_of=lambda i: float(i % 2),
              caption_of=lambda i: f"prompt {i}", extra: dict | None = None) -> None:
    cols = {
        "caption": [caption_of(i) for i in range(n)],
        "jpg_0": pa.array([_jpeg(2 * image_of(i)) for i in range(n)], pa.binary()),
        "jpg_1": pa.array([_jpeg(2 * image_of(i) + 1) for i in range(n)], pa.binary()),
        "label_0": pa.array([label_of(i) for i in range(n)], pa.float64()),
        **(extra or {}),
    }
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


# same rows as the whole-file reader of earlier versions ---------------------------------------------

def _reference_ids(source_id: str, builder: str, files: list[str], column: str) -> list[tuple[str, object]]:
    """Item ids and raw prompts as earlier versions computed them: `datasets` reading the whole input."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=files, split="train")
    col = "text" if builder == "text" else column
    return [(hashlib.sha256(json.dumps([source_id, i, r[col]]).encode()).hexdigest()[:16], r[col]) for i, r in enumerate(ds)]


@pytest.mark.parametrize("kind", ["prompts", "jsonl", "parquet"])
def test_streamed_rows_match_the_whole_file_reader(tmp_path, kind):
    prompts = [f"a {c} cat number {i}" for i, c in enumerate(["red", "green", "blue", "odd  spaced", "tabbed\tone"] * 5)]
    images = [_jpeg(i) for i in range(len(prompts))]
    if kind == "prompts":
        path = tmp_path / "p.txt"
        path.write_text("\n".join(prompts) + "\n")
        cfg = SourceConfig(kind="prompts", path=str(path), shard_size=4)
        ref = _reference_ids("p.txt", "text", [str(path)], "caption")
    elif kind == "jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("\n".join(json.dumps({"caption": p, "n": i}) for i, p in enumerate(prompts)) + "\n\n")
        cfg = SourceConfig(kind="jsonl", path=str(path), shard_size=4)
        ref = _reference_ids("p.jsonl", "json", [str(path)], "caption")
    else:
        for part in range(2):  # two files: rows continue across them
            half = slice(part * 13, None if part else 13)
            pq.write_table(pa.table({"caption": prompts[half], "img": pa.array(images[half], pa.binary())}),
                           tmp_path / f"train-{part}.parquet", row_group_size=5)
        cfg = SourceConfig(kind="parquet", path=str(tmp_path / "train-*.parquet"), image_column="img", shard_size=4)
        ref = _reference_ids("train-0.parquet,train-1.parquet", "parquet",
                             sorted(str(p) for p in tmp_path.glob("*.parquet")), "caption")
    rows = _rows(shard_source(cfg))
    assert [(r["item_id"], p) for r, (_, p) in zip(rows, ref)] == ref
    assert [r["source_row"] for r in rows] == list(range(len(prompts)))
    assert rows[3]["prompt"] == "a odd spaced cat number 3" and rows[4]["prompt"] == "a tabbed one cat number 4"
    if kind == "parquet":
        assert [r["image"] for r in rows] == images


# only the rows asked for ---------------------------------------------------------------------------

def test_offset_and_limit_read_only_the_row_groups_holding_those_rows(tmp_path):
    path = tmp_path / "big.parquet"
    _pickapic(path, 200, row_group_size=10, label_of=lambda i: 1.0)
    cfg = SourceConfig(kind="parquet", path=str(path), pickapic_preferred=True, offset=35, limit=20, shard_size=8)
    parquet_reader.ROW_GROUPS_READ.clear()
    assert check_source(cfg) == 3  # 20 rows / 8: counted from the footer
    view = open_view(cfg)
    keys = [view.shard_key(k) for k in range(3)]
    assert parquet_reader.ROW_GROUPS_READ == []  # counting and keying decode no page (keys read text chunks, no images)
    rows = _rows(shard_source(cfg))
    assert [r["source_row"] for r in rows] == list(range(35, 55))
    assert sorted(set(parquet_reader.ROW_GROUPS_READ)) == [("big.parquet", 3), ("big.parquet", 4), ("big.parquet", 5)]
    assert len(set(keys)) == 3
    with pytest.raises(SourceError, match="offset 500 is past its end"):
        check_source(cfg.model_copy(update={"offset": 500}))


@pytest.mark.parametrize("before", [0, 10])
def test_a_large_row_group_is_read_only_up_to_the_rows_asked_for(tmp_path, monkeypatch, before):
    """`before`: rows of a file ahead of it in the source (the bound is counted in the file's own rows)."""
    if before:
        _pickapic(tmp_path / "a-first.parquet", before, row_group_size=before)
    _pickapic(tmp_path / "b-one-group.parquet", 300, row_group_size=300, image_of=lambda i: i % 7)
    monkeypatch.setattr(parquet_reader, "WHOLE_ROW_GROUP_BYTES", 1)  # force the streaming path
    cfg = SourceConfig(kind="parquet", path=str(tmp_path), image_column="jpg_0", offset=before + 100, limit=5,
                       shard_size=5)
    [shard] = shard_source(cfg)
    assert shard.column("source_row").to_pylist() == list(range(before + 100, before + 105))
    assert shard.column("image").to_pylist() == [_jpeg(2 * (i % 7)) for i in range(100, 105)]
    [(first, kept)] = parquet_reader._LAST_GROUP.values()
    assert (first, kept.num_rows) == (100, 5)  # decoded up to its row 105, not on to the group's 300


@pytest.mark.parametrize("before", [0, 10])
def test_a_streamed_row_group_gives_every_shard_the_rows_a_whole_read_gives_and_is_read_once(tmp_path, monkeypatch,
                                                                                             before):
    """Rows 1000-2499 of one 2,600-row group in shards of 333: streamed in batches of 1,024, the first
    shard's rows start inside the first batch and later shards' cross into the next ones. `before`: rows
    of a file ahead of it in the source."""
    if before:
        _pickapic(tmp_path / "a-first.parquet", before, row_group_size=before, label_of=lambda i: 1.0)
    _pickapic(tmp_path / "long.parquet", 2600, row_group_size=2600, image_of=lambda i: i % 5, label_of=lambda i: 1.0)
    cfg = SourceConfig(kind="parquet", path=str(tmp_path), pickapic_preferred=True, offset=before + 1000, limit=1500,
                       shard_size=333, dedupe="none")
    whole = _rows(shard_source(cfg))
    assert [r["source_row"] for r in whole] == list(range(before + 1000, before + 2500))
    parquet_reader._LAST_GROUP.clear()
    parquet_reader.ROW_GROUPS_READ.clear()
    monkeypatch.setattr(parquet_reader, "WHOLE_ROW_GROUP_BYTES", 1)  # force the streaming path
    assert _rows(shard_source(cfg)) == whole
    assert parquet_reader.ROW_GROUPS_READ == [("long.parquet", 0)]  # read once, kept for the later shards


@pytest.mark.parametrize("whole_groups", [True, False])
def test_a_files_footer_is_parsed_once_however_many_shards_and_row_groups_are_read(tmp_path, monkeypatch,
                                                                                 whole_groups):
    """Each row group read opened the file afresh and parsed its footer again: on an object store a
    footer is one or two requests more per shard, and a big file's footer is megabytes."""
    from richpref.tasks.pickapic_source import read_rows

    path = tmp_path / "groups.parquet"
    _pickapic(path, 60, row_group_size=10, label_of=lambda i: 1.0)
    if not whole_groups:
        monkeypatch.setattr(parquet_reader, "WHOLE_ROW_GROUP_BYTES", 1)  # the streaming path
    parsed = []

    class Counting(pq.ParquetFile):
        def __init__(self, source, *args, metadata=None, **kwargs):
            if metadata is None:
                parsed.append(source)
            super().__init__(source, *args, metadata=metadata, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", Counting)
    cfg = SourceConfig(kind="parquet", path=str(path), pickapic_preferred=True, shard_size=8)
    parquet_reader.ROW_GROUPS_READ.clear()
    assert len(_rows(shard_source(cfg))) == 60
    assert len(set(parquet_reader.ROW_GROUPS_READ)) == 6 and len(parsed) == 1
    copy = tmp_path / "relabel.parquet"  # relabel-dataset's reader, on a file of its own
    copy.write_bytes(path.read_bytes())
    assert sum(read_rows(str(copy), a, a + 8).num_rows for a in range(0, 60, 8)) == 60
    assert len(parsed) == 2


# keys ---------------------------------------------------------------------------------------------

def test_a_changed_row_changes_the_key_of_its_shard_only(tmp_path):
    path = tmp_path / "train.parquet"
    changed_caption = lambda i: "a changed caption" if i == 19 else f"prompt {i}"  # noqa: E731 - row 19: shard 2
    for dedupe, expected in (("none", [2]), ("image", [2, 3, 4])):
        cfg = SourceConfig(kind="parquet", path=str(path), pickapic_preferred=True, dedupe=dedupe, shard_size=8)
        _pickapic(path, 40, row_group_size=8)
        before = [open_view(cfg).shard_key(k) for k in range(5)]
        _pickapic(path, 40, row_group_size=8, caption_of=changed_caption)
        after = [open_view(cfg).shard_key(k) for k in range(5)]
        # with dedupe a shard's rows depend on the rows before it, so later shards change too, never earlier ones
        assert [k for k in range(5) if before[k] != after[k]] == expected, dedupe
    # a larger limit keeps the keys of the shards it already had
    cfg = cfg.model_copy(update={"dedupe": "none"})
    assert [open_view(cfg.model_copy(update={"limit": 24})).shard_key(k) for k in range(3)] == \
        [open_view(cfg).shard_key(k) for k in range(3)]



def test_a_view_is_kept_while_its_files_are_unchanged_and_its_keys_are_of_one_look_at_them(tmp_path):
    """A worker computing shard after shard reuses its view, and the keys it memoised (a dedupe chain's)."""
    from richpref.tasks.source import STAGE

    (path := tmp_path / "p.txt").write_text("a\nb\n")
    view = open_view(cfg := SourceConfig(kind="prompts", path=str(path), shard_size=1))
    assert open_view(cfg) is view
    key_of = STAGE.shard_keys(type("P", (), {"source": cfg}))  # as a plan keys a stage's shards
    path.write_text("a\nbb\n")
    assert key_of(1) == view.shard_key(1) and open_view(cfg) is not view

# Pick-a-Pic rows the trainers skip, and bad rows ------------------------------------------------------

def test_pickapic_ties_unlabelled_and_identical_pairs_are_rejected_with_reasons(tmp_path):
    path = tmp_path / "flags.parquet"
    _pickapic(path, 5, row_group_size=5, label_of=lambda i: [1.0, 0.5, 0.0, 1.0, 0.0][i],
              extra={"has_label": [True, True, True, False, True], "are_different": [True, True, True, True, False]})
    cfg = SourceConfig(kind="parquet", path=str(path), pickapic_preferred=True)
    rows = _rows(shard_source(cfg))
    assert [r["reason"] for r in rows] == [
        None, "tie: label_0 is 0.5, no preferred image (source.pickapic_ties: keep takes jpg_0)", None,
        "no_label: has_label is false", "same_images: are_different is false"]
    assert rows[2]["image"] == _jpeg(5)  # label_0 = 0: jpg_1 of row 2
    keep = _rows(shard_source(cfg.model_copy(update={"pickapic_ties": "keep"})))
    assert keep[1]["status"] == "ok" and keep[1]["image"] == _jpeg(2)


def test_source_takes_the_preferred_pickapic_image(pickapic):
    [shard] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), pickapic_preferred=True))
    got = shard.to_pylist()
    assert [r["prompt"] for r in got] == ["a red apple", "a blue car", "two cats", "no label"]
    assert got[0]["image"] == pickapic.rows[0][1]  # label_0 = 1: jpg_0
    assert got[1]["image"] == pickapic.rows[1][2]  # label_0 = 0: jpg_1
    assert got[2]["status"] == "rejected" and got[2]["reason"].startswith("tie:")  # the DPO trainers skip ties
    assert got[3]["status"] == "rejected" and got[3]["reason"].startswith("no_preference:")
    [ties] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), pickapic_preferred=True, pickapic_ties="keep"))
    assert ties.to_pylist()[2]["image"] == pickapic.rows[2][1]  # a tie kept: jpg_0
    [chosen] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), image_column="jpg_1"))
    assert [r["image"] for r in chosen.to_pylist()] == [r[2] for r in pickapic.rows]


def test_bad_jsonl_lines_are_rejected_rows_naming_their_line(tmp_path):
    lines = [json.dumps({"case": f"ok{i}", "prompt": f"a cat {i}"}) for i in range(7)]
    lines += ["", '{"case": "broken_json", "prompt": ', json.dumps({"case": "number", "prompt": 12345}), "[1, 2]",
              json.dumps({"case": "last", "prompt": "a dog"})]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = SourceConfig(kind="jsonl", path=str(path), prompt_column="prompt", shard_size=4)
    rows = _rows(shard_source(cfg))
    assert len(rows) == 11  # the blank line is no row
    assert rows[7]["reason"] == "bad_row: line 9: not valid JSON (Expecting value at column 34)"
    assert rows[8]["reason"] == "bad_prompt: expected text, got int"
    assert rows[9]["reason"] == "bad_row: line 11: expected a JSON object, got list"
    assert rows[10]["status"] == "ok" and rows[10]["source_row"] == 10
    assert len({r["item_id"] for r in rows}) == 11


def test_a_file_that_is_not_text_fails_as_a_whole_naming_it(tmp_path):
    path = tmp_path / "data.jsonl"
    pq.write_table(pa.table({"caption": ["x"]}), path)
    with pytest.raises(SourceError, match=r"data.jsonl: line 1 is binary data.*source.kind"):
        check_source(SourceConfig(kind="jsonl", path=str(path)))
    csv = tmp_path / "table.jsonl"
    csv.write_text("caption,score\na cat,1\n")
    with pytest.raises(SourceError, match=r"table.jsonl: line 1: not valid JSON .*one JSON object per line"):
        check_source(SourceConfig(kind="jsonl", path=str(csv)))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match=r"broken.parquet: not a readable Parquet file"):
        check_source(SourceConfig(kind="parquet", path=str(broken)))


def test_a_source_with_bad_rows_keeps_every_row_with_a_reason(tmp_path):
    lines = [{"caption": "a dog"}, {"caption": ""}, {"caption": "   "}, {"caption": "y" * 10_000},
             {"caption": "tab\tand\x07bell"}, {"caption": None}, {"caption": "a dog"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    tables = shard_source(SourceConfig(kind="jsonl", path=str(path), shard_size=3))
    rows = [r for t in tables for r in t.to_pylist()]
    assert len(rows) == len(lines)
    assert len({r["item_id"] for r in rows}) == len(lines)  # same caption twice: two items, two ids
    assert [r["status"] for r in rows] == ["ok", "rejected", "rejected", "rejected", "ok", "rejected", "ok"]
    assert all(r["reason"] for r in rows if r["status"] == "rejected")


def test_a_missing_column_fails_the_whole_input_before_any_model_loads(tmp_path):
    path = tmp_path / "pickapic.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"], "jpg_0": [GOOD], "jpg_1": [GOOD], "label_0": [1.0]}), path)
    with pytest.raises(SourceError, match=r"no column\(s\) \['caption'\].*prompt_column"):
        shard_source(SourceConfig(kind="parquet", path=str(path)))
    t0 = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "richpref"), "--data-dir", str(tmp_path), "curate",
                           "--run", "x", "--set", "source.kind=parquet", "--set", f"source.path={path}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "'caption'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs" / "x" / "source").exists()
    assert time.monotonic() - t0 < 60


# datasets sources ------------------------------------------------------------------------------------

def test_hf_kind_reads_a_saved_dataset_and_a_hub_layout_folder(tmp_path):
    import datasets

    prompts = [f"prompt {i}" for i in range(12)]
    images = [_jpeg(i) for i in range(12)]
    ds = datasets.Dataset.from_dict({"caption": prompts, "jpg": images})
    ds.save_to_disk(str(tmp_path / "saved"))
    features = datasets.Features({"caption": datasets.Value("string"), "jpg": datasets.Image()})  # imagefolder's
    datasets.Dataset.from_dict({"caption": prompts, "jpg": [{"bytes": b, "path": None} for b in images]},
                               features=features).save_to_disk(str(tmp_path / "saved_images"))
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.table({"caption": prompts[:7], "jpg": pa.array(images[:7], pa.binary())}),
                   repo / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"caption": prompts[7:], "jpg": pa.array(images[7:], pa.binary())}),
                   repo / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"caption": ["held out"], "jpg": pa.array([b"x"], pa.binary())}), repo / "test-00000-of-00001.parquet")
    for dataset in (str(tmp_path / "saved"), str(tmp_path / "saved_images"), str(tmp_path / "repo")):
        cfg = SourceConfig(kind="hf", dataset=dataset, image_column="jpg", offset=3, limit=6, shard_size=4)
        rows = _rows(shard_source(cfg))
        assert [r["prompt"] for r in rows] == prompts[3:9], dataset
        assert [r["image"] for r in rows] == images[3:9]
        assert {r["source"] for r in rows} == {dataset}
    with pytest.raises(SourceError, match="no split 'validation'"):
        check_source(SourceConfig(kind="hf", dataset=str(tmp_path / "repo"), split="validation"))


def test_hf_kind_reads_a_hub_dataset_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    """A Hub id resolves to its cached snapshot (no network); the snapshot's revision is part of the key."""
    import huggingface_hub.constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someone--pickapic-mini"
    data = repo / "snapshots" / sha / "data"
    data.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    _pickapic(data / "train-00000-of-00001.parquet", 10, row_group_size=5, label_of=lambda i: 1.0)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = SourceConfig(kind="hf", dataset="someone/pickapic-mini", pickapic_preferred=True, limit=6, shard_size=3)
    rows = _rows(shard_source(cfg))
    assert [r["prompt"] for r in rows] == [f"prompt {i}" for i in range(6)]
    assert [r["image"] for r in rows] == [_jpeg(2 * i) for i in range(6)]
    with pytest.raises(SourceError, match="neither a local folder nor in the local Hub cache"):
        check_source(cfg.model_copy(update={"dataset": "someone/not-downloaded"}))


# where a source's files are ----------------------------------------------------------------------------

def test_a_relative_source_path_is_read_from_the_working_directory_then_the_project_root(tmp_path, monkeypatch):
    import re

    import richpref
    from richpref.tasks.source import resolve_input_path

    demo = "richpref/data/demo_prompts.txt"
    monkeypatch.chdir(tmp_path)
    assert resolve_input_path(demo) == str(Path(richpref.__file__).resolve().parents[1] / demo)
    (tmp_path / demo).parent.mkdir(parents=True)
    (tmp_path / demo).write_text("mine\n")
    assert resolve_input_path(demo) == str(tmp_path / demo)
    assert resolve_input_path("s3://bucket/prompts") == "s3://bucket/prompts"
    with pytest.raises(SourceError, match=re.escape(f"'nowhere.txt' matches no file (looked in {tmp_path} and the project root)")):
        resolve_input_path("nowhere.txt")


def test_a_source_folder_is_its_files_of_the_kind_in_every_subfolder_in_name_order(tmp_path):
    folder = tmp_path / "prompts"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "c.txt").write_text("two\n")
    (folder / "a.txt").write_text("one\n")
    (folder / "other.jsonl").write_text('{"caption": "not a prompt file"}\n')
    rows = _rows(shard_source(SourceConfig(kind="prompts", path=str(folder))))
    assert [r["prompt"] for r in rows] == ["one", "two"] and {r["source"] for r in rows} == {"prompts"}
    with pytest.raises(SourceError, match="source.kind 'prompts' needs source.path"):
        check_source(SourceConfig(kind="prompts", path=""))
    with pytest.raises(SourceError, match="source.kind 'hf' needs source.dataset"):
        check_source(SourceConfig(kind="hf"))


def test_a_store_url_without_credentials_is_a_source_error_naming_the_variables(no_store_credentials):
    # before, botocore's NoCredentialsError traceback (it is no OSError)
    with pytest.raises(SourceError, match=r"source.path 's3://no-such-bucket/prompts/' cannot be listed "
                                          r"\(NoCredentialsError: .*\); set AWS_ACCESS_KEY_ID"):
        check_source(SourceConfig(kind="parquet", path="s3://no-such-bucket/prompts/"))
