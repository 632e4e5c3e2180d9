"""What every source reader offers: a row count known cheaply, rows [a, b) read on their own, and a
cheap fingerprint of rows [a, b) that changes when their content does.

Rows are plain dicts of column -> value. A row the reader could not parse carries `BAD_ROW`
(`"line 9: not valid JSON (...)"`) and `RAW` (its text, for a stable item id) instead of columns.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Protocol

BAD_ROW = "__bad_row__"
RAW = "__raw__"


class SourceError(ValueError):
    """The input as a whole cannot be used (missing file or column): nothing has run yet."""


class PartReader(Protocol):
    """One file (or one dataset) of a source."""

    name: str

    def num_rows(self) -> int: ...

    def columns(self) -> list[str]: ...

    def read(self, start: int, stop: int, columns: list[str], until: int | None = None) -> list[dict]: ...

    def fingerprint(self, start: int, stop: int, columns: list[str]) -> str: ...


@dataclass
class Span:
    part: int
    start: int  # rows of that part
    stop: int


class ConcatReader:
    """Several parts read as one source: global row i is row i - (rows before it) of its part."""

    def __init__(self, source_id: str, parts: list[PartReader]) -> None:
        if not parts:
            raise SourceError(f"source {source_id!r} has no files")
        self.source_id = source_id
        self.parts = parts
        self._ends: list[int] | None = None

    def _cumulative(self) -> list[int]:
        if self._ends is None:
            ends, total = [], 0
            for p in self.parts:
                total += p.num_rows()
                ends.append(total)
            self._ends = ends
        return self._ends

    def num_rows(self) -> int:
        return self._cumulative()[-1]

    def columns(self) -> list[str]:
        return self.parts[0].columns()

    def spans(self, start: int, stop: int) -> list[Span]:
        ends = self._cumulative()
        out = []
        i = bisect.bisect_right(ends, start)
        while i < len(self.parts) and start < stop:
            begin = ends[i - 1] if i else 0
            end = min(stop, ends[i])
            if end > start:
                out.append(Span(i, start - begin, end - begin))
            start = end
            i += 1
        return out

    def read(self, start: int, stop: int, columns: list[str], until: int | None = None) -> list[dict]:
        """Rows [start, stop). `until`: where the rows the caller will ask for stop, so a part may read
        ahead up to there (and no further) and serve the next calls from what it read."""
        rows: list[dict] = []
        ends = self._cumulative()
        for s in self.spans(start, stop):
            ahead = None if until is None else until - (ends[s.part - 1] if s.part else 0)
            rows += self.parts[s.part].read(s.start, s.stop, columns, ahead)
        return rows

    def fingerprint(self, start: int, stop: int, columns: list[str]) -> str:
        h = hashlib.sha256()
        for s in self.spans(start, stop):
            part = self.parts[s.part]
            h.update(f"{part.name}:{s.start}:{s.stop}:".encode())
            h.update(part.fingerprint(s.start, s.stop, columns).encode())
        return h.hexdigest()
