"""Crashes: SIGKILL in every stage, each followed by a resume; several processes on one run.

Every stage is killed once, in pipeline order, in one of two runs whose processes run side by side
(one takes the even stages, the other the odd ones). RICHPREF_FAULTS picks each point: before a
shard is computed, after its file is written but before it is renamed into place, or right after it
is committed. Each rerun of the same command resumes up to the next kill. The last rerun finishes,
and its pairs must be byte-identical to an uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path


from richpref.run.storage import RunStore
from richpref.tasks import OUTPUTS, PIPELINE
from run_sizes import SMALL_ARGS

BIN = Path(sys.executable).parent
# Every run here is the runner's business, not the rewards': one voting reward (tests/run_sizes.py).
ARGS = SMALL_ARGS
STAGES = ["source"] + [s.name for s in PIPELINE]
KINDS = ["kill", "kill-write", "kill-after"]
# One kill per stage, in the order the run reaches them; the kinds and shards rotate.
FAULTS = [f"{stage}:{i % 2}:{KINDS[i % 3]}" for i, stage in enumerate(STAGES)]


def _env(server, faults: str | None = None) -> dict:
    # One torch thread in every process and Dask worker, so images are byte-identical across layouts;
    # short leases, so a holder that stops renewing is given up quickly.
    env = {**server["env"], "RICHPREF_TORCH_THREADS": "1", "RICHPREF_LEASE_SECONDS": "5"}
    if faults:
        env["RICHPREF_FAULTS"] = faults
    return env


def _cmd(server, run: str, *extra: str) -> list[str]:
    return [str(BIN / "richpref"), "--data-dir", str(server["data"]), "curate", "--run", run,
            "--models-root", str(server["models"]), *ARGS, *extra]


def _curate(server, run: str, faults: str | None = None, timeout: int = 300, extra=()) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(server, run, *extra), env=_env(server, faults), capture_output=True, text=True,
                          timeout=timeout)


def _work(server, run: str) -> list[tuple[str, int]]:
    return [(r["stage"], r["shard"]) for r in RunStore(str(server["data"]), run).read_log("work.jsonl")]


def _each_shard_once(server, run: str) -> None:
    work = _work(server, run)
    assert sorted(work) == sorted((s, k) for s in STAGES for k in range(2)), work


def _pairs(server, run: str) -> dict[int, str]:
    store = RunStore(str(server["data"]), run)
    return {s: hashlib.sha256(Path(store.shard_path("pairs", s)).read_bytes()).hexdigest() for s in store.shards("pairs")}


def _start(server, run: str, faults: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(_cmd(server, run), env=_env(server, faults), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish_all(procs: dict[str, subprocess.Popen], timeout: float = 300) -> dict[str, tuple[int, str]]:
    """Each process's exit status and the end of its stderr; none left running, whatever fails."""
    out = {}
    try:
        for name, p in procs.items():
            _, err = p.communicate(timeout=timeout)
            out[name] = (p.returncode, err[-3000:])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def test_sigkill_in_every_stage_each_then_resumed_gives_identical_pairs(prefect_server, small_reference):
    # Two chains side by side, one process of each at a time: run killed-a is killed in stages 0, 2, 4, ...
    # and run killed-b in stages 1, 3, 5, ... (the same faults as one chain through FAULTS would meet).
    chains = {"killed-a": FAULTS[0::2], "killed-b": FAULTS[1::2]}
    for step in range(max(len(f) for f in chains.values())):
        faults = {run: f[step] for run, f in chains.items() if step < len(f)}
        done = _finish_all({run: _start(prefect_server, run, fault) for run, fault in faults.items()})
        for run, (rc, err) in done.items():
            assert rc == -9, f"{run}, {faults[run]}: expected SIGKILL, got {rc}\n{err[-2000:]}"
    for run, (rc, err) in _finish_all({run: _start(prefect_server, run) for run in chains}).items():
        assert rc == 0, f"{run}: resume failed\n{err}"
    for run, faults in chains.items():
        _assert_resumed_like_the_reference(prefect_server, run, faults, small_reference.pairs)


