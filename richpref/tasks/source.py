"""source: dataset rows -> prompt shards (with the dataset's image when there is one).

An ordinary stage that reads no other stage: shard k holds source rows [offset + k·n, offset +
(k+1)·n), and computing it reads only those rows (richpref/sources: Parquet row groups, lines of a
text file, slices of a saved or streamed `datasets` dataset). Its key is cheap: the reader's
fingerprint of those rows (Parquet footer facts and caption/label bytes, line bytes, dataset
fingerprint or Hub revision).
A missing column fails the whole input at once, before any model loads; a bad row is rejected with a
reason. `item_id` is a stable hash of the source and the row, so it joins every later table.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Iterator

import pyarrow as pa

from ..schemas.config import Profile, SourceConfig
from ..schemas.tables import PROMPTS, rows_to_table
from ..sources import BAD_ROW, RAW, SourceError, open_reader, resolve_input_path, stamp
from ..sources.base import ConcatReader
from ..sources.dedupe import Digest, ensure_ranges, index_for, save_digest
from .base import Stage, StageInputs, kept, rejected
from .prompt_text import clean_prompt

# 3: read per shard; Pick-a-Pic ties, has_label / are_different false rejected; dedupe; bad rows kept
# 4: invisible format characters in prompts dropped, not spaced; ZWNJ, ZWJ and emoji tags kept (prompt_text.py).
#    Every later stage's key follows, so runs also redo the stages that now decode images upright (EXIF).
VERSION = "4"
PICKAPIC_FLAGS = ("has_label", "are_different")
RANGE_FIELDS = {"offset", "limit", "shard_size"}  # in the key as each shard's own row range

__all__ = ["SourceError", "resolve_input_path", "STAGE", "check_source", "shard_source", "iter_source_rows"]


def needed_columns(cfg: SourceConfig, available: list[str]) -> list[str]:
    needed = [cfg.prompt_column]
    if cfg.pickapic_preferred:
        needed += ["jpg_0", "jpg_1", "label_0"] + [c for c in PICKAPIC_FLAGS if c in available]
    elif cfg.image_column:
        needed.append(cfg.image_column)
    return needed


def check_columns(columns: list[str], cfg: SourceConfig, source_id: str) -> None:
    missing = [c for c in needed_columns(cfg, columns) if c not in columns]
    if missing:
        raise SourceError(
            f"source {source_id!r} has no column(s) {missing}; it has {sorted(columns)}. "
            "Set source.prompt_column / source.image_column to the right names."
        )


def _image_bytes(value: Any) -> bytes | None:
    """Encoded bytes from what a reader hands out: bytes, {'bytes': ...} or a PIL image."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        return value.get("bytes")
    if hasattr(value, "save"):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return None


def preferred_column(label_0: Any, ties: str = "keep") -> tuple[str | None, str | None]:
    """(column of the preferred Pick-a-Pic image, None) or (None, reason).

    label_0 is 1 when jpg_0 won, 0 when jpg_1 won, 0.5 for a tie: a tie has no loser; it is rejected
    (ties "reject") or jpg_0 is taken (ties "keep"). A pair without a usable label has no preference.
    """
    try:
        label = float(label_0)
    except (TypeError, ValueError):
        return None, f"no_preference: label_0 is {label_0!r}, expected 0, 0.5 or 1"
    if not 0.0 <= label <= 1.0:  # NaN fails both comparisons
        return None, f"no_preference: label_0 is {label_0!r}, expected 0, 0.5 or 1"
    if label == 0.5 and ties == "reject":
        return None, "tie: label_0 is 0.5, no preferred image (source.pickapic_ties: keep takes jpg_0)"
    return ("jpg_0" if label >= 0.5 else "jpg_1"), None


def _item_id(source_id: str, row_number: int, raw_prompt: Any) -> str:
    return hashlib.sha256(
        json.dumps([source_id, row_number, raw_prompt if isinstance(raw_prompt, str) else repr(raw_prompt)]).encode()
    ).hexdigest()[:16]


