"""The thin Prefect task around the shard runner (richpref/run/runner.py).

It lives in the package, not in a flow file, so that task runners which pickle tasks (Dask) find it
by import path. Prefect's result cache is off: the shard's manifest is the only completion record.
"""
from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from richpref.run.leases import Busy
from richpref.run.prefect_reuse import reuse_prefect_setup
from richpref.run.runner import ShardManifest, run_shard
from richpref.schemas.config import Profile
from richpref.run.storage import RunStore
from richpref.tasks.base import Stage

TORCH_THREADS_ENV = "RICHPREF_TORCH_THREADS"  # set for each worker of a local CPU cluster

# Every process that runs shard tasks imports this module (a Dask worker, when it unpickles the task)
# before its first task run starts: from here on its task runs share their settings and TLS context.
reuse_prefect_setup()


def _split_threads() -> None:
    """A local CPU cluster's workers share the cores: each runs torch on its own share of them.
    Asserted before every shard, since a library may have changed it (see keep_torch_threads)."""
    wanted = os.environ.get(TORCH_THREADS_ENV)
    if wanted:
        import torch

        if torch.get_num_threads() != int(wanted):
            torch.set_num_threads(int(wanted))


def shard_fn(stage: Stage, shard: int, inputs: dict[str, ShardManifest], data_dir: str, run: str, profile: Profile,
             key: str) -> ShardManifest | Busy:
    for given in inputs.values():
        if isinstance(given, Busy):  # an input another process holds (pipelined): the stage pass redoes it
            return given
    _split_threads()
    return run_shard(stage, shard, inputs, RunStore(data_dir, run), profile, key)


def load_stage_models(stage: Stage, profile: Profile) -> list[str]:
    """On a Dask GPU worker, ahead of a stage's shards (richpref/run/dispatch.py): load the stage's
    models through its own loader, so that its shards find them resident. Returns what it loaded."""
    _split_threads()
    return stage.load(profile)


# The plain function keeps its own importable name (pickling by reference needs that).
shard_task = task(shard_fn, name="shard", task_run_name="{stage.name}-{shard:05d}", cache_policy=NO_CACHE,
                  persist_result=False)
