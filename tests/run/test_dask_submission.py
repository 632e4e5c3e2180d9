"""A Prefect task run goes to Dask sealed: the scheduler passes on bytes, the worker opens them
(richpref/run/dask_submission.py)."""
from __future__ import annotations

import pickle
import types

import richpref.run.shard_task  # noqa: F401 - importing the shard task turns sealing on, as in a flow
from richpref.run.dask_submission import Sealed, run_sealed

OPENED: list[str] = []


class CountsLoads:
    """A parameter that records each unpickling of it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self):
        return (_loaded, (self.name,))


def _loaded(name: str) -> CountsLoads:
    OPENED.append(name)
    return CountsLoads(name)


def _captured_submit(monkeypatch) -> list:
    import distributed

    calls = []

    def parent_submit(self, func, *args, **kwargs):
        calls.append((func, args, kwargs))
        return types.SimpleNamespace()

    monkeypatch.setattr(distributed.Client, "submit", parent_submit)
    return calls


def test_a_task_run_goes_as_an_importable_function_and_one_sealed_blob_the_scheduler_does_not_open(monkeypatch):
    from distributed import Future
    from prefect import task
    from prefect_dask.client import PrefectDaskClient

    calls = _captured_submit(monkeypatch)
    client = object.__new__(PrefectDaskClient)  # no cluster: only what goes to Dask is looked at
    class Upstream(Future):  # a future of another task run, as Dask's submit would see it; no cluster
        def __init__(self):
            self.task_run_id = "0" * 32

        def __del__(self):
            pass

    upstream = Upstream()
    OPENED.clear()
    future = client.submit(task(lambda x, y, big: x, name="t"),
                           parameters={"x": upstream, "y": [1, 2], "big": CountsLoads("big")}, return_type="state")
    func, args, kwargs = calls[0]
    assert func is run_sealed and pickle.loads(pickle.dumps(func)) is run_sealed  # by reference
    sealed, with_futures, wait_for = args
    assert isinstance(sealed, Sealed) and list(with_futures) == ["x"] and with_futures["x"] is upstream
    assert kwargs["key"] == f"<lambda>-{future.task_run_id.hex}" and kwargs["pure"] is False
    again = pickle.loads(pickle.dumps(args[0]))  # what the scheduler does with it
    assert OPENED == [] and again.blob == sealed.blob
    call = again.open()  # what the worker does
    assert OPENED == ["big"] and call["parameters"]["y"] == [1, 2] and call["task_run_id"] == future.task_run_id
    assert call["return_type"] == "state" and "x" in call["dependencies"]


def test_what_is_not_a_sync_task_run_goes_to_prefects_own_submit(monkeypatch):
    from prefect import task
    from prefect_dask.client import PrefectDaskClient

    calls = _captured_submit(monkeypatch)
    client = object.__new__(PrefectDaskClient)
    client.submit(len, [1])  # not a task run: Dask's own default

    async def coro(x):
        return x

    client.submit(task(coro, name="a"), parameters={"x": 1})  # async: Prefect's closure, unhashed
    assert calls[0][0] is len and calls[0][2].get("pure", True) is True
    assert calls[1][0] is not run_sealed and calls[1][2]["pure"] is False


def test_sealed_task_runs_compute_on_a_dask_cluster_with_their_inputs_resolved(prefect_harness):
    from distributed import LocalCluster
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task
    def add(x, y):
        return x + y

    @flow
    def chain():
        first = add.submit(1, 2)
        second = add.submit(first, {"a": 10}["a"])
        return first, second.result(), second.state.state_details.task_run_id == second.task_run_id

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        first, total, same_run = chain.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))()
    assert total == 13 and same_run