def build_row(cfg: SourceConfig, source_id: str, row_number: int, row: dict) -> tuple[dict, bytes | None]:
    """One output row (kept or rejected) and, for a kept row, its dedupe hash (None without dedupe)."""
    base = {"source": source_id, "source_row": row_number}
    if BAD_ROW in row:
        return rejected(_item_id(source_id, row_number, row.get(RAW)), f"bad_row: {row[BAD_ROW]}", **base), None
    raw_prompt = row.get(cfg.prompt_column)
    item_id = _item_id(source_id, row_number, raw_prompt)
    prompt, reason = clean_prompt(raw_prompt, cfg.max_prompt_chars)
    if reason:
        return rejected(item_id, reason, **base), None
    image = None
    if cfg.pickapic_preferred:
        for flag, code in (("has_label", "no_label"), ("are_different", "same_images")):
            if flag in row and row[flag] is not None and not row[flag]:
                return rejected(item_id, f"{code}: {flag} is false", **base, prompt=prompt), None
        column, reason = preferred_column(row.get("label_0"), cfg.pickapic_ties)
        if reason:
            return rejected(item_id, reason, **base, prompt=prompt), None
        image = _image_bytes(row.get(column))
        if image is None:
            return rejected(item_id, f"bad_image: the preferred image ({column}) is missing", **base, prompt=prompt), None
    elif cfg.image_column:
        image = _image_bytes(row.get(cfg.image_column))
    mode = cfg.effective_dedupe
    what = image if mode == "image" else prompt.encode() if mode == "prompt" else None
    h = hashlib.sha256(what).digest()[:16] if what is not None else None
    return kept(item_id, **base, prompt=prompt, image=image), h


class SourceView:
    """A source config opened: its reader, row range, shard ranges and (memoised) shard keys."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.reader: ConcatReader = open_reader(cfg)
        self.columns = needed_columns(cfg, self.reader.columns())
        check_columns(self.reader.columns(), cfg, self.reader.source_id)
        total = self.reader.num_rows()
        if cfg.offset >= total:
            raise SourceError(f"source {self.reader.source_id!r} has {total} rows: source.offset {cfg.offset} is past its end")
        self.start = cfg.offset
        self.stop = total if cfg.limit is None else min(total, cfg.offset + cfg.limit)
        core = cfg.model_dump(mode="json", exclude=RANGE_FIELDS)
        revision = getattr(self.reader, "revision", None)  # a Hub snapshot's commit
        self.core = hashlib.sha256(json.dumps([VERSION, core, self.reader.source_id, revision], sort_keys=True).encode()).hexdigest()
        # Dedupe digests held in memory belong to this version of the files and this shard layout.
        self.index_key = hashlib.sha256(repr((self.core, cfg.offset, cfg.shard_size, stamp(cfg))).encode()).hexdigest()
        self._own: dict[int, str] = {}
        self._chain: list[str] = []  # _chain[k]: hash over the own keys of shards 0..k

    @property
    def num_shards(self) -> int:
        return -(-(self.stop - self.start) // self.cfg.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        a = self.start + shard * self.cfg.shard_size
        return a, min(self.stop, a + self.cfg.shard_size)

    def own_key(self, shard: int) -> str:
        """What shard `shard` computes to without dedupe: code version, config, its rows."""
        if shard not in self._own:
            a, b = self.shard_range(shard)
            fp = self.reader.fingerprint(a, b, self.columns)
            self._own[shard] = hashlib.sha256(f"{self.core}:{a}:{b}:{fp}".encode()).hexdigest()
        return self._own[shard]

    def shard_key(self, shard: int) -> str:
        if self.cfg.effective_dedupe == "none":
            return self.own_key(shard)
        # A duplicate's fate depends on the rows before it: their keys are part of this shard's key.
        while len(self._chain) <= shard:
            prev = self._chain[-1] if self._chain else ""
            self._chain.append(hashlib.sha256(f"{prev}:{self.own_key(len(self._chain))}".encode()).hexdigest())
        return self._chain[shard]

    def raw_rows(self, start: int, stop: int) -> list[tuple[dict, bytes | None]]:
        rows = self.reader.read(start, stop, self.columns, until=self.stop)
        if len(rows) != stop - start:
            raise SourceError(f"source {self.reader.source_id!r} gave {len(rows)} rows for rows {start}-{stop}")
        return [build_row(self.cfg, self.reader.source_id, start + i, r) for i, r in enumerate(rows)]

    @staticmethod
    def digest(built: list[tuple[dict, bytes | None]]) -> Digest:
        seen: set[bytes] = set()
        out = []
        for row, h in built:
            if h is not None and h not in seen:
                seen.add(h)
                out.append((h, row["source_row"], row["item_id"]))
        return out


_VIEWS: dict[str, tuple[tuple, SourceView]] = {}


def open_view(cfg: SourceConfig) -> SourceView:
    """The process's view of `cfg`, opened again when a file of the source changed."""
    key = cfg.model_dump_json()
    now = stamp(cfg)
    hit = _VIEWS.get(key)
    if hit is not None and hit[0] == now:
        return hit[1]
    view = SourceView(cfg)
    while len(_VIEWS) >= 8:
        _VIEWS.pop(next(iter(_VIEWS)))
    _VIEWS[key] = (now, view)
    return view


