"""How much of a Dask worker's `GPU` slot (`dask worker --resources GPU=1`) a stage's shard claims, and
whether shards sharing a slot compute at once or take turns.

Every shard of a stage that loads a model claims half the slot, so a worker runs two at once:
- a stage whose models (its declaration's `models(profile)`) are all VLMs served by their section's
  engine (`engine.backend: server`) computes both at once: the next shard's requests reach the server
  while the previous shard's last ones finish and its output is written;
- a stage with a model in the worker's own process takes turns (`takes_turns`; a compute turn per
  worker, taken in `shard_model_scope` around the runner's computation): one shard computes while the
  next one starts its task run and reads its inputs, or the last one writes and commits its output,
  so the GPU does not wait on that work.
  One model computes at a time, as with a whole slot; a diffusers pipeline is not safe to call from
  two threads at once anyway.
Two shards of different stages may share a worker too; the process's resident-model slot keeps each
shard's model until that shard ends (richpref/models/runtime.py), so one in-process model is loaded at
a time. Model-free stages claim nothing.
"""
from __future__ import annotations

import contextlib
import sys
import threading

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # light to import: the preflight reads GPU_WORKER_THREADS before the stages load
    from richpref.schemas.config import Profile
    from richpref.tasks.base import Stage

GPU_SHARE = 0.5  # of a worker's GPU slot, per model shard
SHARDS_PER_SLOT = round(1 / GPU_SHARE)  # model shards in flight on each GPU
GPU_WORKER_THREADS = SHARDS_PER_SLOT + 1  # a GPU worker's threads: its slot's model shards and a model-free one


def served_vlm(stage: Stage, profile: Profile) -> bool:
    """Whether every model the stage loads under `profile` is a VLM its section's engine serves."""
    uses = stage.models(profile) if stage.models is not None else []
    return bool(uses) and all(u.kind == "vlm" and getattr(getattr(u.cfg, "engine", None), "backend", None) == "server"
                              for u in uses)


def gpu_claim(stage: Stage, profile: Profile | None) -> float:
    return GPU_SHARE if stage.loads_model else 0.0


def takes_turns(stage: Stage, profile: Profile | None) -> bool:
    """Whether the stage's shards sharing a GPU slot compute one at a time (a model in this process)."""
    return stage.loads_model and not (profile is not None and served_vlm(stage, profile))


def computing_at_once(stage: Stage, profile: Profile | None) -> int:
    """How many of the stage's shards one GPU slot computes at once."""
    return SHARDS_PER_SLOT if stage.loads_model and not takes_turns(stage, profile) else 1


_TURNS: dict[str, threading.Lock] = {}  # Dask worker address ("" outside one) -> its compute turn
_TURNS_GUARD = threading.Lock()


def compute_turn() -> threading.Lock:
    """One in-process model computes at a time on a Dask worker (it has one GPU); per worker, not per
    process, since a threaded cluster runs several workers in one process. Outside a worker, one per
    process: a model loaded ahead of its stage holds it (richpref/run/load_ahead.py)."""
    address = ""
    if "distributed" in sys.modules:  # not imported: not on a Dask worker
        from distributed import get_worker

        try:
            address = get_worker().address
        except ValueError:
            pass
    with _TURNS_GUARD:
        return _TURNS.setdefault(address, threading.Lock())


@contextlib.contextmanager
def shard_model_scope(stage: Stage, profile: Profile):
    """Around a shard's computation: the resident model it uses stays until the shard ends (two shards
    may share a process), and a stage whose model runs in this process waits for its turn first (a
    model being loaded ahead holds it: the wait for that load is not the shard's compute)."""
    if not stage.loads_model:
        yield
        return
    from richpref.models.runtime import resident

    with compute_turn() if takes_turns(stage, profile) else contextlib.nullcontext(), resident.shard():
        yield


def release_after_stage(stage: Stage) -> None:
    """In a process that runs the stages one after another (the curate flow, the inline recipe), after
    each: one big model at a time, so a stage that loads one frees it before the next stage loads its
    own. A model-free stage leaves the slot as it is: what `richpref curate` loaded ahead for a later
    stage stays (richpref/run/load_ahead.py)."""
    if not stage.loads_model:
        return
    from richpref.models.runtime import resident

    resident.release(freeze_survivors=True)
