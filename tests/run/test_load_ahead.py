"""`richpref curate` on its own task runner loads the first model it needs while its Prefect server
starts (richpref/run/load_ahead.py): which stage's, and that its first shard then finds it resident."""
from __future__ import annotations

import json

from richpref.run.load_ahead import LOADS_LOG, stage_to_load
from richpref.run.plan import StagePlan
from richpref.run.storage import RunStore
from richpref.schemas.config import load_profile
from richpref.tasks import stages_for

SERVED = ["critique.engine.backend=server", "critique.engine.endpoint=http://127.0.0.1:9/v1"]


def _plan(stages, done=(), todo=()) -> list[StagePlan]:
    """Shard 0 of every stage: done for the stages in `done`, to do in `todo`, blocked for the rest."""
    return [StagePlan(s.name, done=[0]) if s.name in done else StagePlan(s.name, todo=[0]) if s.name in todo
            else StagePlan(s.name, blocked=[0]) for s in stages]


def test_the_first_stage_with_work_that_loads_a_model_in_this_process_is_loaded_ahead():
    tiny = load_profile("tiny")
    stages = stages_for(tiny)
    assert [s.name for s in stages][:3] == ["source", "sample", "critique"]
    # A new run: the source is to do, the rest blocked on it; the source loads no model.
    assert stage_to_load(stages, _plan(stages, todo=["source"]), tiny).name == "sample"
    # Sample done: critique's model is the next one needed.
    assert stage_to_load(stages, _plan(stages, done=["source", "sample"], todo=["critique"]), tiny).name == "critique"
    # A run up to the source (`--until source`), or one with nothing left to compute: nothing to load.
    assert stage_to_load(stages_for(tiny, "source"), _plan(stages_for(tiny, "source"), todo=["source"]), tiny) is None
    assert stage_to_load(stages, _plan(stages, done=[s.name for s in stages]), tiny) is None
    # The first model stage with work is served by a VLM server: nothing is loaded (not a later stage's model,
    # which that stage's shards would swap out).
    served = load_profile("tiny", overrides=SERVED)
    assert stage_to_load(stages, _plan(stages, done=["source", "sample"], todo=["critique"]), served) is None


def test_the_first_model_stage_finds_the_model_loaded_ahead_resident(small_reference):
    """The small reference run (`richpref curate`, this process's task runner) loaded sample's model
    ahead of its shards and recorded it; sample's first shard computed without loading it again (a load
    of the tiny SD1.5 pipeline takes seconds, a shard of 2 prompts a fraction of that). The source stage
    before it, which loads no model, kept it resident."""
    small_reference.pairs  # waits for the run
    store = RunStore(str(small_reference.data), small_reference.run)
    loads = store.read_log(LOADS_LOG)
    assert [(r["stage"], len(r["models"])) for r in loads] == [("sample", 1)], loads
    first = min((r for r in store.read_log("work.jsonl") if r["stage"] == "sample"), key=lambda r: r["at"])
    assert first["compute_s"] < loads[0]["load_s"] / 2, json.dumps({"first_shard": first, "load": loads[0]})


def test_a_shard_that_comes_during_the_load_waits_for_it_outside_its_compute(tmp_path):
    """The load holds the compute turn, which the stage's shards take before their compute starts
    (richpref/run/gpu_claims.py shard_model_scope). A plain sleep stands in for the model: what is
    tested is the turn and the record. A load that fails leaves the turn free and records nothing."""
    import dataclasses
    import threading
    import time

    from richpref.run.gpu_claims import shard_model_scope
    from richpref.run.load_ahead import load_ahead

    tiny = load_profile("tiny")
    sample = next(s for s in stages_for(tiny) if s.name == "sample")
    started = threading.Event()

    def slow_load(profile):
        started.set()
        time.sleep(0.5)
        return ["a/model"]

    store = RunStore(str(tmp_path), "r")
    t0 = time.perf_counter()
    thread = load_ahead(dataclasses.replace(sample, load=slow_load), tiny, store)
    with shard_model_scope(sample, tiny):
        waited = time.perf_counter() - t0
    assert started.is_set() and waited >= 0.45, waited
    thread.join(5)
    (record,) = store.read_log(LOADS_LOG)
    assert record["stage"] == "sample" and record["models"] == ["a/model"] and 0.45 <= record["load_s"] < 5
    assert record["thread_cpu_s"] < 0.25  # a sleep: its thread's CPU is small, its wall is not

    def failing_load(profile):
        raise OSError("no such model")

    load_ahead(dataclasses.replace(sample, load=failing_load), tiny, store).join(5)
    t0 = time.perf_counter()
    with shard_model_scope(sample, tiny):
        assert time.perf_counter() - t0 < 0.2
    assert len(store.read_log(LOADS_LOG)) == 1
