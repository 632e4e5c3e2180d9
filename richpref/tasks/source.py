"""source: dataset rows -> prompt shards (with the dataset's image when there is one).

Reads prompt files, JSONL, Parquet (Pick-a-Pic v2 columns included) or any `datasets` dataset. A
missing column fails the whole input at once, before any model loads; a bad row is rejected with a
reason. `item_id` is a stable hash of the source and the row, so it joins every later table.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from ..schemas.config import SourceConfig, config_hash
from ..schemas.tables import PROMPTS, rows_to_table
from .base import kept, rejected

VERSION = "2"  # 2: Pick-a-Pic rows without a usable label are rejected


class SourceError(ValueError):
    """The input as a whole cannot be used (missing file or column): nothing has run yet."""


def resolve_input_path(path: str) -> str:
    """A relative path is taken from the working directory, then from the project root."""
    if "://" in path or os.path.isabs(path):
        return path
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if glob.glob(str(base / path)):
            return str(base / path)
    raise SourceError(f"source.path {path!r} matches no file (looked in {Path.cwd()} and the project root)")


def _files(cfg: SourceConfig) -> list[str]:
    if not cfg.path:
        raise SourceError(f"source.kind {cfg.kind!r} needs source.path (a file or glob)")
    resolved = resolve_input_path(cfg.path)
    files = sorted(glob.glob(resolved)) if "://" not in resolved else [resolved]
    if not files:
        raise SourceError(f"source.path {cfg.path!r} matches no file")
    return files


def source_fingerprint(cfg: SourceConfig) -> str:
    """What the source reads: file contents for local files, the dataset id for `datasets`."""
    h = hashlib.sha256(config_hash(cfg).encode())
    if cfg.kind == "hf":
        h.update(str(cfg.dataset).encode())
        if cfg.dataset and os.path.exists(cfg.dataset):
            for p in sorted(Path(cfg.dataset).rglob("*")):
                if p.is_file():
                    h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    else:
        for f in _files(cfg):
            h.update(os.path.basename(f).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def source_key(cfg: SourceConfig) -> str:
    """The source stage's content key: its code version and what it reads."""
    return hashlib.sha256(f"{VERSION}:{source_fingerprint(cfg)}".encode()).hexdigest()


def _load_dataset(cfg: SourceConfig):
    import datasets

    if cfg.kind == "hf":
        if not cfg.dataset:
            raise SourceError("source.kind 'hf' needs source.dataset (a `datasets` name or a local dataset dir)")
        return datasets.load_dataset(cfg.dataset, split=cfg.split), cfg.dataset
    files = _files(cfg)
    builder = {"prompts": "text", "jsonl": "json", "parquet": "parquet"}[cfg.kind]
    ds = datasets.load_dataset(builder, data_files=files, split="train")
    source_id = ",".join(os.path.basename(f) for f in files)
    if cfg.kind == "prompts":
        ds = ds.rename_column("text", cfg.prompt_column) if cfg.prompt_column != "text" else ds
    return ds, source_id


def check_columns(columns: list[str], cfg: SourceConfig, source_id: str) -> None:
    needed = [cfg.prompt_column]
    if cfg.pickapic_preferred:
        needed += ["jpg_0", "jpg_1", "label_0"]
    elif cfg.image_column:
        needed.append(cfg.image_column)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SourceError(
            f"source {source_id!r} has no column(s) {missing}; it has {sorted(columns)}. "
            "Set source.prompt_column / source.image_column to the right names."
        )


def _image_bytes(value: Any) -> bytes | None:
    """Encoded bytes from what `datasets` hands out: bytes, {'bytes': ...} or a PIL image."""
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


def clean_prompt(value: Any, max_chars: int) -> tuple[str | None, str | None]:
    """(prompt, None) or (None, reason)."""
    if value is None:
        return None, "bad_prompt: missing"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_prompt: not valid UTF-8"
    if not isinstance(value, str):
        return None, f"bad_prompt: expected text, got {type(value).__name__}"
    # Control characters carry no meaning for an image model; tabs/newlines become spaces.
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in value)
    text = " ".join(text.split())
    if not text:
        return None, "bad_prompt: empty"
    if len(text) > max_chars:
        return None, f"bad_prompt: {len(text)} characters, over source.max_prompt_chars={max_chars}"
    return text, None


def preferred_column(label_0: Any) -> tuple[str | None, str | None]:
    """(column of the preferred Pick-a-Pic image, None) or (None, reason).

    label_0 is 1 when jpg_0 won, 0 when jpg_1 won, 0.5 for a tie: a tie has no loser, so either
    image is a preferred one and jpg_0 is taken. A pair without a usable label has no preference.
    """
    try:
        label = float(label_0)
    except (TypeError, ValueError):
        return None, f"no_preference: label_0 is {label_0!r}, expected 0, 0.5 or 1"
    if not 0.0 <= label <= 1.0:  # NaN fails both comparisons
        return None, f"no_preference: label_0 is {label_0!r}, expected 0, 0.5 or 1"
    return ("jpg_0" if label >= 0.5 else "jpg_1"), None


def check_source(cfg: SourceConfig) -> None:
    """Fail early, before Prefect or any model starts: the input exists and has the needed columns."""
    ds, source_id = _load_dataset(cfg)
    check_columns(list(ds.column_names), cfg, source_id)


def iter_source_rows(cfg: SourceConfig) -> Iterator[dict]:
    ds, source_id = _load_dataset(cfg)
    check_columns(list(ds.column_names), cfg, source_id)
    for i, row in enumerate(ds):
        if cfg.limit is not None and i >= cfg.limit:
            break
        raw_prompt = row.get(cfg.prompt_column)
        item_id = hashlib.sha256(
            json.dumps([source_id, i, raw_prompt if isinstance(raw_prompt, str) else repr(raw_prompt)]).encode()
        ).hexdigest()[:16]
        base = {"source": source_id, "source_row": i}
        prompt, reason = clean_prompt(raw_prompt, cfg.max_prompt_chars)
        if reason:
            yield rejected(item_id, reason, **base)
            continue
        image = None
        if cfg.pickapic_preferred:
            column, reason = preferred_column(row.get("label_0"))
            if reason:
                yield rejected(item_id, reason, **base, prompt=prompt)
                continue
            image = _image_bytes(row.get(column))
            if image is None:
                yield rejected(item_id, f"bad_image: the preferred image ({column}) is missing", **base, prompt=prompt)
                continue
        elif cfg.image_column:
            image = _image_bytes(row.get(cfg.image_column))
        yield kept(item_id, **base, prompt=prompt, image=image)


def shard_source(cfg: SourceConfig) -> list[pa.Table]:
    """All rows of the source as prompt tables of `shard_size` rows each."""
    rows = list(iter_source_rows(cfg))
    if not rows:
        raise SourceError("the source has no rows")
    n = cfg.shard_size
    return [rows_to_table(rows[i : i + n], PROMPTS) for i in range(0, len(rows), n)]
