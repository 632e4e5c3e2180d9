"""A local Dask cluster that starts while the Prefect server does (richpref/run/early_cluster.py)."""
from __future__ import annotations

import os
import sys

from distributed import Client

from richpref.run.early_cluster import EarlyCluster, _stop_forkserver, workers_forked_after
from richpref.run.orchestration import close_early_cluster, start_cluster_early, task_runner


def _worker_state() -> dict:
    import psutil

    return {"api": os.environ.get("PREFECT_API_URL"), "shard_task": "richpref.run.shard_task" in sys.modules,
            # forked from the one process that imported the model libraries (not spawned, each importing them)
            "model_libraries": "transformers" in sys.modules and "diffusers.models" in sys.modules,
            "forked": "forkserver" in " ".join(psutil.Process(os.getppid()).cmdline())}


def test_the_runner_takes_the_cluster_started_early_with_the_shard_task_imported_and_the_api_set():
    runner = task_runner(workers=2)
    start_cluster_early(runner, "http://127.0.0.1:9/api")  # the server is not up yet: nothing asks it
    taken = runner.duplicate().cluster_class(**runner.cluster_kwargs)  # as the flow's runner makes its cluster
    try:
        with Client(taken) as client:
            states = list(client.run(_worker_state).values())
        assert states == [{"api": "http://127.0.0.1:9/api", "shard_task": True, "model_libraries": True,
                           "forked": True}] * 2  # before any task
        assert runner.cluster_class(**runner.cluster_kwargs) is taken  # one cluster, however often asked
    finally:
        close_early_cluster(runner)
    assert taken.status.name == "closed"
    import psutil  # the forkserver ended with the cluster, waited for: nothing outlives the command

    assert not [c for c in psutil.Process().children() if "forkserver" in " ".join(c.cmdline())]
    close_early_cluster(runner)  # again: nothing left to close


def test_a_cluster_not_started_early_is_made_when_taken_and_errors_reach_the_taker():
    made = []

    def cluster_class(**kwargs):
        made.append(kwargs)
        if kwargs.get("fail"):
            raise RuntimeError("no cluster")
        return "cluster"

    assert EarlyCluster(cluster_class).take(n=1) == "cluster" and made == [{"n": 1}]
    failing = EarlyCluster(cluster_class)
    failing.start(None, fail=True)
    try:
        failing.take()
    except RuntimeError as exc:
        assert str(exc) == "no cluster"
    else:
        raise AssertionError("the error of the cluster's start was lost")
    EarlyCluster(cluster_class).close()  # never started: nothing to close


def test_a_copy_sent_with_each_task_carries_no_thread_lock_or_cluster():
    import cloudpickle

    early = EarlyCluster(dict)
    early.start(None, n=1)
    early.take()
    copy = cloudpickle.loads(cloudpickle.dumps(task_runner(workers=2).duplicate()))  # as Prefect sends it
    assert type(copy.cluster_class.__self__) is EarlyCluster
    again = cloudpickle.loads(cloudpickle.dumps(early))
    assert again.take(n=2) == {"n": 2}  # a fresh one: not the original's cluster


def _objects_frozen_after_exit_handlers(queue) -> None:
    import atexit
    import gc

    atexit._run_exitfuncs()  # the exit handlers of the forkserver, which forked this process
    queue.put(gc.get_freeze_count())


def _in_a_forked_worker(target):
    """What `target(queue)` puts, run in a process forked from a fresh forkserver as a local
    cluster's workers are."""
    from distributed.utils import get_mp_context

    _stop_forkserver()  # one started by another test
    try:
        with workers_forked_after(("richpref.tasks", "torch")):
            ctx = get_mp_context()
            queue = ctx.SimpleQueue()
            child = ctx.Process(target=target, args=(queue,))
            child.start()
            child.join(120)
        assert child.exitcode == 0
        return queue.get()
    finally:
        _stop_forkserver()


def test_the_forkserver_of_a_local_cluster_freezes_its_objects_at_exit():
    # Its exit (the final garbage collection over torch, transformers and diffusers) took 1.5 s of
    # every `curate --workers N`, which waits for it.
    assert _in_a_forked_worker(_objects_frozen_after_exit_handlers) > 0


def _freeze_count(queue) -> None:
    import gc

    queue.put(gc.get_freeze_count())


def test_a_worker_forked_from_the_forkserver_starts_with_the_imported_objects_frozen():
    # Its first model load then skips the full collection over them (about 1 s of each worker's CPU).
    assert _in_a_forked_worker(_freeze_count) > 100_000
