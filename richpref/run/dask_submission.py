"""How a Prefect task run travels to a Dask worker: sealed, so that the Dask scheduler does not unpickle
and pickle again what only the worker reads.

Prefect's Dask client (prefect_dask 0.3) submits each task run as a closure made anew per submission,
with the task, its context and its parameters as the call's arguments. Cloudpickle pickles such a
closure by value, scanning every loaded module for submodules it might use; the Dask scheduler, which
runs in the flow's process on a local cluster, then unpickles the whole call to read its dependencies
and pickles it again to send it to a worker. In the schedule bench that was about 4 ms of the flow
process's CPU per shard, and the scheduler's event loop fell seconds behind the submissions: the first
model shard reached its worker 3.7 s after it was submitted, behind the 256 source shards
(docs/benchmarks.md).

Here a sync task run goes as an importable function (`run_sealed`) and one `Sealed` blob: the task,
its run id, context and dependencies, and the parameters that hold no future, pickled once in the
flow's process and opened on the worker. The parameters that hold futures of other task runs stay
outside, where Dask sees them and hands the worker their results, as before. Async tasks, and calls
that are not a task runner's, go to Prefect's own submit.
"""
from __future__ import annotations

import functools
from uuid import uuid4


class Sealed:
    """Bytes that stay bytes until the worker opens them: a Dask scheduler loads and dumps the
    object without reading what it holds."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    @classmethod
    def of(cls, value) -> Sealed:
        from distributed.protocol.pickle import dumps

        return cls(dumps(value))

    def open(self):
        # Dask's own serializer for the calls it delivers (pickle, cloudpickle where pickle cannot):
        # the blob was made by this run's flow process (`of`), as every call Dask delivers is.
        from distributed.protocol.pickle import loads

        return loads(self.blob)


def run_sealed(sealed: Sealed, parameters: dict, wait_for=None):
    """On a Dask worker: the sealed task run, with the parameters Dask resolved (futures -> results)."""
    from prefect.task_engine import run_task_sync

    call = sealed.open()
    return run_task_sync(parameters={**call.pop("parameters"), **parameters}, wait_for=wait_for, **call)


def sealed_submit(submit):
    """Wraps `PrefectDaskClient.submit`: a sync Prefect task as `run_sealed` and its `Sealed` call."""
    from prefect import Task

    @functools.wraps(submit)
    def submit_task(self, func, *args, **kwargs):
        if not isinstance(func, Task) or func.isasync or args or "parameters" not in kwargs:
            if isinstance(func, Task):  # its arguments hold a fresh task run id: a hash names nothing new
                kwargs.setdefault("pure", False)
            return submit(self, func, *args, **kwargs)
        return _submit_sealed(self, func, **kwargs)

    return submit_task


def _submit_sealed(client, task, *, parameters: dict, wait_for=None, dependencies=None, return_type="result",
                   key=None, pure=None, **dask_kwargs):
    from distributed import Client, Future
    from prefect.context import serialize_context
    from prefect.utilities.engine import collect_task_run_inputs_sync

    task_run_id = uuid4()
    inputs = {k: collect_task_run_inputs_sync(v, future_cls=Future) for k, v in parameters.items()}
    with_futures = {k: v for k, v in parameters.items() if inputs[k]}  # what Dask must see to resolve
    if dependencies:
        inputs = {k: v.union(dependencies.get(k, set())) for k, v in inputs.items()}
    context = serialize_context(asset_ctx_kwargs={"task": task, "task_run_id": task_run_id, "task_inputs": inputs,
                                                  "copy_to_child_ctx": True})
    sealed = Sealed.of({"task": task, "task_run_id": task_run_id, "return_type": return_type,
                        "dependencies": inputs, "context": context,
                        "parameters": {k: v for k, v in parameters.items() if k not in with_futures}})
    future = Client.submit(client, run_sealed, sealed, with_futures, wait_for,
                           key=key or f"{task.fn.__name__}-{task_run_id.hex}", pure=False, **dask_kwargs)
    future.task_run_id = task_run_id
    return future

