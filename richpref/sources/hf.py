"""`datasets` sources: a dataset saved with `save_to_disk`, a Hub dataset in the local Hub cache (or
a folder laid out like a Hub dataset repo), or a Hub dataset streamed.

Nothing is converted or copied: a saved dataset is memory-mapped and sliced; a cached or local repo
is read file by file (Parquet by row group, JSONL by line); only a dataset neither local nor cached
is streamed from the Hub (`skip`/`take`), and then only with a known row count or `source.limit`.
"""
from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

from .base import ConcatReader, SourceError
from .parquet import ParquetPart
from .text import JsonlPart

DATA_EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes")


def is_saved_dataset(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


class SavedDatasetPart:
    """A dataset written by `Dataset.save_to_disk` (Arrow files, memory-mapped: slicing reads only the rows asked for)."""

    def __init__(self, path: str, split: str) -> None:
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SourceError(f"saved dataset {path!r} has no split {split!r}; it has {sorted(ds)} (set source.split)")
            ds = ds[split]
        self.ds = ds.with_format("arrow")
        self.name = os.path.basename(os.path.normpath(path))
        self._files = [f["filename"] for f in ds.cache_files]

    def num_rows(self) -> int:
        return len(self.ds)

    def columns(self) -> list[str]:
        return list(self.ds.column_names)

    def read(self, start: int, stop: int, columns: list[str], until: int | None = None) -> list[dict]:
        return self.ds[start:stop].select(columns).to_pylist()

    def fingerprint(self, start: int, stop: int, columns: list[str]) -> str:
        """The dataset's own fingerprint (`datasets` changes it with every transform) and its files' sizes."""
        h = hashlib.sha256(f"{self.ds._fingerprint}:{start}:{stop}".encode())
        for f in self._files:
            h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}".encode())
        return h.hexdigest()


class StreamingPart:
    """A Hub dataset streamed: rows [a, b) are `skip(a).take(b - a)`; its key is the Hub revision."""

    def __init__(self, dataset: str, split: str, revision: str | None, rows: int | None) -> None:
        import datasets
        from huggingface_hub import HfApi

        self.name = dataset
        self.revision = HfApi().dataset_info(dataset, revision=revision).sha
        ds = datasets.load_dataset(dataset, split=split, streaming=True, revision=self.revision)
        for col, feature in (ds.features or {}).items():
            if isinstance(feature, datasets.Image):  # the encoded bytes, never a decoded picture
                ds = ds.cast_column(col, datasets.Image(decode=False))
        self.ds = ds
        self._cursor: tuple[int, object] | None = None  # (next row, the open stream)
        self.skips = 0  # streams opened (tests check that shards in order open one)
        known = ds.info.splits[split].num_examples if ds.info.splits and split in ds.info.splits else None
        self._rows = known if known is not None else rows
        if self._rows is None:
            raise SourceError(f"Hub dataset {dataset!r} does not say how many rows split {split!r} has: "
                              "set source.limit")

    def num_rows(self) -> int:
        return int(self._rows)

    def columns(self) -> list[str]:
        return list(self.ds.column_names or [])

    def read(self, start: int, stop: int, columns: list[str], until: int | None = None) -> list[dict]:
        """Rows [start, stop). Shards asked in order continue one stream where the last one stopped;
        only a jump (a shard out of order, another process's first shard) skips from the start."""
        pos, it = self._cursor if self._cursor is not None else (-1, None)
        if pos != start or it is None:
            it = iter(self.ds.skip(start)) if start else iter(self.ds)
            self.skips += 1
        out = []
        for _ in range(stop - start):
            row = next(it, None)
            if row is None:
                break
            out.append({c: row.get(c) for c in columns})
        self._cursor = (start + len(out), it)
        return out

    def fingerprint(self, start: int, stop: int, columns: list[str]) -> str:
        return hashlib.sha256(f"{self.revision}:{start}:{stop}".encode()).hexdigest()


