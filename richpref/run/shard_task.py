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


class Unwalked:
    """A shard task's argument handed to the task as it is. Prefect walks every argument of a task for
    futures, at the submission, at the task run's start and when it resolves them, into dataclasses and
    pydantic models: a Profile is a deep config (about 2 ms a walk at the tiny profile). Prefect's
    `quote` says the same but is a tuple, which Dask's transport delivers as a plain tuple."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


def _given(arg):
    return arg.value if isinstance(arg, Unwalked) else arg


def shard_run_name(parameters: dict) -> str:
    """A shard task run's name: `<stage>-<shard>`, e.g. `critique-00003`."""
    return f"{_given(parameters['stage']).name}-{parameters['shard']:05d}"


def shard_fn(stage: Stage | Unwalked, shard: int, inputs: dict[str, ShardManifest], data_dir: str, run: str,
             profile: Profile | Unwalked, key: str) -> ShardManifest | Busy:
    stage, profile = _given(stage), _given(profile)
    for given in inputs.values():
        if isinstance(given, Busy):  # an input another process holds (pipelined): the stage pass redoes it
            return given
    _split_threads()
    return run_shard(stage, shard, inputs, RunStore(data_dir, run), profile, key)


def load_stage_models(stage: Stage, profile: Profile) -> list[str]:
    """Ahead of a stage's shards, on a Dask GPU worker (richpref/run/dispatch.py) or in the process of a
    local curate while its Prefect server starts (richpref/run/load_ahead.py): load the stage's models
    through its own loader, so that its shards find them resident. Returns what it loaded."""
    _split_threads()
    return stage.load(profile)


# The plain function keeps its own importable name (pickling by reference needs that).
shard_task = task(shard_fn, name="shard", task_run_name=shard_run_name, cache_policy=NO_CACHE,
                  persist_result=False)


def submit_shard(stage: Stage, shard: int, inputs: dict, data_dir: str, run: str, profile: Profile, key: str):
    """Submit one shard task on the flow's task runner; returns its Prefect future. Only `inputs` can
    hold futures (of the input shards): the stage and the profile go `Unwalked`."""
    return shard_task.submit(Unwalked(stage), shard, inputs, data_dir, run, Unwalked(profile), key)
