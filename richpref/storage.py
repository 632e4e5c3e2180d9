"""Run layout and shard files.

A run lives in `<data_dir>/runs/<run>/<stage>/part-<shard>.parquet`. A shard is written whole to a
temporary name and renamed into place, so a reader (or a resumed run) never sees a partial shard.
Each shard's Parquet metadata records the content key it was computed for: a shard whose key matches
is committed work and is not recomputed. Paths go through fsspec, so `s3://bucket/prefix` works too.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from dataclasses import asdict, dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.parquet as pq

from .schemas.tables import OK

KEY_META = b"richpref.key"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ShardManifest:
    """What a task returns: where a shard is and what is in it. Never the data itself."""

    stage: str
    shard: int
    uri: str
    sha256: str
    rows: int
    kept: int
    key: str

    @property
    def rejected(self) -> int:
        return self.rows - self.kept

    def to_dict(self) -> dict:
        return asdict(self)


def check_run_name(run: str) -> str:
    if not RUN_NAME.match(run or ""):
        raise ValueError(
            f"run name {run!r} is not allowed: use letters, digits, '.', '_' or '-' (it names a folder under runs/)"
        )
    return run


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class RunStore:
    def __init__(self, data_dir: str, run: str) -> None:
        self.run = check_run_name(run)
        self.data_dir = str(data_dir).rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.data_dir)
        self._proto = "" if self.data_dir == root else self.data_dir[: len(self.data_dir) - len(root)]
        self.root = join(root, "runs", run)

    # paths ----------------------------------------------------------------------------------------
    def uri(self, path: str) -> str:
        return f"{self._proto}{path}" if self._proto else path

    def stage_dir(self, stage: str) -> str:
        return join(self.root, stage)

    def shard_path(self, stage: str, shard: int) -> str:
        return join(self.stage_dir(stage), f"part-{shard:05d}.parquet")

    def scratch_dir(self, stage: str) -> str | None:
        """A local folder beside the run for what a stage reuses across its shards; None for remote runs."""
        if not isinstance(self.fs, LocalFileSystem):
            return None
        return join(self.root, "_scratch", stage)

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
    def write_shard(self, stage: str, shard: int, table: pa.Table, key: str, before_commit=None) -> ShardManifest:
        meta = dict(table.schema.metadata or {})
        meta[KEY_META] = key.encode()
        table = table.replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        path = self.shard_path(stage, shard)
        self.fs.makedirs(self.stage_dir(stage), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        if before_commit is not None:
            before_commit()
        self.fs.mv(tmp, path)
        return self._manifest(stage, shard, table, data, key)

    def read_shard(self, stage: str, shard: int) -> pa.Table:
        path = self.shard_path(stage, shard)
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f)

    def read_stage(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        """All shards of a stage as one table (shard order)."""
        tables = []
        for s in self.shards(stage):
            with self.fs.open(self.shard_path(stage, s), "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})

    def is_committed(self, stage: str, shard: int, key: str) -> bool:
        """Whether the shard on disk was computed for `key`; reads only the Parquet footer."""
        path = self.shard_path(stage, shard)
        try:
            with self.fs.open(path, "rb") as f:
                meta = pq.read_schema(f).metadata or {}
        except Exception:  # noqa: BLE001 - missing or unreadable: not committed
            return False
        return meta.get(KEY_META, b"").decode() == key

    def committed(self, stage: str, shard: int, key: str) -> ShardManifest | None:
        """The manifest of an existing shard computed for `key`, else None. Hashes the whole file
        (downstream keys need it) but decodes only the footer and the status column."""
        path = self.shard_path(stage, shard)
        if not self.fs.exists(path):
            return None
        data = self.fs.cat_file(path)
        try:
            pf = pq.ParquetFile(io.BytesIO(data))
            if (pf.schema_arrow.metadata or {}).get(KEY_META, b"").decode() != key:
                return None
            has_status = "status" in pf.schema_arrow.names
            status = pf.read(columns=["status"]).column("status") if has_status else None
        except Exception:  # noqa: BLE001 - an unreadable file is not committed work
            return None
        rows = pf.metadata.num_rows
        kept = sum(1 for x in status.to_pylist() if x == OK) if status is not None else rows
        return ShardManifest(stage=stage, shard=shard, uri=self.uri(path), sha256=hashlib.sha256(data).hexdigest(),
                             rows=rows, kept=kept, key=key)

    def _manifest(self, stage: str, shard: int, table: pa.Table, data: bytes, key: str) -> ShardManifest:
        kept = sum(1 for s in table.column("status").to_pylist() if s == OK) if "status" in table.schema.names else table.num_rows
        return ShardManifest(
            stage=stage,
            shard=shard,
            uri=self.uri(self.shard_path(stage, shard)),
            sha256=hashlib.sha256(data).hexdigest(),
            rows=table.num_rows,
            kept=kept,
            key=key,
        )

    # small run files ------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> str:
        path = join(self.root, name)
        self.fs.makedirs(self.root, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, text.encode())
        self.fs.mv(tmp, path)
        return self.uri(path)

    def append_log(self, name: str, record: dict) -> None:
        """One JSON line per computed shard: the run's audit trail of real work done."""
        path = join(self.root, "_log", name)
        self.fs.makedirs(join(self.root, "_log"), exist_ok=True)
        line = json.dumps(record, sort_keys=True) + "\n"
        if isinstance(self.fs, LocalFileSystem):
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
