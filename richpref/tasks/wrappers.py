"""The thin Prefect task around the shard runner (richpref/runner.py).

It lives in the package, not in a flow file, so that task runners which pickle tasks (Dask) find it
by import path. Prefect's result cache is off: the shard's manifest is the only completion record.
"""
from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from richpref.leases import Busy
from richpref.runner import ShardManifest, run_shard
from richpref.schemas.config import Profile
from richpref.storage import RunStore
from richpref.tasks.base import Stage

TORCH_THREADS_ENV = "RICHPREF_TORCH_THREADS"  # set for each worker of a local CPU cluster
_threads_set = False


def _split_threads() -> None:
    """A local CPU cluster's workers share the cores: each runs torch on its own share of them."""
    global _threads_set
    if not _threads_set and os.environ.get(TORCH_THREADS_ENV):
        import torch

        torch.set_num_threads(int(os.environ[TORCH_THREADS_ENV]))
        _threads_set = True


def shard_fn(stage: Stage, shard: int, inputs: dict[str, ShardManifest], data_dir: str, run: str, profile: Profile,
             key: str) -> ShardManifest | Busy:
    _split_threads()
    return run_shard(stage, shard, inputs, RunStore(data_dir, run), profile, key)


# The plain function keeps its own importable name (pickling by reference needs that).
shard_task = task(shard_fn, name="shard", task_run_name="{stage.name}-{shard:05d}", cache_policy=NO_CACHE,
                  persist_result=False)
