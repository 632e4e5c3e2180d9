"""Run layout and shard files.

A run lives in `<data_dir>/runs/<run>/<stage>/part-<shard>.parquet`. Files are written whole to a
temporary name and renamed into place, so a reader never sees a partial file. Whether a shard is
done is the shard runner's business (richpref/run/runner.py), not this module's. Paths go through
fsspec, so `s3://bucket/prefix` works too.
"""
from __future__ import annotations

import json
import re
import uuid

from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa

from richpref.common.objstore import cat_small, is_object_store, read_parquet, url_to_fs
from richpref.common.atomic import write_atomic
from richpref.schemas.common import check_run_name


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class RunStore:
    def __init__(self, data_dir: str, run: str) -> None:
        self.run = check_run_name(run)
        self.data_dir = str(data_dir).rstrip("/")
        self.fs, root = url_to_fs(self.data_dir)
        self._proto = "" if self.data_dir == root else self.data_dir[: len(self.data_dir) - len(root)]
        self.root = join(root, "runs", run)

    # paths ----------------------------------------------------------------------------------------
    def uri(self, path: str) -> str:
        return f"{self._proto}{path}" if self._proto else path

    def stage_dir(self, stage: str) -> str:
        return join(self.root, stage)

    def shard_path(self, stage: str, shard: int) -> str:
        return join(self.stage_dir(stage), f"part-{shard:05d}.parquet")

    def scratch_dir(self, stage: str) -> str:
        """A folder in the run for what a stage reuses across its shards (a URL on an object store)."""
        return self.uri(join(self.root, "_scratch", stage))

    def shards(self, stage: str) -> list[int]:
        d = self.stage_dir(stage)
        if not self.fs.exists(d):
            return []
        out = []
        for p in self.fs.ls(d, detail=False):
            m = re.search(r"part-(\d+)\.parquet$", p)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    # shards ---------------------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes, before_commit=None) -> None:
        """Write to a temporary name, then rename into place (on an object store, one PUT): a reader
        never sees a partial file."""
        write_atomic(path, data, fs=self.fs, before_commit=before_commit)

    def read_shard(self, stage: str, shard: int, columns: list[str] | None = None) -> pa.Table:
        path = self.shard_path(stage, shard)
        if columns is None and is_object_store(self.fs):  # the whole file: one GET, no HEAD for its size first
            return read_parquet(pa.BufferReader(cat_small(self.fs, path)))
        with self.fs.open(path, "rb") as f:
            return read_parquet(f, columns)

    def read_stage(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        """All shards of a stage as one table (shard order)."""
        tables = []
        for s in self.shards(stage):
            with self.fs.open(self.shard_path(stage, s), "rb") as f:
                tables.append(read_parquet(f, columns))
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    # small run files ------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> str:
        path = join(self.root, name)
        self.write_bytes(path, text.encode())
        return self.uri(path)

    def last_run(self) -> dict:
        """run.json, the curate flow's record of this run ({} before its first flow, or unreadable)."""
        try:
            return json.loads(self.fs.cat_file(join(self.root, "run.json")))
        except (FileNotFoundError, ValueError):
            return {}

    def append_log(self, name: str, record: dict) -> None:
        """One JSON line per computed shard: the run's audit trail of real work done."""
        path = join(self.root, "_log", name)
        line = json.dumps(record, sort_keys=True) + "\n"
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(join(self.root, "_log"), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
        else:  # object stores cannot append: one object per record
            self.fs.pipe_file(join(self.root, "_log", f"{name}.d", f"{uuid.uuid4().hex}.json"), line.encode())

    def read_log(self, name: str) -> list[dict]:
        path = join(self.root, "_log", name)
        recs = []
        if self.fs.exists(path):
            recs += [json.loads(l) for l in self.fs.cat_file(path).decode().splitlines() if l.strip()]
        d = f"{path}.d"
        if self.fs.exists(d):
            recs += [json.loads(self.fs.cat_file(p)) for p in self.fs.ls(d, detail=False)]
        return recs
