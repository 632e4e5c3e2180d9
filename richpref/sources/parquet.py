"""Parquet files read by row group: rows [a, b) cost the row groups that hold them, nothing more.

The row count comes from the footer alone, and so does most of the fingerprint (row-group sizes
and column statistics); to see an edit that keeps those, it also hashes the stored bytes of the
columns that are not raw bytes (captions, labels: small), never the images. A file's
parsed footer is kept per (path, size, modification time): it is read again only when the file
changes.
"""
from __future__ import annotations

import bisect
import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from .base import SourceError

# Row groups up to this size are read whole and kept for the next shard (shards are usually smaller
# than row groups); larger ones are streamed, reading only up to the last row asked for.
WHOLE_ROW_GROUP_BYTES = 64 << 20

_FOOTERS: dict[tuple[str, int, int], pq.FileMetaData] = {}
_GROUP_DIGESTS: dict[tuple, str] = {}  # (file version, row group, columns, content) -> its part of a fingerprint
_LAST_GROUP: dict[tuple, tuple[int, pa.Table]] = {}  # the last rows read: (first row in its group, rows)
# (file name, row group) of every row group whose data pages were read, in order (tests check it).
ROW_GROUPS_READ: list[tuple[str, int]] = []


def is_url(path: str) -> bool:
    return "://" in path


def file_version(path: str) -> tuple[str, int, object]:
    """(path, size, version): a local file's modification time; a remote object's ETag (or mtime)."""
    if not is_url(path):
        st = os.stat(path)
        return os.path.abspath(path), st.st_size, st.st_mtime_ns
    from richpref.common.objstore import url_to_fs

    fs, inner = url_to_fs(path)
    info = fs.info(inner)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("blob_id")
    return path, int(info.get("size") or 0), str(version)


def open_stored(path: str, size: int | None = None):
    """The file's bytes as stored, local or through fsspec: a remote read fetches the byte range asked
    for, never the whole object. `size`: the object's size where known (its version), which spares a
    remote open its request for it."""
    if not is_url(path):
        return open(path, "rb")
    from richpref.common.objstore import url_to_fs

    fs, inner = url_to_fs(path)
    return fs.open(inner, "rb", cache_type="none", **({"size": size} if size else {}))


def open_parquet(path: str, size: int | None = None, **kw) -> pq.ParquetFile:
    """A Parquet file whose reads fetch the byte ranges asked for (the footer, then the row groups'
    column chunks): a local path as Arrow opens it, a remote one through `open_stored`."""
    return pq.ParquetFile(open_stored(path, size) if is_url(path) else path, **kw)


def footer(path: str, version: tuple | None = None) -> pq.FileMetaData:
    """The parsed footer of `path` at `version` (default: as it is now, which on an object store costs
    a request)."""
    key = version or file_version(path)
    meta = _FOOTERS.get(key)
    if meta is None:
        try:
            meta = open_parquet(path, size=key[1]).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"{path}: not a readable Parquet file ({exc}); point source.path at Parquet files "
                              "or set source.kind to the file's format") from exc
        _FOOTERS[key] = meta
    return meta


