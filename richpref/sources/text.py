"""Prompt files (one prompt a line) and JSONL files, read by line without loading the file.

One pass over the file's bytes finds where each row starts (blank lines are no rows in JSONL, as in
`datasets`' json reader; in a prompt file every line is a row). Rows [a, b) then cost one seek and
the bytes of those lines. A line that is not valid JSON, not an object or not UTF-8 becomes a bad
row naming its line, never an exception. A UTF-8 BOM opening a JSONL file is dropped (a prompt drops it
as it drops every format character that only shapes how text is set: richpref/tasks/prompt_text.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array

from .base import BAD_ROW, RAW, SourceError

_INDEX: dict[tuple[str, int, int, bool], tuple[array, array, int]] = {}
BOM = b"\xef\xbb\xbf"


def _index(path: str, skip_blank: bool) -> tuple[array, array, int]:
    """(byte offset of each row's line, its 1-based line number, file size), kept per file version."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, skip_blank)
    if key in _INDEX:
        return _INDEX[key]
    offsets, lines = array("q"), array("q")
    pos, number = 0, 0
    with open(path, "rb") as f:
        for line in f:
            number += 1
            if not (skip_blank and not line.strip()):
                offsets.append(pos)
                lines.append(number)
            pos += len(line)
    _INDEX[key] = (offsets, lines, pos)
    return _INDEX[key]


class _LinePart:
    skip_blank = False
    drops_bom = False  # a UTF-8 BOM opening the file is no part of its first row
    rejects_bad_utf8 = False  # JSONL lines once decoded with errors="replace"

    def __init__(self, path: str, column: str) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.column = column
        self.lines_read = 0

    def num_rows(self) -> int:
        return len(_index(self.path, self.skip_blank)[0])

    def _raw(self, start: int, stop: int) -> list[tuple[int, bytes]]:
        offsets, numbers, size = _index(self.path, self.skip_blank)
        if start >= stop:
            return []
        end = offsets[stop] if stop < len(offsets) else size
        with open(self.path, "rb") as f:
            f.seek(offsets[start])
            data = f.read(end - offsets[start])
        out = []
        for i in range(start, stop):
            a = offsets[i] - offsets[start]
            b = (offsets[i + 1] if i + 1 < len(offsets) else size) - offsets[start]
            out.append((numbers[i], data[a:b]))
        self.lines_read += len(out)
        return out

    def fingerprint(self, start: int, stop: int, columns: list[str]) -> str:
        h = hashlib.sha256()
        for number, raw in self._raw(start, stop):
            h.update(hashlib.sha256(raw).digest())
            if number == 1 and self.drops_bom and raw.startswith(BOM):
                h.update(b"bom dropped")  # a bad row before: this shard (with dedupe, the later ones too) recomputes
            if self.rejects_bad_utf8 and not _is_utf8(raw):
                h.update(b"bad utf-8 rejected")  # kept with U+FFFD before: only shards holding such a line recompute
        return h.hexdigest()


class PromptPart(_LinePart):
    """Each line is one prompt (universal newlines: a trailing CR is dropped)."""

    def columns(self) -> list[str]:
        return [self.column]

    def read(self, start: int, stop: int, columns: list[str], until: int | None = None) -> list[dict]:
        rows = []
        for number, raw in self._raw(start, stop):
            text = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                rows.append({self.column: text.decode("utf-8")})
            except UnicodeDecodeError as exc:
                rows.append({BAD_ROW: f"line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})",
                             RAW: repr(text)})
        return rows


class JsonlPart(_LinePart):
    """One JSON object a line."""

    skip_blank = True
    drops_bom = True
    rejects_bad_utf8 = True

    def columns(self) -> list[str]:
        """Keys of the first objects of the file (a row missing a key is a row with a missing value)."""
        keys: dict[str, None] = {}
        first = self.read(0, min(100, self.num_rows()), [])
        for row in first:
            keys.update(dict.fromkeys(k for k in row if k not in (BAD_ROW, RAW)))
        if first and all(BAD_ROW in row for row in first):
            raise SourceError(f"{self.path}: {first[0][BAD_ROW]}, and none of its first {len(first)} rows is a JSON "
                              "object: write one JSON object per line, or set source.kind to the file's format")
        return list(keys)

    def read(self, start: int, stop: int, columns: list[str], until: int | None = None) -> list[dict]:
        rows = []
        for number, raw in self._raw(start, stop):
            if number == 1:
                raw = raw.removeprefix(BOM)  # a file saved "UTF-8 with BOM" (Windows editors)
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:  # kept with U+FFFD it would train on a prompt nobody wrote
                rows.append({BAD_ROW: f"line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})",
                             RAW: repr(raw.rstrip(b"\r\n"))})
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.append({BAD_ROW: f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})", RAW: text})
                continue
            if not isinstance(value, dict):
                rows.append({BAD_ROW: f"line {number}: expected a JSON object, got {type(value).__name__}", RAW: text})
                continue
            rows.append(value)
        return rows


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_text_file(path: str) -> None:
    """A prompt or JSONL file that is not text at all (e.g. a Parquet file) fails as a whole."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\x00" in head or head.startswith(b"PAR1"):
        raise SourceError(f"{path}: line 1 is binary data, not text; set source.kind to the file's format "
                          "(parquet for Parquet files) or point source.path at a text file")