def split_files(root: str, split: str) -> list[str]:
    """The data files of `split` in a folder laid out like a Hub dataset repo (`datasets`' own rules)."""
    from datasets.data_files import get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(root)
    except Exception:  # noqa: BLE001 - no recognised layout: every data file is the one split
        patterns = {}
    if patterns and split not in patterns:
        raise SourceError(f"dataset folder {root!r} has no split {split!r}; it has {sorted(patterns)} (set source.split)")
    files: list[str] = []
    for pattern in patterns.get(split, ["**"]):
        try:
            files += resolve_pattern(pattern, root, allowed_extensions=list(DATA_EXTENSIONS))
        except FileNotFoundError:  # no data file matches: said below, with what the folder holds
            continue
    files = sorted({f for f in files if os.path.splitext(f)[1] in DATA_EXTENSIONS})
    if not files:
        found = sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True))[:5]
        raise SourceError(f"dataset folder {root!r} has no Parquet or JSONL files for split {split!r} "
                          f"(found {found}); save it with `datasets` or point source.kind/path at its files")
    return files


def file_parts(files: list[str], prompt_column: str) -> list:
    kinds = {DATA_EXTENSIONS[os.path.splitext(f)[1]] for f in files}
    if len(kinds) > 1:
        raise SourceError(f"dataset files mix formats {sorted(kinds)}: keep one format per split")
    return [ParquetPart(f) if kinds == {"parquet"} else JsonlPart(f, prompt_column) for f in files]


def hub_parquet_reader(dataset: str, split: str, revision: str | None, prompt_column: str) -> ConcatReader | None:
    """A Hub dataset whose split is Parquet files, read in place by row group through `hf://` (no
    download, no streaming skip); None when its files are of another format (then it is streamed)."""
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(dataset, revision=revision).sha
        files = split_files(f"hf://datasets/{dataset}@{sha}", split)
    except SourceError:
        return None
    if not files or any(not f.endswith(".parquet") for f in files):
        return None
    reader = ConcatReader(dataset, [ParquetPart(f if f.startswith("hf://") else f"hf://{f}") for f in files])
    reader.revision = sha  # type: ignore[attr-defined]
    return reader


def cached_snapshot(dataset: str, revision: str | None) -> str | None:
    """The folder of `dataset` at `revision` in the local Hub cache (its name is the commit), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(dataset, repo_type="dataset", revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached, or no valid Hub id
        return None


def hub_reader(dataset: str, split: str, revision: str | None, prompt_column: str, rows: int | None) -> ConcatReader:
    """A dataset asked of the Hub itself: Parquet read in place, anything else streamed."""
    try:
        return hub_parquet_reader(dataset, split, revision, prompt_column) or \
            ConcatReader(dataset, [StreamingPart(dataset, split, revision, rows)])
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the Hub answers (no network, no such repo, no access): one message
        raise SourceError(f"dataset {dataset!r} is neither a local folder nor in the local Hub cache, and the Hub "
                          f"(HF_ENDPOINT) could not serve it ({type(exc).__name__}: {exc}); check the id, the network "
                          f"and HF_TOKEN, or download it first (`hf download --repo-type dataset {dataset}`)") from exc


def hf_reader(dataset: str, split: str, revision: str | None, prompt_column: str, rows: int | None) -> ConcatReader:
    """A reader for `source.kind: hf`: a local folder, the local Hub cache, or (online) the Hub."""
    if os.path.isdir(dataset):
        if is_saved_dataset(dataset):
            return ConcatReader(dataset, [SavedDatasetPart(dataset, split)])
        return ConcatReader(dataset, file_parts(split_files(dataset, split), prompt_column))
    snapshot = cached_snapshot(dataset, revision)
    if snapshot is None:
        if _offline():
            raise SourceError(f"dataset {dataset!r} is neither a local folder nor in the local Hub cache and the Hub is "
                              f"offline; download it first (`hf download --repo-type dataset {dataset}`) or point "
                              "source.dataset at a local copy")
        return hub_reader(dataset, split, revision, prompt_column, rows)
    reader = ConcatReader(dataset, file_parts(split_files(snapshot, split), prompt_column))
    reader.revision = os.path.basename(snapshot)  # type: ignore[attr-defined]
    return reader