def compute_shard(cfg: SourceConfig, shard: int, scratch: str | None = None, view: SourceView | None = None) -> pa.Table:
    """The prompt table of one source shard: its rows only, duplicates of earlier rows rejected."""
    view = view or open_view(cfg)
    a, b = view.shard_range(shard)
    built = view.raw_rows(a, b)
    if cfg.effective_dedupe != "none":
        index = index_for(view.index_key)
        earlier = [(*view.shard_range(k), view.own_key(k)) for k in range(shard)]
        ensure_ranges(index, earlier, lambda s, e: view.digest(view.raw_rows(s, e)), scratch)
        first_here: dict[bytes, str] = {}
        out = []
        for row, h in built:
            if h is not None:
                first = index.earlier(h, a) or first_here.get(h)
                if first is not None:
                    row = rejected(row["item_id"], f"duplicate: {first}", source=row["source"],
                                   source_row=row["source_row"], prompt=row["prompt"])
                else:
                    first_here[h] = row["item_id"]
            out.append(row)
        save_digest(index, (a, b), view.own_key(shard), view.digest(built), scratch)
    else:
        out = [row for row, _ in built]
    return rows_to_table(out, PROMPTS)


# The stage ------------------------------------------------------------------------------------------
def _compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    return compute_shard(profile.source, inputs.shard, getattr(inputs, "scratch", None))


STAGE = Stage(
    name="source", version=VERSION, section="source", reads=(), compute=_compute,
    count_shards=lambda profile: open_view(profile.source).num_shards,
    shard_keys=lambda profile: open_view(profile.source).shard_key,  # one view: one look at the files
    loads_model=False, schema=PROMPTS,
)


def check_source(cfg: SourceConfig) -> int:
    """Fail early, before Prefect or any model starts: the input exists, has the needed columns and
    rows in range. Returns the number of shards."""
    return open_view(cfg).num_shards


def shard_source(cfg: SourceConfig) -> list[pa.Table]:
    """All shards of the source, in order (small sources, tests and tools)."""
    view = open_view(cfg)
    return [compute_shard(cfg, k, view=view) for k in range(view.num_shards)]


def iter_source_rows(cfg: SourceConfig) -> Iterator[dict]:
    view = open_view(cfg)
    for k in range(view.num_shards):
        yield from compute_shard(cfg, k, view=view).to_pylist()