def _assert_resumed_like_the_reference(server, run: str, faults: list[str], reference: dict[int, str]) -> None:
    assert _pairs(server, run) == reference, run
    store = RunStore(str(server["data"]), run)
    source_ids = sorted(store.read_stage("source", columns=["item_id"]).column("item_id").to_pylist())
    assert len(source_ids) == len(set(source_ids)) == 4
    for out in OUTPUTS[1:]:
        ids = [i for s in store.shards(out) for i in store.read_shard(out, s).column("item_id").to_pylist()]
        assert len(ids) == len(set(ids)), f"duplicated item_id in {out}"
        assert set(ids) <= set(source_ids), f"unknown item_id in {out}"
    # Work actually redone after the kills: nothing computed twice except a shard killed after its compute.
    work = [(r["stage"], r["shard"]) for r in store.read_log("work.jsonl")]
    repeated = {w for w in work if work.count(w) > 1}
    allowed = {(f.split(":")[0], int(f.split(":")[1])) for f in faults if not f.endswith(":kill")}
    assert repeated <= allowed, f"{run}: recomputed {repeated - allowed}"
    # Every shard was computed; one killed right after its commit is done but never reached the log.
    unlogged = {(f.split(":")[0], int(f.split(":")[1])) for f in faults if f.endswith(":kill-after")}
    assert set(work) | unlogged == {(s, k) for s in STAGES for k in range(2)}, run


def test_two_workers_give_the_same_pairs_as_one_and_compute_each_shard_once(prefect_server, small_reference):
    # sample shard 1 is slow: without a stage barrier the other worker carries shard 0 on meanwhile.
    # Without the affinity plan: it gives both sample shards one home (the built-in table's 10 s sample
    # load outweighs a shard's work), so shard 0 would wait behind the slow one (no stealing).
    done = _curate(prefect_server, "workers", faults="sample:1:sleep-10", extra=("--workers", "2", "--no-affinity"),
                   timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    _each_shard_once(prefect_server, "workers")
    assert _pairs(prefect_server, "workers") == small_reference.pairs
    store = RunStore(str(prefect_server["data"]), "workers")
    at = {(r["stage"], r["shard"]): r["at"] for r in store.read_log("work.jsonl")}
    assert at[("critique", 0)] < at[("sample", 1)], "critique shard 0 waited for the whole sample stage"
    models = json.loads((Path(prefect_server["data"]) / "runs" / "workers" / "run.json").read_text())["models"]
    assert models["workers"] == 2 and models["loads"] >= 5 and models["swaps"] < models["loads"], models


def test_processes_sharing_a_run_compute_each_shard_once_and_take_over_a_killed_holders_lease(prefect_server,
                                                                                              small_reference):
    """Three processes on one run. The first holds sample shard 0 (sleeping in it) when two more start
    together: they race for every other shard, leave shard 0 to its live holder, and compute each shard
    once between them. The first is SIGKILLed mid-shard: one of the two takes its lease over and redoes
    that shard. Both finish; the pairs equal an uninterrupted run's."""
    run = "shared"
    store = RunStore(str(prefect_server["data"]), run)
    lease = Path(store.stage_dir("sample")) / "part-00000.lease-0000"
    first = subprocess.Popen(_cmd(prefect_server, run), env=_env(prefect_server, "sample:0:sleep-300"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    others: list[subprocess.Popen] = []
    try:
        _wait_for(lease.exists, [first], "the first process to lease sample shard 0")
        assert json.loads(lease.read_text())["pid"] == first.pid
        others = [subprocess.Popen(_cmd(prefect_server, run), env=_env(prefect_server), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(2)]
        # They take the shard nobody holds, and leave shard 0 to its live holder.
        _wait_for(lambda: ("sample", 1) in _work(prefect_server, run), others, "sample shard 1")
        assert ("sample", 0) not in _work(prefect_server, run)
        first.kill()
        first.wait()
        outs = [p.communicate(timeout=400) for p in others]
        assert [p.returncode for p in others] == [0, 0], [err[-2000:] for _, err in outs]
        assert any("taking over the lease of part-00000.parquet" in err for _, err in outs)
    finally:
        for p in (first, *others):
            if p.poll() is None:
                p.kill()
                p.wait()
    _each_shard_once(prefect_server, run)
    assert _pairs(prefect_server, run) == small_reference.pairs


def _wait_for(condition, procs: list[subprocess.Popen], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"process exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
