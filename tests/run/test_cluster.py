"""Preflight of a Dask cluster (richpref/run/cluster.py) and which shards claim a GPU: real local Dask
clusters, no mocks; a scheduler address nothing answers is refused in seconds, before Prefect starts. The multi-node run itself: tests/scenarios/test_multinode.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from richpref.run.cluster import ClusterError, check_cluster, check_scheduler, refuse_loopback_api
from richpref.tasks import ALL_STAGES

BIN = Path(sys.executable).parent


def test_only_stages_that_load_a_model_claim_a_gpu():
    gpu = {s.name for s in ALL_STAGES if s.loads_model}
    assert gpu == {"sample", "critique", "instruct", "edit", "cutout", "check", "score"}


@pytest.mark.parametrize("api, scheduler, refused", [
    ("http://127.0.0.1:4200/api", "tcp://10.224.24.1:8786", True),
    ("http://localhost:4200/api", "10.224.24.1:8786", True),
    ("http://127.0.0.1:4200/api", "tcp://127.0.0.1:8786", False),
    ("http://10.224.24.1:4200/api", "tcp://10.224.24.1:8786", False),
    (None, "tcp://10.224.24.1:8786", False),
])
def test_a_loopback_prefect_api_is_refused_with_a_remote_scheduler(api, scheduler, refused):
    if refused:
        with pytest.raises(ClusterError, match="--prefect-host"):
            refuse_loopback_api(api, scheduler)
    else:
        refuse_loopback_api(api, scheduler)


@pytest.fixture(scope="module")
def cpu_only_cluster():
    """Two real worker processes without the GPU resource."""
    from distributed import Client, LocalCluster

    # preloaded as docs/operations.md starts workers: a first import of torch on a worker's event loop
    # (in its preflight answer) would otherwise count in the "seconds" these tests bound
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      preload=["richpref.run.shard_task"]) as cluster, Client(cluster) as client:
        yield client


def test_workers_without_the_gpu_resource_fail_in_seconds_naming_them_and_the_fix(cpu_only_cluster, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        check_cluster(cpu_only_cluster, str(tmp_path), None)
    assert time.monotonic() - t0 < 10
    for addr in cpu_only_cluster.scheduler_info(n_workers=-1)["workers"]:
        assert addr in str(err.value)
    assert "--resources GPU=1" in str(err.value)
    # A run of model-free stages only needs no GPU, and every worker passes the other checks.
    reports = check_cluster(cpu_only_cluster, str(tmp_path), None, need_gpu=False)
    assert len(reports) == 2 and all(r.device == "cpu" and not r.errors for r in reports)
    assert not (tmp_path / "_preflight").exists() or not any((tmp_path / "_preflight").iterdir())


def test_an_unreachable_prefect_api_and_an_unshared_data_dir_name_each_worker_in_seconds(cpu_only_cluster):
    import socket

    # A port that takes connections and never answers (a firewall or a hung server): the workers must
    # give up on their own timeout, not wait for the preflight's.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        # memory:// lives inside each process: the workers do not see this process's probe file, as
        # workers on other nodes do not see a node-local folder.
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as err:
            check_cluster(cpu_only_cluster, "memory://richpref-preflight", f"http://127.0.0.1:{port}/api",
                          need_gpu=False)
        took = time.monotonic() - t0
    assert took < 20, took  # the workers' 5 s timeout, not the preflight's 60 s
    msg = str(err.value)
    for addr in cpu_only_cluster.scheduler_info(n_workers=-1)["workers"]:
        assert f"({addr})" in msg
    assert msg.count("cannot reach the Prefect API") == 2
    assert msg.count("cannot read and write the data dir memory://richpref-preflight") == 2


def test_curate_on_a_cluster_without_gpu_workers_exits_in_seconds(cpu_only_cluster, tmp_path, tiny_models,
                                                                   prefect_api_env):
    # On the session's Prefect API: a CLI without one starts a temporary server first (15-25 s of CPU on
    # a loaded 2-core machine), which is not what this test bounds.
    t0 = time.monotonic()
    done = subprocess.run(
        [str(BIN / "richpref"), "--data-dir", str(tmp_path), "curate", "--run", "nogpu", "--models-root",
         str(tiny_models), "--set", "source.limit=2", "--dask-address", cpu_only_cluster.scheduler.address],
        capture_output=True, text=True, timeout=120, env={**os.environ, **prefect_api_env})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "no Dask worker has the GPU resource" in done.stderr and "--resources GPU=1" in done.stderr
    assert time.monotonic() - t0 < 60  # the CLI's start (imports, the flow run) and the preflight
    assert not (tmp_path / "runs" / "nogpu" / "source").exists() or not any((tmp_path / "runs" / "nogpu" / "source").glob("*.parquet"))


def test_curate_refuses_a_loopback_prefect_api_with_a_remote_scheduler_before_starting_anything(tmp_path, tiny_models):
    # In a network namespace of its own where we can, so that even a broken refusal sends nothing out.
    isolated = ["unshare", "-n"] if os.geteuid() == 0 and shutil.which("unshare") else []
    done = subprocess.run(
        [*isolated, str(BIN / "richpref"), "--data-dir", str(tmp_path), "curate", "--run", "x", "--models-root",
         str(tiny_models), "--set", "source.limit=2", "--dask-address", "tcp://10.224.24.1:8786"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "loopback" in done.stderr and "--prefect-host" in done.stderr


def test_a_cluster_that_loses_its_last_gpu_worker_fails_after_the_grace_period():
    from distributed import Client, LocalCluster

    from richpref.run.cluster import GpuWatch

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        watch = GpuWatch(client, grace=0.5)
        watch.check()
        client.retire_workers(list(client.scheduler_info(n_workers=-1)["workers"]))
        watch.check()  # gone, but within the grace period (a worker may be restarting)
        time.sleep(0.6)
        with pytest.raises(ClusterError, match="no Dask worker with the GPU resource"):
            watch.check()


def test_a_wait_on_shards_no_worker_can_run_fails_once_no_gpu_worker_is_left():
    # The dispatch's wait, the pass's final wait and the stage pass's wait all go through
    # wait_watched: a model shard on a cluster without GPU workers fails it instead of hanging.
    from distributed import Client, LocalCluster

    from richpref.run.cluster import GpuWatch, wait_watched

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        stuck = client.submit(sum, [1, 2], resources={"GPU": 1}, pure=False)  # no worker has the resource
        wait_watched([stuck], None, 0.2)  # without a watch: returns at the timeout
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="no Dask worker with the GPU resource"):
            wait_watched([stuck], GpuWatch(client, grace=0.0), 0.2)
        assert time.monotonic() - t0 < 5


def test_a_worker_running_other_versions_fails_the_preflight_naming_the_package(cpu_only_cluster, tmp_path, monkeypatch):
    import richpref.run.cluster as cluster

    real = cluster.versions()
    # This process (the client) pretends to run another diffusers: the workers (other processes) do not.
    monkeypatch.setattr(cluster, "versions", lambda: {**real, "diffusers": "0.0.1"})
    with pytest.raises(ClusterError) as err:
        check_cluster(cpu_only_cluster, str(tmp_path), None, need_gpu=False)
    msg = str(err.value)
    assert msg.count("runs other versions than this process") == 2
    assert f"diffusers {real['diffusers']} here 0.0.1" in msg and "install the same richpref" in msg


def test_the_slurm_recipe_in_the_docs_starts_workers_that_pass_the_preflight(tmp_path):
    """The Slurm recipe of docs/operations.md, run without Slurm: its SLURMCluster (dask-jobqueue) writes
    the job script sbatch would run on a GPU node; here bash runs that script (its #SBATCH lines are
    comments), and the worker it starts joins the recipe's scheduler with the GPU slot and passes the
    preflight."""
    import signal

    from distributed import Client

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    recipe = doc.split("cat > cluster.py <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    setup = recipe.split("cluster.scale(", 1)[0]  # up to the submission: there is no sbatch here
    local = setup.replace('"host": "0.0.0.0", "port": 8786', '"host": "127.0.0.1", "port": 0')
    assert local != setup, "the recipe's scheduler_options changed: update this test"
    names: dict = {}
    exec(local, names)
    cluster, worker = names["cluster"], None
    try:
        script = cluster.job_script()
        assert "#SBATCH --gres=gpu:1" in script and "GPU=1" in script and "richpref.run.shard_task" in script
        (tmp_path / "job.sh").write_text(script)
        worker = subprocess.Popen(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, start_new_session=True,
                                  env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=90)
            reports = check_cluster(client, str(tmp_path / "data"), None)
        assert [r.resources for r in reports] == [{"GPU": 1}] and not reports[0].errors
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        cluster.close()


def test_the_kubernetes_recipe_in_the_docs_starts_workers_that_pass_the_preflight(tmp_path):
    """The Kubernetes recipe of docs/operations.md, run without Kubernetes: the scheduler and worker
    containers' commands of its DaskCluster run as processes here, with the environment the dask operator
    gives a worker pod (DASK_SCHEDULER_ADDRESS, DASK_WORKER_NAME); the worker joins with the GPU slot and
    passes the preflight, and the client pod's --dask-address names the scheduler service the manifest
    declares."""
    import json
    import re
    import signal
    import socket

    import yaml
    from distributed import Client

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    manifest = yaml.safe_load(doc.split("cat > richpref-dask.yaml <<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0])
    overrides = json.loads(re.search(r"--overrides '(.*?)'\n", doc, re.S).group(1).replace("\n", " "))
    client_args = overrides["spec"]["containers"][0]["args"]
    service = manifest["spec"]["scheduler"]["service"]
    port = service["ports"][0]["port"]
    assert client_args[client_args.index("--dask-address") + 1] == f"tcp://{manifest['metadata']['name']}-scheduler:{port}"
    (scheduler_args,) = [c["args"] for c in manifest["spec"]["scheduler"]["spec"]["containers"]]
    (worker_args,) = [c["args"] for c in manifest["spec"]["worker"]["spec"]["containers"]]

    with socket.socket() as s:  # the manifest's port may be taken on this machine
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    scheduler_cmd = [a if a != str(port) else str(free) for a in scheduler_args] + ["--host", "127.0.0.1"]
    pod_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DASK_WORKER_NAME": "richpref-worker-0",
               "DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{free}"}
    # Kubernetes expands $(VAR) in args from the container's environment.
    worker_cmd = [re.sub(r"\$\((\w+)\)", lambda m: pod_env[m.group(1)], a) for a in worker_args]
    procs = []
    try:
        procs.append(subprocess.Popen(scheduler_cmd, cwd=tmp_path, env=pod_env, start_new_session=True))
        procs.append(subprocess.Popen(worker_cmd, cwd=tmp_path, env=pod_env, start_new_session=True))
        with Client(pod_env["DASK_SCHEDULER_ADDRESS"], timeout=60) as client:
            client.wait_for_workers(1, timeout=90)
            reports = check_cluster(client, str(tmp_path / "data"), None)
        assert [r.resources for r in reports] == [{"GPU": 1}] and not reports[0].errors
        assert reports[0].name == "richpref-worker-0"
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.parametrize("threads, warned", [(2, True), (3, False)])
def test_the_preflight_warns_of_a_gpu_worker_with_too_few_threads_for_its_two_model_shards(threads, warned, tmp_path,
                                                                                         caplog):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with caplog.at_level("WARNING", logger="richpref"):
            check_cluster(client, str(tmp_path), None)
    hits = [r.getMessage() for r in caplog.records if "fewer than 3 threads" in r.getMessage()]
    assert bool(hits) == warned, hits
    assert not warned or "--nthreads 3" in hits[0]


def test_a_scheduler_address_nothing_answers_is_refused_in_seconds_before_prefect_starts(tmp_path, capsys):
    import socket

    from richpref.cli.commands import main
    from richpref.common.procs import free_port

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_scheduler(f"tcp://127.0.0.1:{listening.getsockname()[1]}")  # answers: passes
    closed = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match=rf"the Dask scheduler at {closed} cannot be reached .*fix --dask-address"):
        check_scheduler(closed)
    t0 = time.monotonic()
    assert main(["--data-dir", str(tmp_path), "curate", "--profile", "tiny", "--run", "r", "--dask-address", closed]) == 2
    err = capsys.readouterr().err  # before: 30 s inside the started flow, then a bare OSError traceback
    assert err.startswith(f"error: the Dask scheduler at {closed} cannot be reached") and "Flow run" not in err
    assert time.monotonic() - t0 < 20
