"""Crashes: SIGKILL at seeded random points in every stage, then resume; two processes on one run.

Each trial kills a `richpref curate` process (RICHPREF_FAULTS picks the point: before a shard is
computed, after its file is written but before it is renamed into place, or right after it is
committed), reruns the same command, and checks the pairs are byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from richpref.storage import RunStore
from richpref.tasks import OUTPUTS, PIPELINE

BIN = Path(sys.executable).parent
ARGS = ["--set", "source.limit=4", "--set", "source.shard_size=2"]
STAGES = ["source"] + [s.name for s in PIPELINE]
KINDS = ["kill", "kill-write", "kill-after"]
SEEDS = list(range(10))


def _curate(server, run: str, faults: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(server["env"])
    if faults:
        env["RICHPREF_FAULTS"] = faults
    cmd = [str(BIN / "richpref"), "--data-dir", str(server["data"]), "curate", "--run", run,
           "--models-root", str(server["models"]), *ARGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _pairs(server, run: str) -> dict[int, str]:
    store = RunStore(str(server["data"]), run)
    return {s: hashlib.sha256(Path(store.shard_path("pairs", s)).read_bytes()).hexdigest() for s in store.shards("pairs")}


def _fault(seed: int) -> str:
    rng = random.Random(seed)
    kind = rng.choice(KINDS)
    stage = rng.choice(STAGES)
    return f"{stage}:{rng.randrange(2)}:{kind}"


@pytest.fixture(scope="module")
def reference(prefect_server):
    done = _curate(prefect_server, "uninterrupted")
    assert done.returncode == 0, done.stderr[-3000:]
    pairs = _pairs(prefect_server, "uninterrupted")
    assert pairs
    return pairs


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_random_point_then_resume_gives_identical_pairs(prefect_server, reference, seed):
    run, fault = f"killed-{seed}", _fault(seed)
    killed = _curate(prefect_server, run, faults=fault)
    assert killed.returncode == -9, f"{fault}: expected SIGKILL, got {killed.returncode}\n{killed.stderr[-2000:]}"
    resumed = _curate(prefect_server, run)
    assert resumed.returncode == 0, f"{fault}: resume failed\n{resumed.stderr[-3000:]}"
    assert _pairs(prefect_server, run) == reference, fault

    store = RunStore(str(prefect_server["data"]), run)
    source_ids = sorted(store.read_stage("source", columns=["item_id"]).column("item_id").to_pylist())
    assert len(source_ids) == len(set(source_ids)) == 4
    for out in OUTPUTS[1:]:
        ids = [i for s in store.shards(out) for i in store.read_shard(out, s).column("item_id").to_pylist()]
        assert len(ids) == len(set(ids)), f"{fault}: duplicated item_id in {out}"
        assert set(ids) <= set(source_ids), f"{fault}: unknown item_id in {out}"
    # Work actually redone after the kill: nothing computed twice except the killed shard itself.
    work = [(r["stage"], r["shard"]) for r in store.read_log("work.jsonl")]
    repeated = {w for w in work if work.count(w) > 1}
    stage, shard, kind = fault.split(":")
    allowed = {(stage, int(shard))} if kind != "kill" else set()
    assert repeated <= allowed, f"{fault}: recomputed {repeated}"


def test_two_processes_on_the_same_run_compute_each_shard_once(prefect_server, reference):
    cmd_env = dict(prefect_server["env"])
    cmd = [str(BIN / "richpref"), "--data-dir", str(prefect_server["data"]), "curate", "--run", "twice",
           "--models-root", str(prefect_server["models"]), *ARGS]
    procs = [subprocess.Popen(cmd, env=cmd_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    work = [(r["stage"], r["shard"]) for r in RunStore(str(prefect_server["data"]), "twice").read_log("work.jsonl")]
    assert sorted(work) == sorted(set(work)), f"computed twice: {[w for w in set(work) if work.count(w) > 1]}"
    assert _pairs(prefect_server, "twice") == reference
