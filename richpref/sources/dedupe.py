"""Dedupe across shards without reading the whole source up front.

Each range of source rows has a digest: for every row that would be kept, the hash of its image (or
prompt) with its row number and item id, first occurrences only. A shard consults the digests of
every range before it, so the first occurrence in row order wins whichever worker computes which
shard in which order. Digests depend only on their range's rows: a process keeps the ones it has
seen, and they are written once (atomically) into the run folder (`_scratch/source/`, also on an
object store) and read there by every later shard and worker of the run, which then never re-read
earlier shards' image columns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from richpref.common.atomic import write_atomic

Digest = list[tuple[bytes, int, str]]  # (dedupe hash, row, item_id) of first occurrences

_SCHEMA = pa.schema([("hash", pa.binary()), ("row", pa.int64()), ("item_id", pa.string())])


@dataclass
class SeenIndex:
    """Dedupe hash -> (first row, its item id) over every range merged so far."""

    first: dict[bytes, tuple[int, str]] = field(default_factory=dict)
    merged: set[tuple[int, int]] = field(default_factory=set)

    def merge(self, rng: tuple[int, int], digest: Digest) -> None:
        if rng in self.merged:
            return
        for h, row, item in digest:
            old = self.first.get(h)
            if old is None or row < old[0]:
                self.first[h] = (row, item)
        self.merged.add(rng)

    def earlier(self, h: bytes, before_row: int) -> str | None:
        """Item id of the first occurrence of `h` if it comes before `before_row`."""
        got = self.first.get(h)
        return got[1] if got is not None and got[0] < before_row else None


_INDEXES: dict[str, SeenIndex] = {}


def index_for(source_key: str) -> SeenIndex:
    """The process's index for one source version (its files and config); a few are kept."""
    if source_key not in _INDEXES:
        while len(_INDEXES) >= 4:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[source_key] = SeenIndex()
    return _INDEXES[source_key]


def _fs(path: str):
    """(filesystem, path in it): the run folder may be local or on an object store."""
    if "://" not in path:
        return None, path
    from richpref.common.objstore import url_to_fs

    return url_to_fs(path)


def _read(path: str) -> Digest | None:
    fs, inner = _fs(path)
    try:
        if fs is None:
            t = pq.read_table(inner)
        else:
            from richpref.common.objstore import read_parquet

            with fs.open(inner, "rb") as f:
                t = read_parquet(f)
    except (OSError, pa.ArrowInvalid):
        return None  # absent or half-written by a crashed writer: computed again
    return list(zip(t.column("hash").to_pylist(), t.column("row").to_pylist(), t.column("item_id").to_pylist()))


def _write(path: str, digest: Digest) -> None:
    table = pa.table([[d[0] for d in digest], [d[1] for d in digest], [d[2] for d in digest]], schema=_SCHEMA)
    fs, inner = _fs(path)
    if fs is not None:  # one PUT: an object appears whole
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        fs.pipe_file(inner, buf.getvalue().to_pybytes())
        return
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_atomic(path, buf.getvalue().to_pybytes())


def _exists(path: str) -> bool:
    fs, inner = _fs(path)
    return os.path.exists(inner) if fs is None else fs.exists(inner)


def ensure_ranges(index: SeenIndex, ranges: list[tuple[int, int, str]], compute: Callable[[int, int], Digest],
                  scratch: str | None) -> None:
    """Merge the digests of `ranges` ((start, stop, range key)) into `index`, from the scratch folder
    where present, else computed from the rows (and saved there)."""
    for start, stop, key in ranges:
        if (start, stop) in index.merged:
            continue
        path = f"{scratch.rstrip('/')}/{key[:40]}.parquet" if scratch else None
        digest = _read(path) if path else None
        if digest is None:
            digest = compute(start, stop)
            if path:
                _write(path, digest)
        index.merge((start, stop), digest)


def save_digest(index: SeenIndex, rng: tuple[int, int], key: str, digest: Digest, scratch: str | None) -> None:
    """Record a range's digest computed as part of its shard, for the shards after it."""
    index.merge(rng, digest)
    if scratch:
        path = f"{scratch.rstrip('/')}/{key[:40]}.parquet"
        if not _exists(path):
            _write(path, digest)
