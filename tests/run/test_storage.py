"""A run's layout and files (richpref/run/storage.py), on the local filesystem and on fsspec's in-memory
one, which like an object store cannot append to a file."""
from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pytest

from richpref.run.runner import parquet_bytes as _parquet  # how the runner writes a shard
from richpref.run.storage import RunStore, join
from richpref.schemas.common import check_run_name


@pytest.fixture
def memory_dir():
    """A data dir of its own on the in-memory filesystem (shared by the whole process)."""
    import fsspec

    url = f"memory://richpref-{uuid.uuid4().hex}/data"
    yield url
    fsspec.filesystem("memory").rm(url.split("://", 1)[1].rsplit("/", 1)[0], recursive=True)


@pytest.mark.parametrize("name", ["a", "run-1", "r.2_x", "A" * 128])
def test_run_names_of_letters_digits_dots_dashes_and_underscores_are_kept(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["", None, ".hidden", "-x", "a/b", "../up", "a b", "A" * 129])
def test_a_run_name_that_is_no_plain_folder_name_is_refused_naming_it(name):
    with pytest.raises(ValueError, match=r"run name .* is not allowed: use letters, digits"):
        check_run_name(name)
    with pytest.raises(ValueError):
        RunStore("/tmp/unused", name)


def test_join_drops_a_trailing_slash_of_the_base_only():
    assert join("s3://bucket/data/", "runs", "r") == "s3://bucket/data/runs/r"
    assert join("/d", "a/") == "/d/a/"
    assert join("s3://bucket/BOX/", "runs") == "s3://bucket/BOX/runs"  # only the slash goes


def test_a_local_run_lives_under_runs_and_its_paths_are_plain(tmp_path):
    store = RunStore(f"{tmp_path}/BOX/", "r1")
    assert store.data_dir == f"{tmp_path}/BOX"
    assert store.root == f"{tmp_path}/BOX/runs/r1"
    assert store.shard_path("critique", 3) == f"{tmp_path}/BOX/runs/r1/critique/part-00003.parquet"
    assert store.scratch_dir("source") == f"{tmp_path}/BOX/runs/r1/_scratch/source"
    assert store.uri(store.root) == store.root


def test_a_run_on_a_url_gives_urls_back(memory_dir):
    store = RunStore(memory_dir, "r1")
    path = memory_dir.split("://", 1)[1]
    assert store.root == f"/{path}/runs/r1"
    assert store.scratch_dir("source") == f"{memory_dir}/runs/r1/_scratch/source"
    assert store.write_text("run.json", "{}") == f"{memory_dir}/runs/r1/run.json"


def test_shards_are_the_committed_part_files_in_shard_order(tmp_path):
    store = RunStore(str(tmp_path), "r")
    assert store.shards("edit") == []  # no stage folder yet
    for shard in (10, 2):
        store.write_bytes(store.shard_path("edit", shard), b"x")
    folder = tmp_path / "runs" / "r" / "edit"
    (folder / "part-00004.parquet.tmp-0123abcd").write_bytes(b"half")  # a writer's, not renamed yet
    (folder / "part-00007.json").write_text("{}")
    (folder / "notes.txt").write_text("")
    assert store.shards("edit") == [2, 10]


def test_a_written_shard_reads_back_whole_or_by_column(tmp_path, memory_dir):
    table = pa.table({"item_id": ["a", "b"], "status": ["ok", "rejected"], "image": [b"1", b"2"]})
    for data_dir in (str(tmp_path), memory_dir):
        store = RunStore(data_dir, "r")
        store.write_bytes(store.shard_path("sample", 0), _parquet(table))
        assert store.read_shard("sample", 0).equals(table)
        assert store.read_shard("sample", 0, ["status"]).to_pylist() == [{"status": "ok"}, {"status": "rejected"}]


def test_write_bytes_leaves_no_temporary_file_and_runs_the_hook_before_the_rename(tmp_path):
    store = RunStore(str(tmp_path), "r")
    path = store.shard_path("edit", 1)
    seen = []
    store.write_bytes(path, b"new", before_commit=lambda: seen.append(sorted(p.name for p in (tmp_path / "runs" / "r" / "edit").iterdir())))
    assert len(seen[0]) == 1 and seen[0][0].startswith("part-00001.parquet.tmp-")  # only the temporary file then
    assert [p.name for p in (tmp_path / "runs" / "r" / "edit").iterdir()] == ["part-00001.parquet"]


def test_a_stage_reads_as_one_table_in_shard_order_with_columns_missing_in_a_shard_as_nulls(tmp_path):
    store = RunStore(str(tmp_path), "r")
    assert store.read_stage("relabel").num_columns == 0  # nothing yet
    store.write_bytes(store.shard_path("relabel", 11), _parquet(pa.table({"item_id": ["c"], "flipped": [True]})))
    store.write_bytes(store.shard_path("relabel", 3), _parquet(pa.table({"item_id": ["a", "b"]})))
    assert store.read_stage("relabel").to_pylist() == [
        {"item_id": "a", "flipped": None}, {"item_id": "b", "flipped": None}, {"item_id": "c", "flipped": True}]
    assert store.read_stage("relabel", ["item_id"]).column_names == ["item_id"]


def test_last_run_is_the_run_json_or_empty(tmp_path):
    store = RunStore(str(tmp_path), "r")
    assert store.last_run() == {}
    store.write_text("run.json", "{not json")
    assert store.last_run() == {}
    store.write_text("run.json", json.dumps({"flow_run": "abc", "stages": ["source"]}))
    assert store.last_run() == {"flow_run": "abc", "stages": ["source"]}


def test_a_local_log_is_one_file_of_sorted_json_lines_in_order(tmp_path):
    store = RunStore(str(tmp_path), "r")
    assert store.read_log("computed.jsonl") == []
    store.append_log("computed.jsonl", {"stage": "edit", "shard": 1})
    store.append_log("computed.jsonl", {"stage": "cutout", "shard": 0})
    text = (tmp_path / "runs" / "r" / "_log" / "computed.jsonl").read_text()
    assert text == '{"shard": 1, "stage": "edit"}\n{"shard": 0, "stage": "cutout"}\n'
    assert store.read_log("computed.jsonl") == [{"stage": "edit", "shard": 1}, {"stage": "cutout", "shard": 0}]


def test_a_log_where_files_cannot_be_appended_to_is_one_object_a_record(memory_dir):
    import fsspec

    store = RunStore(memory_dir, "r")
    store.append_log("computed.jsonl", {"stage": "edit", "shard": 1})
    store.append_log("computed.jsonl", {"stage": "edit", "shard": 2})
    objects = fsspec.filesystem("memory").ls(f"{store.root}/_log/computed.jsonl.d", detail=False)
    assert len(objects) == 2 and all(o.endswith(".json") for o in objects)
    assert sorted(r["shard"] for r in store.read_log("computed.jsonl")) == [1, 2]


def test_a_run_folder_copied_down_from_an_object_store_keeps_its_records_when_logged_to_locally(tmp_path):
    store = RunStore(str(tmp_path), "r")
    copied = tmp_path / "runs" / "r" / "_log" / "computed.jsonl.d"
    copied.mkdir(parents=True)
    (copied / "0a.json").write_text('{"shard": 0, "stage": "edit"}\n')
    store.append_log("computed.jsonl", {"stage": "edit", "shard": 1})
    assert store.read_log("computed.jsonl") == [{"stage": "edit", "shard": 1}, {"stage": "edit", "shard": 0}]
