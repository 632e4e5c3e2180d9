"""Training pairs read from Parquet behind an fsspec URL (s3://, gs://, hf://) by row group, never
copied whole: the footers give the row counts, `label_0` is read as one column, and a batch reads the
row groups that hold its rows (the last few are kept, batches often share them).

It offers what the trainer asks of a `datasets.Dataset`: `len`, `column_names`, `ds["label_0"]`,
`ds[[rows]]` (a dict of columns), `select(indices)` and `select_columns(columns)`.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from ..sources.parquet import footer, open_parquet
from .pair_rows import FileRows

ROW_GROUPS_KEPT = 4
ROW_GROUPS_READ: list[tuple[str, int]] = []  # (file, row group) whose data pages were read (tests check it)


class RemotePairs:
    def __init__(self, files: list[str], columns: list[str] | None = None, rows: np.ndarray | None = None,
                 _groups: OrderedDict | None = None) -> None:
        self.files = files
        self._spans = []  # (file, row group, first global row)
        total, counts = 0, []
        for f in files:
            meta = footer(f)  # a version request each on an object store: once per file here
            counts.append(meta.num_rows)
            for g in range(meta.num_row_groups):
                self._spans.append((f, g, total))
                total += meta.row_group(g).num_rows
        self._origin = FileRows(files, counts)
        self._starts = [s[2] for s in self._spans]
        self._total = total
        self.column_names = columns or list(footer(files[0]).schema.to_arrow_schema().names)
        self.rows = np.arange(total, dtype=np.int64) if rows is None else rows
        self._groups: OrderedDict = _groups if _groups is not None else OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def select_columns(self, columns: list[str]) -> "RemotePairs":
        return RemotePairs(self.files, list(columns), self.rows, self._groups)

    def select(self, indices) -> "RemotePairs":
        return RemotePairs(self.files, self.column_names, self.rows[np.asarray(list(indices), dtype=np.int64)],
                           self._groups)

    def where(self, k: int) -> str:
        """The file and row of pair k (richpref/training/pair_rows.py)."""
        return self._origin.where(int(self.rows[k]))

    def _group(self, i: int) -> pa.Table:
        f, g, _ = self._spans[i]
        key = (f, g, tuple(self.column_names))
        if key not in self._groups:
            ROW_GROUPS_READ.append((f, g))
            self._groups[key] = open_parquet(f).read_row_group(g, columns=self.column_names)
            while len(self._groups) > ROW_GROUPS_KEPT:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]

    def _column(self, key: str) -> pa.ChunkedArray:
        """One column of the kept rows: that column's chunks only."""
        parts = [open_parquet(f).read(columns=[key]).column(key) for f in self.files]
        return pa.chunked_array([c for p in parts for c in p.chunks]).take(pa.array(self.rows))

    def present(self, column: str) -> int:
        """Pairs whose `column` is not null (counted in Arrow)."""
        return len(self.rows) - self._column(column).null_count

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._column(key).to_pylist()
        idx = [int(key)] if isinstance(key, (int, np.integer)) else [int(k) for k in key]
        out: dict[str, list] = {c: [] for c in self.column_names}
        for k in idx:
            row = int(self.rows[k])
            i = bisect.bisect_right(self._starts, row) - 1
            table = self._group(i)
            rec = table.slice(row - self._spans[i][2], 1).to_pylist()[0]
            for c in self.column_names:
                out[c].append(rec[c])
        return {c: v[0] for c, v in out.items()} if isinstance(key, (int, np.integer)) else out


def remote_parquet_files(url: str) -> list[str]:
    """The Parquet files behind a URL: a folder's (recursively), a file, or a glob's matches."""
    from richpref.common.objstore import url_to_fs

    fs, inner = url_to_fs(url)
    proto = url[: url.index("://") + 3]
    found = fs.glob(inner.rstrip("/") + "/**/*.parquet") if fs.isdir(inner) else fs.glob(inner)
    return sorted(proto + f for f in found if f.endswith(".parquet"))
