"""Two model shards share a Dask worker's GPU slot: each claims half of it. Those of a served-VLM stage
compute at once (the next shard's requests reach the server while the last ones of the previous shard
finish); those of a stage whose model runs in the worker's process take turns to compute, the next one
starting (its task run, its inputs) while the other computes. The process's resident-model slot keeps
each shard's model until that shard ends. Real threads and a real Dask cluster; the "models" here are
plain objects, since what is tested is the slot and the schedule, not a model."""
from __future__ import annotations

import threading
import time

import pytest

from richpref.run.gpu_claims import computing_at_once, gpu_claim, shard_model_scope, takes_turns
from richpref.models.runtime import ResidentModel
from richpref.schemas.config import load_profile
from richpref.tasks import ALL_STAGES

BY_NAME = {s.name: s for s in ALL_STAGES}
SERVED = ["critique.engine.backend=server", "critique.engine.endpoint=http://127.0.0.1:9/v1"]


def test_every_model_stage_claims_half_a_gpu_slot_and_only_in_process_models_take_turns():
    local, served = load_profile("tiny"), load_profile("tiny", overrides=SERVED)
    assert gpu_claim(BY_NAME["critique"], local) == gpu_claim(BY_NAME["critique"], served) == 0.5
    assert gpu_claim(BY_NAME["score"], served) == 0.5 and gpu_claim(BY_NAME["filter"], served) == 0.0
    assert takes_turns(BY_NAME["critique"], local) and not takes_turns(BY_NAME["critique"], served)
    assert takes_turns(BY_NAME["instruct"], served)  # its own engine is still in-process
    assert not takes_turns(BY_NAME["filter"], local)
    assert computing_at_once(BY_NAME["critique"], served) == 2 and computing_at_once(BY_NAME["critique"], local) == 1


class _Model:
    def __init__(self, name, events):
        self.name, self.events = name, events

    def on_release(self):
        self.events.append(f"release {self.name}")


def test_a_shard_keeps_its_model_while_another_thread_asks_for_another():
    slot, events = ResidentModel(), []
    a_has_it, b_waiting = threading.Event(), threading.Event()

    def shard_a():
        with slot.shard():
            slot.get("a", lambda: events.append("load a") or _Model("a", events))
            a_has_it.set()
            b_waiting.wait(5)
            time.sleep(0.3)  # b is blocked meanwhile
            events.append("a done")

    def shard_b():
        a_has_it.wait(5)
        with slot.shard():
            b_waiting.set()
            slot.get("b", lambda: events.append("load b") or _Model("b", events))
            events.append("b done")

    threads = [threading.Thread(target=shard_a), threading.Thread(target=shard_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert events == ["load a", "a done", "release a", "load b", "b done"]
    assert (slot.loads, slot.swaps) == (2, 1)


def test_two_shards_of_one_model_share_one_load():
    slot, loaded = ResidentModel(), []
    barrier = threading.Barrier(2)

    def shard():
        with slot.shard():
            barrier.wait(5)
            slot.get("vlm", lambda: loaded.append(1) or object())
            barrier.wait(5)  # both inside their shard with the model at once

    threads = [threading.Thread(target=shard) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loaded == [1] and slot.loads == 1


@pytest.mark.parametrize("overrides, computes_at_once", [(SERVED, True), ([], False)])
def test_a_gpu_worker_holds_two_shards_which_compute_at_once_when_served_and_take_turns_in_process(
        overrides, computes_at_once):
    """Each shard 'starts' (0.3 s: its task run, its inputs) and then computes (0.5 s) inside the scope
    the runner puts around a computation. Both shards start at once; in-process, the second computes
    after the first, its start hidden under the first's computation."""
    import dask
    from distributed import Client, LocalCluster

    profile = load_profile("tiny", overrides=overrides)
    stage = BY_NAME["critique"]

    def shard(k):
        started = time.monotonic()
        time.sleep(0.3)
        with shard_model_scope(stage, profile):
            t0 = time.monotonic()
            time.sleep(0.5)
            return started, t0, time.monotonic()

    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with dask.annotate(resources={"GPU": gpu_claim(stage, profile)}):
            futs = [client.submit(shard, k, pure=False) for k in range(2)]
        (a_start, a0, a1), (b_start, b0, b1) = sorted(client.gather(futs), key=lambda r: r[1])
    # Both in flight on the one GPU slot: the second started before the first ended (one at a time, it
    # would start after; a fixed 0.2 s between their starts failed under load at 0.29 s).
    assert max(a_start, b_start) < a1
    assert (b0 < a1) == computes_at_once


def test_in_process_turns_are_per_worker_not_per_process():
    """A threaded cluster runs its workers in one process: each worker (one GPU each) has its own turn."""
    from distributed import Client, LocalCluster

    profile, stage = load_profile("tiny"), BY_NAME["critique"]

    def shard():
        with shard_model_scope(stage, profile):
            t0 = time.monotonic()
            time.sleep(0.5)
            return t0, time.monotonic()

    with LocalCluster(n_workers=2, threads_per_worker=3, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        futs = [client.submit(shard, workers=[w], pure=False) for w in client.scheduler_info()["workers"]]
        (a0, a1), (b0, b1) = client.gather(futs)
    assert max(a0, b0) < min(a1, b1)


def test_after_a_model_free_stage_the_model_loaded_ahead_for_the_next_one_stays():
    """The curate flow's release after each stage (flows/curate.py): a model-free stage (the source)
    leaves what `richpref curate` loaded ahead for the next stage (richpref/run/load_ahead.py) resident;
    a model stage frees its model. In a fresh process: the release freezes what survives it."""
    import subprocess
    import sys
    from pathlib import Path

    probe = """
from richpref.models.runtime import resident
from richpref.run.gpu_claims import release_after_stage
from richpref.tasks import ALL_STAGES
by_name = {s.name: s for s in ALL_STAGES}
resident.get(("generator", "tiny"), lambda: object())
release_after_stage(by_name["source"])
kept = resident._key
release_after_stage(by_name["sample"])
print(kept, resident._key)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "('generator', 'tiny') None", out.stdout
