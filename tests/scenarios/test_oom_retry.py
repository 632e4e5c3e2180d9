"""Out of memory in a batch: the shard is retried at half the batch size before it fails."""
from __future__ import annotations

import shutil

import pytest

from richpref.run.storage import RunStore
from richpref.common.faults import SimulatedOutOfMemory, is_out_of_memory
from test_curate_flow import curate_run, pair_files


def test_a_shard_that_runs_out_of_memory_is_split_and_retried(finished_run, runs_dir, tiny_models, monkeypatch):
    ref, oom = RunStore(str(runs_dir), "ref"), RunStore(str(runs_dir), "oom")
    shutil.copytree(ref.root, oom.root)
    oom.fs.rm(oom.root + "/_log", recursive=True)
    oom.fs.rm(oom.shard_path("critique", 0))
    curate_run(runs_dir, "oom", tiny_models, faults="critique:0:oom", monkeypatch=monkeypatch)
    work = {(r["stage"], r["shard"]): r for r in oom.read_log("work.jsonl")}
    retried = work[("critique", 0)]
    assert retried["oom_retries"] == 1
    assert retried["batch_size"] == finished_run_batch_size(tiny_models) // 2
    assert pair_files(runs_dir, "oom")["part-00000"] == pair_files(runs_dir, "ref")["part-00000"]


def finished_run_batch_size(models_root) -> int:
    from richpref.schemas.config import load_profile

    return load_profile("tiny").critique.batch_size


@pytest.mark.parametrize("exc,oom", [
    (SimulatedOutOfMemory("x"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_only_out_of_memory_errors_are_retried(exc, oom):
    assert is_out_of_memory(exc) is oom
