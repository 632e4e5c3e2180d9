"""Where a training pair lies in the files it was read from.

A source's pairs are renumbered as its ties and caption-less rows are dropped and its held-out pairs
split off, so "row 58123" of what is left names no row a user can open. `LocalPairs` (a `datasets`
table) and `RemotePairs` (Parquet behind a URL) keep each pair's row number in their files read end to
end, and `FileRows` turns it into the file and the row in that file.
"""
from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa


def located(source, k: int) -> str:
    """Pair k of a source: its file and row where the source knows them, else its number among the pairs."""
    return source.where(k) if hasattr(source, "where") else f"row {k}"


class FileRows:
    """The files of a source read end to end, with their row counts."""

    def __init__(self, files: list[str], counts: list[int]) -> None:
        self.files = files
        self.starts = np.cumsum([0, *counts[:-1]]).tolist() if counts else []

    def where(self, row: int) -> str:
        """`<file> row <n>` (0-based within that file)."""
        i = bisect.bisect_right(self.starts, row) - 1
        return f"{self.files[i]} row {row - self.starts[i]}"


class LocalPairs:
    """A `datasets.Dataset` of a source's rows (its files read end to end, or a dataset's split), with
    the rows kept: what the trainer asks of a source (`len`, `column_names`, `ds["label_0"]`,
    `ds[[rows]]`, `select`, `select_columns`), and `where(k)`, the file and row of pair k."""

    def __init__(self, ds, origin: FileRows | None = None, rows: np.ndarray | None = None) -> None:
        self.ds, self.origin = ds, origin
        self.rows = np.arange(len(ds), dtype=np.int64) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def column_names(self) -> list[str]:
        return self.ds.column_names

    def select_columns(self, columns: list[str]) -> "LocalPairs":
        return LocalPairs(self.ds.select_columns(list(columns)), self.origin, self.rows)

    def select(self, indices) -> "LocalPairs":
        return LocalPairs(self.ds, self.origin, self.rows[np.asarray(list(indices), dtype=np.int64)])

    def _column(self, key: str):
        """One column of the kept rows, as Arrow (a `datasets` column is read row by row: 5 s for a million
        labels, against 15 ms)."""
        return self.ds.with_format("arrow")[key].take(pa.array(self.rows))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._column(key).to_pylist()
        if isinstance(key, (int, np.integer)):
            return self.ds[int(self.rows[int(key)])]
        return self.ds[[int(self.rows[int(k)]) for k in key]]

    def present(self, column: str) -> int:
        """Pairs whose `column` is not null, counted in Arrow (a million masks never become Python bytes)."""
        return len(self.rows) - self._column(column).null_count

    def where(self, k: int) -> str:
        row = int(self.rows[k])
        return self.origin.where(row) if self.origin is not None else f"row {row}"
