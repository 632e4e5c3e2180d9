"""`source.kind: hf`: a dataset saved with `datasets` (one split or a dict of them), a folder laid out
like a Hub repo (Parquet or JSONL, never both), a Hub id in the local Hub cache (a new commit in the
cache is read again, a pinned revision is kept), a Hub id the Hub cannot serve (one message naming it),
the offline switches, and a streamed Hub dataset read shard after shard as one stream."""
from __future__ import annotations

import json
import socket

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from richpref.schemas.config import SourceConfig
from richpref.sources import SourceError, stamp
from richpref.sources.hf import StreamingPart, _offline
from richpref.tasks.source import check_source, shard_source


def _prompts(cfg: SourceConfig) -> list[str]:
    return [r["prompt"] for t in shard_source(cfg) for r in t.to_pylist()]


def _part(n: int) -> StreamingPart:
    """The reader as it is after opening a Hub dataset (that step needs the Hub), over a local stream."""
    part = object.__new__(StreamingPart)
    part.name, part.revision, part._rows = "local", "r", n
    part.ds = datasets.Dataset.from_dict({"caption": [f"c{i}" for i in range(n)]}).to_iterable_dataset()
    part._cursor, part.skips = None, 0
    return part


def test_shards_read_in_order_open_one_stream_and_a_jump_opens_another():
    part = _part(10)
    got = [part.read(a, min(10, a + 3), ["caption"]) for a in range(0, 10, 3)]
    assert [r["caption"] for rows in got for r in rows] == [f"c{i}" for i in range(10)]
    assert part.skips == 1  # before: one skip(start) stream per shard, reading rows 0..start each time
    assert part.read(3, 6, ["caption"]) == [{"caption": f"c{i}"} for i in range(3, 6)]
    assert part.skips == 2
    assert part.read(8, 12, ["caption"]) == [{"caption": "c8"}, {"caption": "c9"}]  # the stream ends: what it has


def test_a_saved_dataset_dict_reads_the_split_asked_for_and_names_the_splits_it_has(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"caption": ["t0", "t1", "t2"]}),
                          "test": datasets.Dataset.from_dict({"caption": ["held 0", "held 1"]})}).save_to_disk(str(tmp_path / "dd"))
    assert _prompts(SourceConfig(kind="hf", dataset=str(tmp_path / "dd"), split="test")) == ["held 0", "held 1"]
    assert _prompts(SourceConfig(kind="hf", dataset=str(tmp_path / "dd"))) == ["t0", "t1", "t2"]
    with pytest.raises(SourceError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        check_source(SourceConfig(kind="hf", dataset=str(tmp_path / "dd"), split="validation"))


def test_a_jsonl_repo_folder_reads_its_prompt_column_and_one_mixing_formats_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    for k in range(2):
        (data / f"train-0000{k}-of-00002.jsonl").write_text("".join(json.dumps({"text": f"p{k}{i}"}) + "\n" for i in range(2)))
    monkeypatch.chdir(tmp_path)  # a relative folder is read from the working directory
    cfg = SourceConfig(kind="hf", dataset="repo", prompt_column="text")
    assert _prompts(cfg) == ["p00", "p01", "p10", "p11"]
    assert {r["source"] for t in shard_source(cfg) for r in t.to_pylist()} == {"repo"}
    pq.write_table(pa.table({"text": ["x"]}), data / "train-00002-of-00003.parquet")
    with pytest.raises(SourceError, match=r"mix formats \['jsonl', 'parquet'\]"):
        check_source(cfg)


def test_a_repo_folder_with_a_subfolder_per_split_reads_the_split_asked_for(tmp_path):
    for split, files in (("train", {"a": ["t0", "t1"], "b": ["t2"]}), ("test", {"c": ["held"]})):
        (tmp_path / "data" / split).mkdir(parents=True)
        for name, prompts in files.items():
            pq.write_table(pa.table({"caption": prompts}), tmp_path / "data" / split / f"{name}.parquet")
    # before: FileNotFoundError on the first of `datasets`' split patterns that matched no file
    assert _prompts(SourceConfig(kind="hf", dataset=str(tmp_path))) == ["t0", "t1", "t2"]
    assert _prompts(SourceConfig(kind="hf", dataset=str(tmp_path), split="test")) == ["held"]


def test_a_folder_without_data_files_fails_naming_what_it_holds(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("no data here")
    with pytest.raises(SourceError, match=r"no Parquet or JSONL files for split 'train' \(found \[.*readme\.md'\]\)"):
        check_source(SourceConfig(kind="hf", dataset=str(tmp_path / "notes")))  # before: datasets' FileNotFoundError


def _cache_commit(hub, sha: str, prompts: list[str], *, main: bool = True) -> None:
    repo = hub / "datasets--someone--prompts"
    data = repo / "snapshots" / sha / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"caption": prompts}), data / "train-00000-of-00001.parquet")
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)


def test_a_cached_hub_dataset_is_read_again_when_the_cache_moves_to_another_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    old, new = "1" * 40, "2" * 40
    _cache_commit(tmp_path / "hub", old, ["old 0", "old 1", "old 2"])
    cfg = SourceConfig(kind="hf", dataset="someone/prompts", shard_size=2)
    assert _prompts(cfg) == ["old 0", "old 1", "old 2"]
    before = stamp(cfg)
    _cache_commit(tmp_path / "hub", new, ["new 0", "new 1"])  # `hf download` of a newer commit
    assert stamp(cfg) != before
    assert _prompts(cfg) == ["new 0", "new 1"]  # before: the process kept reading the old commit
    assert _prompts(cfg.model_copy(update={"revision": old})) == ["old 0", "old 1", "old 2"]  # a pinned revision


def test_a_hub_dataset_the_hub_cannot_serve_fails_naming_it_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(SourceError, match=r"'someone/absent' is neither .* the Hub \(HF_ENDPOINT\) could not serve it "
                                          r"\(ConnectError.*`hf download --repo-type dataset someone/absent`"):
        check_source(SourceConfig(kind="hf", dataset="someone/absent"))  # before: a bare ConnectError traceback
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="'someone/absent' is neither a local folder nor in the local Hub cache and the Hub is offline"):
        check_source(SourceConfig(kind="hf", dataset="someone/absent"))


@pytest.mark.parametrize("env,offline", [
    ({}, False), ({"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "false"}, False),
    ({"HF_HUB_OFFLINE": "1"}, True), ({"HF_HUB_OFFLINE": "TRUE"}, True), ({"HF_HUB_OFFLINE": "Yes"}, True),
    ({"HF_DATASETS_OFFLINE": "1"}, True), ({"HF_DATASETS_OFFLINE": "True"}, True), ({"HF_DATASETS_OFFLINE": "YES"}, True),
])
def test_either_offline_switch_in_any_spelling_means_offline(monkeypatch, env, offline):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _offline() is offline
