"""Operating richpref as a Prefect project: a real server, a process worker, deployments, cache hits,
and the same pairs from a 2-worker Dask cluster as from one process."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from richpref.storage import RunStore

OVERRIDES = '["source.limit=8", "source.shard_size=4"]'
PY = sys.executable
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(prefect_server):
    return prefect_server


def _run_deployment(server, run: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "prefect"), "deployment", "run", "curate/tiny", "--watch", "--watch-timeout", "400",
           "--param", f"run={run}", "--param", f"data_dir={server['data']}",
           "--param", f"models_root={server['models']}", "--param", f"overrides={OVERRIDES}"]
    return subprocess.run(cmd, env=server["env"], capture_output=True, text=True, timeout=450)


def _task_states_of_latest_run(server) -> list[tuple[str, str]]:
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
        "from prefect.client.schemas.sorting import FlowRunSort\n"
        "with get_client(sync_client=True) as c:\n"
        "    fr = c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]\n"
        "    trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))\n"
        "    print(json.dumps([[t.name, t.state.name] for t in trs]))\n")
    out = subprocess.run([PY, "-c", code], env=server["env"], capture_output=True, text=True, timeout=120, check=True)
    return [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


def _pairs(data, run) -> dict[int, str]:
    store = RunStore(str(data), run)
    return {s: hashlib.sha256(Path(store.shard_path("pairs", s)).read_bytes()).hexdigest() for s in store.shards("pairs")}


def test_deployment_runs_on_a_worker_then_every_stage_is_served_from_cache(server):
    first = _run_deployment(server, "served")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _pairs(server["data"], "served"), "the deployment run should export pairs"
    work = RunStore(str(server["data"]), "served").read_log("work.jsonl")
    assert {r["stage"] for r in work} >= {"source", "sample", "critique", "edit", "relabel", "export"}

    second = _run_deployment(server, "served")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    states = _task_states_of_latest_run(server)
    assert states, "no task runs recorded"
    assert all(state == "Cached" for _, state in states), states
    assert len(RunStore(str(server["data"]), "served").read_log("work.jsonl")) == len(work)


def test_two_dask_workers_give_the_same_pairs_as_one_process(server):
    env = dict(server["env"])
    cmd = [str(BIN / "richpref"), "--data-dir", str(server["data"]), "curate", "--run", "dask", "--dask-workers", "2",
           "--models-root", str(server["models"]), "--set", "source.limit=8", "--set", "source.shard_size=4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if not _pairs(server["data"], "served"):  # the deployment test did not run first: run it here
        assert _run_deployment(server, "served").returncode == 0
    # Same pairs: same items, captions and labels; images equal up to CPU float noise, because Dask
    # workers run torch with one thread each and a different reduction order moves a pixel by a level.
    a = _pair_rows(server["data"], "served")
    b = _pair_rows(server["data"], "dask")
    assert [r["item_id"] for r in a] == [r["item_id"] for r in b] and a
    for x, y in zip(a, b):
        assert (x["caption"], x["label_0"]) == (y["caption"], y["label_0"])
        for col in ("jpg_0", "jpg_1"):
            ia = np.asarray(Image.open(io.BytesIO(x[col])), dtype=int)
            ib = np.asarray(Image.open(io.BytesIO(y[col])), dtype=int)
            assert ia.shape == ib.shape and np.abs(ia - ib).max() <= 2 and (ia != ib).mean() < 0.01


def _pair_rows(data, run) -> list[dict]:
    store = RunStore(str(data), run)
    rows = [r for s in store.shards("pairs") for r in store.read_shard("pairs", s).to_pylist()]
    return sorted(rows, key=lambda r: r["item_id"])
