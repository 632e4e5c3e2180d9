"""The first model a local curate needs, loaded while the command waits for its Prefect server.

`richpref curate` waits for the Prefect server it starts: 3-4 s in a used PREFECT_HOME, about 10 s in
a new one (the server migrates its database first). On this process's own task runner (no Dask; a
Dask run loads ahead on its workers, richpref/run/dispatch.py), the first stage with work that loads
a model in this process loads it on a thread meanwhile, through the function a Dask worker loading
ahead calls (shard_task.load_stage_models). The load holds the process's compute turn (richpref/run/gpu_claims.py), which a shard of a stage with a model in
this process takes before its compute starts: a shard that comes while the load is under way waits
for it, uncounted, then finds the model resident (richpref/models/runtime.py).

The load is that stage's compute, done before its first shard: `_log/loads.jsonl` records its seconds
(wall, and the CPU of its thread) beside the shards' own in `_log/work.jsonl`. A load that fails is
left to the shard, which loads the model itself and reports what fails.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from richpref.run.gpu_claims import compute_turn, takes_turns

if TYPE_CHECKING:
    from richpref.run.plan import StagePlan
    from richpref.run.storage import RunStore
    from richpref.schemas.config import Profile
    from richpref.tasks.base import Stage

log = logging.getLogger("richpref")

LOADS_LOG = "loads.jsonl"  # under the run's _log/: one record per model loaded ahead of its stage


def stage_to_load(stages: tuple[Stage, ...], plan: list[StagePlan], profile: Profile) -> Stage | None:
    """The first of `stages` with shards to compute (to do or blocked in `plan`) that loads a model,
    if that model runs in this process and the stage declares its loader; None otherwise (a served
    VLM's shards start their server themselves; a later stage's model would only wait, holding memory,
    and be swapped out by this one's)."""
    work = {p.stage for p in plan if p.todo or p.blocked}
    for stage in stages:
        if stage.name in work and stage.loads_model:
            return stage if stage.load is not None and takes_turns(stage, profile) else None
    return None


def load_ahead(stage: Stage, profile: Profile, store: RunStore) -> threading.Thread:
    """Start loading `stage`'s models on a daemon thread, holding the compute turn until it ends;
    returns the thread."""
    turn = compute_turn()
    turn.acquire()  # here, not on the thread: no shard can take the turn before the load does

    def load() -> None:
        try:
            from richpref.run.shard_task import load_stage_models

            t0, cpu0 = time.perf_counter(), time.thread_time()  # after Prefect's import: not the stage's load
            models = load_stage_models(stage, profile)
        except Exception as exc:  # noqa: BLE001 - the stage's first shard loads it and reports the error
            log.debug("%s: loading its models ahead failed (%s); its first shard loads them", stage.name, exc)
            return
        finally:
            turn.release()
        seconds, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        # Both: the load shares the cores with the server's start, so its wall counts their contention too.
        store.append_log(LOADS_LOG, {"stage": stage.name, "models": list(models), "load_s": round(seconds, 4),
                                     "thread_cpu_s": round(cpu, 4), "at": time.time()})
        # Debug: before the flow run there is no run to send an INFO line to (Prefect warns about it).
        log.debug("%s: models loaded ahead of its shards in %.2fs", stage.name, seconds)

    thread = threading.Thread(target=load, name=f"load-ahead {stage.name}", daemon=True)
    try:
        thread.start()
    except BaseException:
        turn.release()
        raise
    return thread
