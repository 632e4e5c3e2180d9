"""A local Dask cluster that starts while the command's Prefect server does.

Prefect's DaskTaskRunner makes its local cluster when the flow starts, that is after the Prefect
server the command spawned answers (about 10 s on a fresh Prefect home, 3.6 s on one with its
database), and each worker then imports torch, transformers and Prefect before its first shard. An
`EarlyCluster` is the runner's cluster class instead: `start(api_url)` makes the cluster in a thread
as soon as the server is spawned, its workers importing the shard task meanwhile (a Dask preload);
the runner takes that cluster when the flow starts (`take`) and closes it as it closes its own.
`close()` closes one that no flow took (the server did not start, the command failed first).

With `preimport`, its workers are forked from one process that imported those modules (a Python
forkserver) instead of each starting afresh and importing them: every worker of a local cluster
imports torch, transformers and diffusers before its first model, about 6 CPU s each on this
project's CPU machine, and the workers of a local cluster share that machine's cores.
"""
from __future__ import annotations

import contextlib
import threading

from richpref.models.libraries import MODEL_LIBRARIES

# What a local CPU cluster's workers import before their models: richpref's stages, torch and the
# model libraries their loaders import (lazily, in each worker that loads a model) and pandas.
WORKER_IMPORTS = ("richpref.tasks", "torch", *MODEL_LIBRARIES, "pandas")


@contextlib.contextmanager
def workers_forked_after(modules: tuple[str, ...]):
    """While a cluster starts: its worker processes are forked from a forkserver that imported
    `modules` once. The forkserver starts with the first worker and serves this process's later
    clusters too; it ends with this process. A worker the nanny restarts later is spawned afresh."""
    import dask
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        # After Dask's own list: replaces it. The last one makes the forkserver's own exit quick.
        get_mp_context().set_forkserver_preload(["distributed", *modules, "richpref.run.forkserver_exit"])
        yield


def _stop_forkserver() -> None:
    """End this process's forkserver and wait for it. It reaped the workers it forked, so their CPU
    then counts in this process's children's (wait4, `time`), and nothing outlives the command. CPython's
    own stop (private, used by its tests); a later cluster starts a new forkserver."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()


class EarlyCluster:
    def __init__(self, cluster_class=None, preimport: tuple[str, ...] = ()):
        self._cluster_class = cluster_class
        self._preimport = tuple(preimport)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cluster = None
        self._error: BaseException | None = None

    # Prefect sends the flow, its task runner and so this object with every task it submits: a copy
    # carries only the cluster class (a worker never starts a cluster from it).
    def __getstate__(self) -> dict:
        return {"cluster_class": self._cluster_class, "preimport": self._preimport}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cluster_class"], state.get("preimport", ()))

    def _make(self, kwargs: dict) -> None:
        try:
            if self._cluster_class is None:
                from distributed import LocalCluster

                self._cluster_class = LocalCluster
            with workers_forked_after(self._preimport) if self._preimport else contextlib.nullcontext():
                self._cluster = self._cluster_class(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - raised where the runner takes the cluster
            self._error = exc

    def start(self, api_url: str | None = None, **kwargs) -> None:
        """Make the cluster in a thread (once): `kwargs` are the cluster class's, the workers' environment
        gets PREFECT_API_URL = `api_url` (it is not in this process's environment yet)."""
        if api_url:
            kwargs = {**kwargs, "env": {**(kwargs.get("env") or {}), "PREFECT_API_URL": api_url}}
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._make, args=(kwargs,), name="richpref-early-cluster",
                                                daemon=True)
                self._thread.start()

    def take(self, **kwargs):
        """The cluster (the runner's cluster class): the one started early, else one made now."""
        self.start(**kwargs)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._cluster

    def close(self) -> None:
        """Close the cluster if one was started (idempotent: the runner may have closed it)."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        thread.join()
        if self._cluster is not None:
            self._cluster.close()
        if self._preimport:
            _stop_forkserver()
