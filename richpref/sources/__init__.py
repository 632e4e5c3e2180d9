"""Source readers: rows [a, b) of a prompt file, JSONL, Parquet folder or `datasets` dataset, read on their own."""
from __future__ import annotations

import glob
import os
import posixpath
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from ..schemas.config import SourceConfig
from .base import BAD_ROW, RAW, ConcatReader, SourceError
from .hf import cached_snapshot, hf_reader
from .parquet import ParquetPart
from .text import JsonlPart, PromptPart, check_text_file

__all__ = ["BAD_ROW", "RAW", "ConcatReader", "SourceError", "open_reader", "resolve_input_path", "run_folder_pairs", "stamp"]

_EXTENSIONS = {"parquet": ("*.parquet",), "jsonl": ("*.jsonl", "*.json"), "prompts": ("*.txt",)}


def resolve_input_path(path: str) -> str:
    """A relative path is taken from the working directory, then from the project root."""
    if "://" in path or os.path.isabs(path):
        return path
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if glob.glob(str(base / path)):
            return str(base / path)
    raise SourceError(f"source.path {path!r} matches no file (looked in {Path.cwd()} and the project root)")


def run_folder_pairs(fs, path: str) -> str | None:
    """Its `pairs/` folder when `path` (in filesystem `fs`) is a run's folder, else None. Given where
    Parquet rows are read, a run's folder would read every stage's table: none of them is the pairs."""
    path = path.rstrip("/")
    if fs.isdir(path) and fs.isfile(f"{path}/run.json") and fs.isdir(f"{path}/pairs"):
        return f"{path}/pairs"
    return None


def run_of_pairs(fs, path: str) -> str | None:
    """The run's name when `path` is a run's `pairs/` folder (the reverse of run_folder_pairs), else None."""
    parent = posixpath.dirname(path.rstrip("/"))
    return posixpath.basename(parent) if parent and run_folder_pairs(fs, parent) else None


def source_files(cfg: SourceConfig) -> tuple[list[str], str]:
    """(files in row order, source id). A folder means its files of the kind's extension, recursively."""
    if not cfg.path:
        raise SourceError(f"source.kind {cfg.kind!r} needs source.path (a file, folder or glob)")
    resolved = resolve_input_path(cfg.path)
    if cfg.kind == "parquet" and "://" not in resolved and (pairs := run_folder_pairs(LocalFileSystem(), resolved)):
        raise SourceError(f"source.path {cfg.path!r} is a run's folder: give its pairs, {pairs!r}")
    if "://" in resolved:
        return remote_files(cfg, resolved)
    if os.path.isdir(resolved):
        files = sorted(f for ext in _EXTENSIONS[cfg.kind] for f in glob.glob(os.path.join(resolved, "**", ext), recursive=True))
        source_id = os.path.basename(os.path.normpath(resolved))
    else:
        files = sorted(glob.glob(resolved))
        source_id = ",".join(os.path.basename(f) for f in files)  # as every earlier version named it
    if not files:
        raise SourceError(f"source.path {cfg.path!r} matches no {cfg.kind} file")
    return files, source_id


def remote_files(cfg: SourceConfig, url: str) -> tuple[list[str], str]:
    """Parquet files behind an fsspec URL (s3://, gs://, hf://datasets/...): a folder (its Parquet
    files, recursively), a file or a glob. They are read by row group, never downloaded whole."""
    from richpref.common.objstore import DataDirError, cannot_list, url_to_fs

    if cfg.kind != "parquet":
        raise SourceError(f"source.path {cfg.path!r}: remote {cfg.kind} files are not read in place; use Parquet "
                          "(source.kind: parquet) or copy the files locally")
    try:
        fs, inner = url_to_fs(url)
        proto = url[: url.index("://") + 3]
        if pairs := run_folder_pairs(fs, inner):
            raise SourceError(f"source.path {cfg.path!r} is a run's folder: give its pairs, {proto + pairs!r}")
        if fs.isdir(inner):
            found = fs.glob(inner.rstrip("/") + "/**/*.parquet")
            source_id = inner.rstrip("/").rsplit("/", 1)[-1]
        else:
            found = fs.glob(inner)
            source_id = ",".join(f.rsplit("/", 1)[-1] for f in sorted(found))
    except SourceError:
        raise
    except DataDirError as exc:
        raise SourceError(f"source.path {cfg.path!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - s3fs/botocore: no credentials, a refused one, an unreachable endpoint
        raise SourceError(f"source.path {cfg.path!r} {cannot_list(url, exc)} (docs/operations.md)") from exc
    files = sorted(proto + f for f in found)
    if not files:
        raise SourceError(f"source.path {cfg.path!r} matches no parquet file")
    return files, source_id


def open_reader(cfg: SourceConfig) -> ConcatReader:
    if cfg.kind == "hf":
        if not cfg.dataset:
            raise SourceError("source.kind 'hf' needs source.dataset (a Hub id, a folder saved with `datasets`, "
                              "or a folder of Parquet/JSONL files)")
        reader = hf_reader(local_dataset(cfg.dataset), cfg.split, cfg.revision, cfg.prompt_column,
                           None if cfg.limit is None else cfg.offset + cfg.limit)
        reader.source_id = cfg.dataset  # item ids name the dataset as configured
        return reader
    files, source_id = source_files(cfg)
    if cfg.kind == "parquet":
        return ConcatReader(source_id, [ParquetPart(f) for f in files])
    for f in files:
        check_text_file(f)
    part = PromptPart if cfg.kind == "prompts" else JsonlPart
    return ConcatReader(source_id, [part(f, cfg.prompt_column) for f in files])


def local_dataset(dataset: str) -> str:
    """`source.dataset` as a folder when it names one (a relative one from the working directory, then
    from the project root), else as given: a Hub id."""
    if os.path.isabs(dataset) or os.path.isdir(dataset):
        return dataset
    try:
        found = resolve_input_path(dataset)
    except SourceError:
        return dataset
    return found if os.path.isdir(found) else dataset


def stamp(cfg: SourceConfig) -> tuple:
    """What says the source's files are unchanged since last looked at: each file's size and
    modification time; a Hub id in the local Hub cache: its snapshot's files, whose paths name the
    commit; a Hub id asked of the Hub: the id and revision asked for)."""
    if cfg.kind == "hf":
        dataset = local_dataset(cfg.dataset) if cfg.dataset else ""
        root = dataset if os.path.isdir(dataset) else (dataset and cached_snapshot(dataset, cfg.revision))
        if not root:
            return ("hub", cfg.dataset, cfg.revision)
        files = sorted(str(p) for p in Path(root).rglob("*") if p.is_file())
    else:
        files = source_files(cfg)[0]
    from .parquet import file_version, is_url

    out = []
    for f in files:
        if is_url(f):
            out.append(file_version(f))
        else:
            st = os.stat(f)
            out.append((f, st.st_size, st.st_mtime_ns))
    return tuple(out)
