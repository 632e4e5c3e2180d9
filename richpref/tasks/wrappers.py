"""The thin Prefect tasks around the pure stage functions, and their cache keys.

They live outside the flow module so that task runners which pickle tasks (Dask) find them by
import path, however the flow module itself was loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager

from richpref.schemas.config import Profile
from richpref.storage import RunStore, ShardManifest
from richpref.tasks.base import Stage, run_stage_shard

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


def drop_shards_past(store: RunStore, outputs: tuple[str, ...], count: int) -> None:
    """Remove shards numbered `count` and above from every stage folder (the source shrank)."""
    for out in outputs:
        for s in store.shards(out):
            if s >= count:
                store.fs.rm(store.shard_path(out, s))


# The plain functions keep their own importable names (pickling by reference needs that).
stage_shard = task(stage_shard_fn, name="stage-shard", task_run_name="{stage.name}-{shard:05d}",
                   cache_policy=CachePolicy.from_cache_key_fn(_shard_cache_key), persist_result=True)


class RunLockManager(FileSystemLockManager):
    """File locks that a crashed holder cannot keep forever.

    Prefect's file locks never expire by default, so a worker killed mid-shard would block that
    shard for good. Here each lock records its holder's host and pid: a lock whose holder process
    is gone (same host) is stale and broken; a holder on another host loses it after `hold_seconds`.
    """

    def __init__(self, lock_files_directory: Path, hold_seconds: float = 24 * 3600) -> None:
        super().__init__(lock_files_directory=lock_files_directory)
        self.hold_seconds = hold_seconds

    def _owner_path(self, key: str) -> Path:
        return Path(str(self._lock_path_for_key(key)) + ".owner")

    def acquire_lock(self, key, holder, acquire_timeout=None, hold_timeout=None) -> bool:
        got = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.hold_seconds)
        if got:
            self._owner_path(key).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        return got

    def release_lock(self, key, holder) -> None:
        super().release_lock(key, holder)
        self._owner_path(key).unlink(missing_ok=True)

    def is_locked(self, key, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        try:
            owner = json.loads(self._owner_path(key).read_text())
        except (FileNotFoundError, ValueError):
            return True  # being acquired right now, or written by a plain Prefect lock manager
        if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
            log.warning("breaking the lock of shard record %s: its holder (pid %s) is gone", key, owner.get("pid"))
            Path(self._lock_path_for_key(key)).unlink(missing_ok=True)
            self._owner_path(key).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serialized_policy(store: RunStore, key_fn) -> CachePolicy | None:
    """Cache policy whose records are written under a lock: two workers handed the same shard do not
    both compute it; the second waits and then finds the first one's record (a `Cached` run).
    Locks live beside the run (local data dirs), so every process of the run sees them."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(store.fs, LocalFileSystem):
        return None
    locks = Path(store.root) / "_prefect" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return CachePolicy.from_cache_key_fn(key_fn).configure(
        isolation_level="SERIALIZABLE", lock_manager=RunLockManager(lock_files_directory=locks))
