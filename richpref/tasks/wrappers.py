"""The thin Prefect tasks around the pure stage functions, and their cache keys.

They live outside the flow module so that task runners which pickle tasks (Dask) find them by
import path, however the flow module itself was loaded.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from prefect import task

from richpref.schemas.config import Profile
from richpref.storage import RunStore, ShardManifest
from richpref.tasks import OUTPUTS
from richpref.tasks.base import Stage, run_stage_shard
from richpref.tasks.source import shard_source

log = logging.getLogger("richpref")


def _location_key(store: RunStore, stage: str, shard: int, key: str) -> str:
    where = hashlib.sha256(store.uri(store.shard_path(stage, shard)).encode()).hexdigest()[:16]
    return f"{stage}-{shard:05d}-{key[:32]}-{where}"


def _shard_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    store = RunStore(parameters["data_dir"], parameters["run"])
    return _location_key(store, parameters["stage"].out, parameters["shard"], parameters["key"])


def stage_shard_fn(stage: Stage, shard: int, inputs: dict[str, ShardManifest], data_dir: str, run: str,
                profile: Profile, key: str) -> ShardManifest:
    """Thin Prefect wrapper around the stage's pure shard function (see tasks/base.py)."""
    return run_stage_shard(stage, shard, inputs, RunStore(data_dir, run), profile, key)


def _source_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    store = RunStore(parameters["data_dir"], parameters["run"])
    return _location_key(store, "source", 0, parameters["key"])


def source_shards_fn(data_dir: str, run: str, profile: Profile, key: str) -> list[ShardManifest]:
    store = RunStore(data_dir, run)
    existing = store.shards("source")
    done = [store.committed("source", s, key) for s in existing]
    if existing and existing == list(range(len(existing))) and all(done):
        return done  # type: ignore[return-value]
    t0 = time.perf_counter()
    tables = shard_source(profile.source)
    manifests = [store.write_shard("source", i, t, key) for i, t in enumerate(tables)]
    # A smaller source than last time: shards past the end are not part of this run any more.
    for out in OUTPUTS:
        for s in store.shards(out):
            if s >= len(tables):
                store.fs.rm(store.shard_path(out, s))
    rows = sum(m.rows for m in manifests)
    log.info("source: %d rows in %d shards (%.2fs), rejected %d", rows, len(manifests), time.perf_counter() - t0,
             sum(m.rejected for m in manifests))
    store.append_log("work.jsonl", {"stage": "source", "shard": -1, "rows": rows, "kept": sum(m.kept for m in manifests),
                                    "compute_s": round(time.perf_counter() - t0, 4), "key": key, "at": time.time()})
    return manifests


# The plain functions keep their own importable names (pickling by reference needs that).
stage_shard = task(stage_shard_fn, name="stage-shard", task_run_name="{stage.name}-{shard:05d}",
                   cache_key_fn=_shard_cache_key, persist_result=True)
source_shards = task(source_shards_fn, name="source", cache_key_fn=_source_cache_key, persist_result=True)
