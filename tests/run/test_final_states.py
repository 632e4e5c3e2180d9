"""The final states of a pass's shard tasks: fetched a batch at a time while the pass runs, the rest at
the end, each read into its result or its error."""
from __future__ import annotations

from uuid import uuid4

import pytest


def _futures(client, tasks):
    from prefect_dask.task_runners import PrefectDaskFuture

    return [PrefectDaskFuture(wrapped_future=client.submit(fn, pure=False, **kwargs), task_run_id=uuid4())
            for fn, kwargs in tasks]


def _boom():
    raise RuntimeError("worker-level failure")


def _gathers(client) -> list[int]:
    """Counts the futures of each gather the client makes from now on."""
    sizes, gather = [], client.gather

    def counted(futures, *args, **kwargs):
        sizes.append(len(futures))
        return gather(futures, *args, **kwargs)

    client.gather = counted
    return sizes


def test_states_read_into_results_and_errors_and_a_dask_failure_left_to_its_future(prefect_harness):
    from distributed import Client, LocalCluster
    from prefect.states import Completed, Failed

    from richpref.run.final_states import FinalStates

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        futures = _futures(client, [(Completed, {"data": k}) for k in range(3)]
                           + [(Failed, {"data": ValueError("shard 3 went wrong")}), (_boom, {})])
        ends = FinalStates().outcomes(futures)
        assert ends[4].state is None and ends[4].error is None  # the caller asks its future, which raises:
        with pytest.raises(RuntimeError, match="worker-level failure"):
            futures[4].result()
    assert [e.result for e in ends[:3]] == [0, 1, 2] and all(e.error is None for e in ends[:3])
    assert isinstance(ends[3].error, ValueError) and "shard 3 went wrong" in str(ends[3].error)


def test_finished_shards_are_fetched_a_batch_at_a_time_and_not_again_at_the_end(prefect_harness):
    from distributed import Client, LocalCluster, wait
    from prefect.states import Completed

    from richpref.run.final_states import FinalStates

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        futures = _futures(client, [(Completed, {"data": k}) for k in range(7)])
        wait([f.wrapped_future for f in futures])
        sizes = _gathers(client)
        collected = FinalStates(batch=3)
        for f in futures[:5]:  # seen finished one by one while the pass runs
            collected.add([f])
        assert sizes == [3]  # the first batch; two wait for the next
        ends = collected.outcomes(futures)
    assert [e.result for e in ends] == list(range(7))
    assert sizes == [3, 4]  # at the end, only the four not fetched yet
