"""pickapic_source (`pipeline: relabel_dataset`): a Pick-a-Pic-format Parquet dataset's pairs -> shards.

Shard k holds `source.shard_size` rows of one file (a shard never spans two files, so each file's
rows keep their shards when another file is added), read by row group: computing a shard reads only
its rows. Its key is the file's version and the footer facts of those rows (richpref/sources/parquet.py),
so counting and keying shards reads no data pages. Every row is kept but one whose caption is null or
ASCII whitespace alone (`bad_prompt: …`, as the curate source says; only shards whose footer allows one
are keyed anew for that rule): `jpg_0`/`jpg_1` as raw encoded bytes (a `datasets`
Image struct gives its `bytes`), the other columns as they are. An undecodable image is the score
stage's to reject, with its reason.

`item_id` is the source's own `item_id` when it has one, else a hash of the caption and both images;
a repeat within a shard gets `#n` appended, so every row of a shard has its own key.
"""
from __future__ import annotations

import hashlib
import math

import pyarrow as pa
import pyarrow.compute as pc

from ..schemas.config import Profile
from ..schemas.tables import OK, REJECTED
from ..sources import SourceError, source_files
from ..sources.parquet import ParquetPart, file_version, footer, open_parquet
from .base import Stage, StageInputs

VERSION = "1"
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1")
RESERVED = ("status", "reason")  # the runner's columns: a source column of that name would be overwritten


def pickapic_files(profile: Profile) -> list[str]:
    return source_files(profile.source.model_copy(update={"kind": "parquet"}))[0]


def check_pickapic_columns(files: list[str]) -> None:
    """Raise SourceError naming the file when one lacks a Pick-a-Pic column or uses a reserved name."""
    for f in files:
        names = ParquetPart(f).columns()
        missing = [c for c in PICKAPIC_COLUMNS if c not in names]
        if missing:
            raise SourceError(f"{f} has no column(s) {missing}; a Pick-a-Pic-format dataset has caption, jpg_0, jpg_1 (label_0)")
        taken = [c for c in RESERVED if c in names]
        if taken:
            raise SourceError(f"{f} has column(s) {taken}, which the run's tables use for each row's verdict: rename them")


def shard_ranges(profile: Profile) -> list[tuple[str, int, int]]:
    """(file, first row, end row) of every shard, in order: `source.shard_size` rows of one file each,
    the first `source.limit` rows of the dataset when it is set (doctor's scratch run)."""
    step, left = profile.source.shard_size, profile.source.limit
    out = []
    for f in pickapic_files(profile):
        n = ParquetPart(f).num_rows() if left is None else min(left, ParquetPart(f).num_rows())
        out += [(f, a * step, min(n, (a + 1) * step)) for a in range(math.ceil(n / step))]
        left = None if left is None else left - n
        if left == 0:
            break
    return out


def count_shards(profile: Profile) -> int:
    return len(shard_ranges(profile))


def may_hold_blank_captions(part: ParquetPart, start: int, stop: int) -> bool:
    """Whether rows [start, stop) may hold a caption that is missing or blank, from the footer alone: a
    null, a smallest value that is empty or starts with whitespace, or no statistics to say."""
    for s in part.statistics(start, stop, "caption"):
        if s is None or not s.has_null_count or s.null_count > 0 or not s.has_min_max:
            return True
        # a blank caption (`blank_caption`) sorts first: empty, or starting with an ASCII space or control
        if isinstance(s.min, (str, bytes)) and (len(s.min) == 0 or s.min[:1] <= (b" " if isinstance(s.min, bytes) else " ")):
            return True
    return False


def blank_caption(caption) -> str | None:
    """Why a pair has no caption to score against (and condition a trainer on), or None: null, or text
    of ASCII whitespace alone. Other values are kept as they are, as before this rule."""
    if caption is None:
        return "bad_prompt: missing"
    if isinstance(caption, (str, bytes)) and not caption.strip(b" \t\n\r\x0b\x0c" if isinstance(caption, bytes)
                                                                 else " \t\n\r\x0b\x0c"):
        return "bad_prompt: empty"
    return None


def shard_keys(profile: Profile):
    """The key of each shard, from one listing of the dataset's files and one version of each."""
    ranges, parts, versions = shard_ranges(profile), {}, {}

    def key(shard: int) -> str:
        f, a, b = ranges[shard]
        if f not in parts:
            parts[f], versions[f] = ParquetPart(f), list(map(str, file_version(f)))
        part = parts[f]
        payload = [STAGE.name, VERSION, shard, versions[f], a, b,
                   part.fingerprint(a, b, part.columns(), content=False)]  # the file's version sees every edit
        if may_hold_blank_captions(part, a, b):
            # Such rows are rejected since 2026-12 (before: kept, scored against ""): only these shards are
            # keyed anew, so a dataset without them keeps every shard (and its scores).
            payload.append("blank captions rejected")
        return hashlib.sha256(repr(payload).encode()).hexdigest()
    return key


def _image_bytes(column: pa.ChunkedArray) -> pa.Array:
    """Raw encoded bytes from a binary column, or from a `datasets` Image struct ({bytes, path})."""
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return pa.array(column.to_pylist(), type=pa.binary())


def content_id(caption, a: bytes | None, b: bytes | None) -> str:
    h = hashlib.sha256()
    for part in (((caption if isinstance(caption, str) else "") or "").encode(), a or b"", b or b""):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def read_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    pf = open_parquet(path, metadata=footer(path))  # the footer parsed once per file version, not per shard
    meta, first, groups, seen = pf.metadata, None, [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if seen < stop and seen + n > start:
            groups.append(g)
            first = seen if first is None else first
        seen += n
    if not groups:
        return pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups).slice(start - first, stop - start)


def pickapic_rows(table: pa.Table) -> pa.Table:
    """The run's rows of a Pick-a-Pic table: item_id, status, reason, then its columns, images as bytes."""
    a, b = _image_bytes(table.column("jpg_0")), _image_bytes(table.column("jpg_1"))
    captions = table.column("caption").to_pylist()
    given = table.column("item_id").to_pylist() if "item_id" in table.schema.names else [None] * table.num_rows
    ids, seen = [], {}
    for k, iid in enumerate(given):
        base = str(iid) if iid is not None else content_id(captions[k], a[k].as_py(), b[k].as_py())
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.append(base if n == 0 else f"{base}#{n}")
    # A pair without a caption has nothing for the rewards to score against (and a trainer to condition on).
    reasons = [blank_caption(c) for c in captions]
    cols = {"item_id": pa.array(ids, type=pa.string()),
            "status": pa.array([OK if r is None else REJECTED for r in reasons], type=pa.string()),
            "reason": pa.array(reasons, type=pa.string())}
    for name in table.schema.names:
        if name != "item_id":
            cols[name] = a if name == "jpg_0" else b if name == "jpg_1" else table.column(name)
    return pa.table(cols)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    f, a, b = shard_ranges(profile)[inputs.shard]
    check_pickapic_columns([f])
    return pickapic_rows(read_rows(f, a, b))


STAGE = Stage(name="pickapic_source", version=VERSION, section="source", reads=(), compute=compute, output="source",
              count_shards=count_shards, shard_keys=shard_keys, loads_model=False,
              schema=pa.schema([("item_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                                ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary())]))