class ParquetPart:
    """One Parquet file, at the version it had when first asked (a reader that must see a changed file
    makes a new part: a source's view is opened again when its files' stamp changes). The last row
    group read is kept for the next shard of the same file version."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.basename(path.rstrip("/"))
        self._version: tuple | None = None
        self._first_rows: list[int] | None = None

    def version(self) -> tuple:
        # Asked once: on an object store each ask is a request (HEAD), and a shard asked for the footer
        # about nine times (435 HEADs to read a 400-row source in 50 shards from S3).
        if self._version is None:
            self._version = file_version(self.path)
        return self._version

    def _meta(self) -> pq.FileMetaData:
        return footer(self.path, self.version())

    def _open(self, **kw) -> pq.ParquetFile:
        """The file at this part's version, its footer already parsed: neither asked for again."""
        return open_parquet(self.path, size=self.version()[1], metadata=self._meta(), **kw)

    def num_rows(self) -> int:
        return self._meta().num_rows

    def columns(self) -> list[str]:
        return list(self._meta().schema.to_arrow_schema().names)

    def _starts(self) -> list[int]:
        """Each row group's first row, counted once (per shard it made keying a source quadratic in its
        row groups: 23 s to key the 125,000 shards of a 1,000-row-group file)."""
        if self._first_rows is None:
            meta, self._first_rows, total = self._meta(), [], 0
            for i in range(meta.num_row_groups):
                self._first_rows.append(total)
                total += meta.row_group(i).num_rows
        return self._first_rows

    def _groups(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(row group, first row of it wanted, end row of it wanted) for rows [start, stop)."""
        starts, meta = self._starts(), self._meta()
        out = []
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(starts) and starts[i] < stop:
            n = meta.row_group(i).num_rows
            lo, hi = max(start, starts[i]) - starts[i], min(stop, starts[i] + n) - starts[i]
            if hi > lo:
                out.append((i, lo, hi))
            i += 1
        return out

    def _read_group(self, rg: int, lo: int, hi: int, end: int, columns: list[str]) -> pa.Table:
        """Rows [lo, hi) of row group `rg`. It reads rows [lo, end) (`end`: where the source's selected
        rows stop in this group) and keeps them for the next shards of the group."""
        key = (*self.version(), rg, tuple(columns))
        got = _LAST_GROUP.get(key)
        if got is not None and got[0] <= lo and hi <= got[0] + got[1].num_rows:
            return got[1].slice(lo - got[0], hi - lo)
        ROW_GROUPS_READ.append((self.name, rg))
        group = self._meta().row_group(rg)
        if (end - lo) * 2 >= group.num_rows and group.total_byte_size <= WHOLE_ROW_GROUP_BYTES:
            table = self._open().read_row_group(rg, columns=columns).slice(lo, end - lo)
        else:  # only part of the group: decode batches up to `end` only (buffered reads, no whole-chunk prefetch)
            pf = self._open(buffer_size=1 << 20, pre_buffer=False)
            batches, seen = [], 0
            for batch in pf.iter_batches(batch_size=max(1, min(1024, end)), row_groups=[rg], columns=columns):
                if seen + batch.num_rows > lo:
                    a = max(0, lo - seen)
                    batches.append(batch.slice(a, min(batch.num_rows, end - seen) - a))
                seen += batch.num_rows
                if seen >= end:
                    break
            table = pa.Table.from_batches(batches) if batches else pf.schema_arrow.empty_table().select(columns)
        _LAST_GROUP.clear()
        _LAST_GROUP[key] = (lo, table)
        return table.slice(0, hi - lo)

    def read(self, start: int, stop: int, columns: list[str], until: int | None = None) -> list[dict]:
        rows: list[dict] = []
        starts = self._starts()
        for rg, lo, hi in self._groups(start, stop):
            n = self._meta().row_group(rg).num_rows
            end = n if until is None else max(hi, min(n, until - starts[rg]))
            rows += self._read_group(rg, lo, hi, end, columns).to_pylist()
        return rows

    def statistics(self, start: int, stop: int, column: str) -> list:
        """The footer's statistics of top-level `column` in the row groups holding rows [start, stop)
        (None for a chunk written without them)."""
        meta = self._meta()
        return [meta.row_group(rg).column(i).statistics for rg, _lo, _hi in self._groups(start, stop)
                for i in range(meta.row_group(rg).num_columns) if meta.row_group(rg).column(i).path_in_schema == column]

    def fingerprint(self, start: int, stop: int, columns: list[str], content: bool = True) -> str:
        """Of the row groups holding rows [start, stop), for the columns read: footer facts (row counts,
        encoded sizes, statistics), and (`content`) the stored bytes of every column but raw-bytes ones.
        Footer facts alone miss an edit that keeps them (a word for one as long, a label 0 for a 1: a
        quarter of one-word caption edits kept them); images are large, and two of equal encoded length
        are rare, so their chunks are keyed by their facts and never read here. A caller that keys the
        file's version as well needs no `content`."""
        h = hashlib.sha256()
        for rg, lo, hi in self._groups(start, stop):
            h.update(f"rg{rg}:{lo}:{hi}:{self._group_digest(rg, tuple(columns), content)}".encode())
        return h.hexdigest()

    def _group_digest(self, rg: int, columns: tuple[str, ...], content: bool) -> str:
        """Row group `rg`'s part of a fingerprint, kept per file version: shards share row groups (125
        shards of 8 rows in a group of 1000), and each asked its footer facts, and their bytes, again."""
        key = (*self.version(), rg, columns, content)
        if key not in _GROUP_DIGESTS:
            meta = self._meta()
            g, h, runs = meta.row_group(rg), hashlib.sha256(), []
            h.update(f"{g.num_rows}:{g.total_byte_size}".encode())
            for i in range(g.num_columns):
                c = g.column(i)
                if c.path_in_schema.split(".")[0] not in columns:
                    continue
                h.update(f"{c.path_in_schema}:{c.total_compressed_size}:{c.total_uncompressed_size}".encode())
                s = c.statistics
                if s is not None:
                    h.update(repr((s.null_count, s.num_values, s.has_min_max and (s.min, s.max))).encode())
                if content and not _raw_bytes(meta.schema.column(i)):
                    a = min(o for o in (c.dictionary_page_offset, c.data_page_offset) if o)  # None/0: no such page
                    if runs and runs[-1][1] == a:  # adjacent chunks: one read
                        runs[-1][1] = a + c.total_compressed_size
                    else:
                        runs.append([a, a + c.total_compressed_size])
            if runs:
                with open_stored(self.path, self.version()[1]) as f:
                    for a, b in runs:
                        f.seek(a)
                        h.update(f.read(b - a))
            _GROUP_DIGESTS[key] = h.hexdigest()
        return _GROUP_DIGESTS[key]


def _raw_bytes(column) -> bool:
    """A column of undecoded bytes (images), not text, JSON or numbers."""
    return column.physical_type in ("BYTE_ARRAY", "FIXED_LEN_BYTE_ARRAY") and column.logical_type.type == "NONE"
