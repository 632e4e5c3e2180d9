"""Shards of a served-VLM stage overlap on a Dask worker: such a shard claims half of the worker's GPU
slot, so two run at once (the next shard's requests reach the server while the last ones of the
previous shard finish), and the process's resident-model slot keeps each shard's model until that
shard ends. Real threads and a real Dask cluster; the "models" here are plain objects, since what is
tested is the slot and the schedule, not a model."""
from __future__ import annotations

import threading
import time

import pytest

from richpref.run.gpu_claims import gpu_claim
from richpref.models.runtime import ResidentModel
from richpref.schemas.config import load_profile
from richpref.tasks import ALL_STAGES

BY_NAME = {s.name: s for s in ALL_STAGES}
SERVED = ["critique.engine.backend=server", "critique.engine.endpoint=http://127.0.0.1:9/v1"]


def test_a_served_vlm_stage_claims_half_a_gpu_slot_and_in_process_models_the_whole():
    local, served = load_profile("tiny"), load_profile("tiny", overrides=SERVED)
    assert gpu_claim(BY_NAME["critique"], local) == 1.0
    assert gpu_claim(BY_NAME["critique"], served) == 0.5
    assert gpu_claim(BY_NAME["instruct"], served) == 1.0  # its own engine is still in-process
    assert gpu_claim(BY_NAME["score"], served) == 1.0 and gpu_claim(BY_NAME["filter"], served) == 0.0


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


@pytest.mark.parametrize("overrides, overlap", [(SERVED, True), ([], False)])
def test_a_gpu_worker_runs_two_served_shards_at_once_and_one_in_process_shard(overrides, overlap):
    import dask
    from distributed import Client, LocalCluster

    claim = gpu_claim(BY_NAME["critique"], load_profile("tiny", overrides=overrides))

    def shard(k):
        t0 = time.monotonic()
        time.sleep(0.5)
        return t0, time.monotonic()

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with dask.annotate(resources={"GPU": claim}):
            futs = [client.submit(shard, k, pure=False) for k in range(2)]
        (s0, e0), (s1, e1) = client.gather(futs)
    assert (max(s0, s1) < min(e0, e1)) == overlap
