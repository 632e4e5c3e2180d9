"""Prompt and JSONL files (richpref/sources/text.py), and a source of several files read across their
boundaries (richpref/sources/base.py ConcatReader), through the source stage's shards."""
from __future__ import annotations

import hashlib
import json

import pytest

from richpref.schemas.config import SourceConfig
from richpref.sources.text import JsonlPart
from richpref.tasks.source import shard_source


def _rows(cfg: SourceConfig) -> list[dict]:
    return [r for t in shard_source(cfg) for r in t.to_pylist()]


def test_a_prompt_file_saved_with_windows_line_ends_gives_the_same_prompts(tmp_path):
    (tmp_path / "unix.txt").write_bytes(b"a red cat\na blue dog\n")
    (tmp_path / "windows.txt").write_bytes(b"a red cat\r\na blue dog\r\n")
    got = {name: [r["prompt"] for r in _rows(SourceConfig(kind="prompts", path=str(tmp_path / name)))]
           for name in ("unix.txt", "windows.txt")}
    assert got["windows.txt"] == got["unix.txt"] == ["a red cat", "a blue dog"]


@pytest.mark.parametrize("kind,text", [("prompts", "a red cat\na blue dog\n"),
                                       ("jsonl", '{"caption": "a red cat"}\n{"caption": "a blue dog"}\n')])
def test_a_file_saved_utf8_with_bom_gives_the_rows_of_one_without(tmp_path, kind, text):
    (tmp_path / "plain").write_bytes(text.encode())
    (tmp_path / "bom").write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Windows editors write
    got = {name: [(r["prompt"], r["status"]) for r in _rows(SourceConfig(kind=kind, path=str(tmp_path / name)))]
           for name in ("plain", "bom")}
    assert got["bom"] == got["plain"] == [("a red cat", "ok"), ("a blue dog", "ok")]  # before (jsonl): line 1 a bad row


def test_a_prompt_line_that_is_not_utf8_is_a_rejected_row_naming_its_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a red cat\ncaf\xe9 au lait\na blue dog\n")
    rows = _rows(SourceConfig(kind="prompts", path=str(path), shard_size=2))
    assert [r["status"] for r in rows] == ["ok", "rejected", "ok"]
    assert rows[1]["reason"] == "bad_row: line 2: not valid UTF-8 (invalid continuation byte at byte 3)"
    assert rows[2]["prompt"] == "a blue dog" and rows[2]["source_row"] == 2


def test_a_jsonl_line_that_is_not_utf8_is_a_rejected_row_naming_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"caption": "a red cat"}\n{"caption": "caf\xe9 au lait"}\n{"caption": "a blue dog"}\n')
    rows = _rows(SourceConfig(kind="jsonl", path=str(path), shard_size=2))
    assert [r["status"] for r in rows] == ["ok", "rejected", "ok"]  # before: kept as "caf\ufffd au lait"
    assert rows[1]["reason"] == "bad_row: line 2: not valid UTF-8 (invalid continuation byte at byte 16)"
    assert rows[2]["prompt"] == "a blue dog" and rows[2]["source_row"] == 2
    # A run resumed across the fix recomputes the shard holding that line, and only that one.
    part = JsonlPart(str(path), "caption")
    line_hashes = [hashlib.sha256(hashlib.sha256(line).digest()).hexdigest()
                   for line in path.read_bytes().splitlines(keepends=True)]
    assert part.fingerprint(0, 1, []) == line_hashes[0] and part.fingerprint(2, 3, []) == line_hashes[2]
    assert part.fingerprint(1, 2, []) != line_hashes[1]


@pytest.mark.parametrize("shard_size", [1, 2, 3, 7, 20])
def test_a_source_of_several_files_reads_across_their_boundaries_in_any_shard_size(tmp_path, shard_size):
    sizes = {"a.jsonl": 3, "b.jsonl": 1, "c.jsonl": 5, "d.jsonl": 2}
    for name, n in sizes.items():
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"{name} {i}"}) + "\n" for i in range(n)))
    rows = _rows(SourceConfig(kind="jsonl", path=str(tmp_path), prompt_column="prompt", shard_size=shard_size))
    assert [r["prompt"] for r in rows] == [f"{name} {i}" for name, n in sizes.items() for i in range(n)]
    assert [r["source_row"] for r in rows] == list(range(11))
    limited = _rows(SourceConfig(kind="jsonl", path=str(tmp_path), prompt_column="prompt", shard_size=shard_size,
                                 offset=2, limit=7))
    assert [r["prompt"] for r in limited] == [r["prompt"] for r in rows[2:9]]
