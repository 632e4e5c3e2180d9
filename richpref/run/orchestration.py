"""What the curate flow does with Prefect: map a stage's shards over the task runner, wait on shards
other processes hold, report progress and artifacts, and pick the task runner for `--workers`.

Whether a shard is done, and computing it, is the shard runner's (richpref/run/runner.py); this module
only asks it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from richpref.run.early_cluster import WORKER_IMPORTS, EarlyCluster
from richpref.run.gpu_claims import GPU_WORKER_THREADS, gpu_claim
from richpref.run.leases import Busy, lease_seconds
from richpref.run.runner import (ShardManifest, committed_many, drop_shards_from, leased_shards, stage_state,
                                 tidy_done)
from richpref.schemas.config import Profile
from richpref.run.storage import RunStore
from richpref.tasks import ALL_OUTPUTS
from richpref.tasks.base import Stage
from richpref.run.shard_task import TORCH_THREADS_ENV, submit_shard

log = logging.getLogger("richpref")


def dask_runner():
    """The flow's DaskTaskRunner, or None on any other task runner."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or type(ctx.task_runner).__name__ != "DaskTaskRunner":
        return None
    return ctx.task_runner


def _one_accelerator_per_task(stage: Stage, profile: Profile):
    """On a Dask task runner, each shard task of a stage that loads a model claims half the `GPU`
    resource (richpref/run/gpu_claims.py), so a worker started with `resources={"GPU": 1}` holds two
    model shards at once: one computing, the other starting or finishing (a served VLM's: both
    computing). Shards of model-free stages claim none: they run on any worker's free thread.
    Elsewhere: no-op."""
    claim = gpu_claim(stage, profile)
    if not claim or dask_runner() is None:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": claim})


def _gpu_watch(stage: Stage):
    runner = dask_runner() if stage.loads_model else None
    if runner is None:
        return None
    from richpref.run.cluster import GpuWatch

    return GpuWatch(runner.client)


def _wait(fut, watch) -> None:
    """Wait for a shard's task; on a Dask cluster, raise ClusterError once no worker can run it."""
    if watch is None:
        fut.wait()
        return
    from richpref.run.cluster import wait_watched

    while not fut.wrapped_future.done():
        wait_watched([fut.wrapped_future], watch, 2.0)


def preflight(data_dir: str, stages: tuple[Stage, ...]) -> None:
    """Before the first shard on a Dask cluster: every worker's resources, device, versions, and its
    reach of the data dir and the Prefect API (richpref/run/cluster.py). Fails in seconds, naming the worker."""
    runner = dask_runner()
    if runner is None:
        return
    from prefect.settings import get_current_settings

    from richpref.run.cluster import check_cluster, refuse_loopback_api

    api = get_current_settings().api.url
    client = runner.client
    refuse_loopback_api(api, client.scheduler.address)
    check_cluster(client, data_dir, api, need_gpu=any(s.loads_model for s in stages))


# A local worker: one GPU slot, its model shards (one computing, the next starting:
# richpref/run/gpu_claims.py) and a model-free shard each with a thread, no dashboard.
LOCAL_GPU_WORKER = {"threads_per_worker": GPU_WORKER_THREADS, "resources": {"GPU": 1}, "dashboard_address": None}


def configure_local_workers() -> None:
    """Dask's settings for the workers of the local clusters this process starts (its nannies pass
    Dask's config on to them)."""
    import dask

    dask.config.set({
        # Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
        # threshold: every activation buffer is then mapped and unmapped afresh (the edit stage ran
        # 1.4x slower per shard). Leave glibc's own adaptive thresholds to model workers.
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
        # Dask's statistical profiler reads every worker thread's stack each 10 ms for a dashboard
        # that local clusters do not serve: about 6% of a worker's CPU in a run (docs/benchmarks.md).
        "distributed.worker.profile.enabled": False,
    })
    # A cluster started earlier in this process (rounds, tests) left Dask's value in os.environ, which
    # new workers would inherit.
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") == "65536":
        del os.environ["MALLOC_TRIM_THRESHOLD_"]


def task_runner(workers: int = 1, dask_address: str | None = None):
    """The curate flow's task runner: in-process for one worker; a local Dask cluster of `workers`
    processes (one per GPU with dask-cuda on a GPU machine); or the cluster at `dask_address`."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if workers <= 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    import torch

    configure_local_workers()
    if torch.cuda.is_available():
        try:
            import dask_cuda  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("--workers on a GPU machine needs dask-cuda: pip install 'richpref[cuda]'") from exc
        gpus = torch.cuda.device_count()
        if workers > gpus:
            log.warning("--workers %d but %d GPU(s): starting one worker per GPU", workers, gpus)
        # One worker per GPU, each with CUDA_VISIBLE_DEVICES set to its own device first: inside a
        # worker, device "cuda" is that worker's GPU.
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                              cluster_kwargs={**LOCAL_GPU_WORKER, "n_workers": min(workers, gpus)})
    threads = int(os.environ.get(TORCH_THREADS_ENV) or max(1, (os.cpu_count() or 1) // workers))
    # Started by start_cluster_early while the Prefect server starts.
    return DaskTaskRunner(cluster_class=EarlyCluster(preimport=WORKER_IMPORTS).take,
                          cluster_kwargs=local_cpu_cluster_kwargs(workers, {TORCH_THREADS_ENV: str(threads),
                                                                            "OMP_NUM_THREADS": str(threads)}))


def local_cpu_cluster_kwargs(workers: int, env: dict[str, str]) -> dict:
    """A local CPU cluster's arguments (for an `EarlyCluster(preimport=WORKER_IMPORTS)`, whose workers
    are forked from one process that imported the stages and model libraries): `workers` processes
    with `env`, each importing the shard task before its first task."""
    return {**LOCAL_GPU_WORKER, "n_workers": workers, "processes": True, "preload": ["richpref.run.shard_task"],
            "env": env}


def _early(runner) -> EarlyCluster | None:
    early = getattr(getattr(runner, "cluster_class", None), "__self__", None)
    return early if isinstance(early, EarlyCluster) else None


def start_cluster_early(runner, api_url: str) -> None:
    """Start the local cluster of `runner` (a task_runner answer) now, its workers reporting to
    `api_url`; nothing for other runners."""
    if (early := _early(runner)) is not None:
        early.start(api_url, **runner.cluster_kwargs)


def close_early_cluster(runner) -> None:
    """Close the local cluster `start_cluster_early` started, where no flow took and closed it."""
    if (early := _early(runner)) is not None:
        early.close()


# An update of a progress artifact is a round trip to the Prefect API: one per shard held the flow's
# thread 1.5 s over a 256-item run's 88 shards (profiled, docs/benchmarks.md) while the next shard waited.
PROGRESS_EVERY_S = 2.0


class StageProgress:
    """A stage's progress artifact in the Prefect UI: created at once, then updated at most every
    `every_s` seconds, and with the stage's last count at its end."""

    def __init__(self, description: str, total: int, done: int, every_s: float = PROGRESS_EVERY_S,
                 clock=time.monotonic) -> None:
        self.total, self.every_s, self.clock = max(1, total), every_s, clock
        self.shown = done
        self.artifact = create_progress_artifact(self._percent(done), description=description)
        self.at = clock()

    def _percent(self, done: int) -> float:
        return 100.0 * done / self.total

    def report(self, done: int, final: bool = False) -> None:
        if done == self.shown or (not final and self.clock() - self.at < self.every_s):
            return
        update_progress_artifact(self.artifact, self._percent(done))
        self.shown, self.at = done, self.clock()


def _wait_seconds() -> float:
    return min(2.0, max(0.2, lease_seconds() / 10))


def run_stage(stage: Stage, manifests: dict[str, dict[int, ShardManifest]], store: RunStore, data_dir: str,
              run: str, profile: Profile, failed_before: dict[int, str] | None = None
              ) -> tuple[dict[int, ShardManifest], list[str]]:
    """Every shard of a stage whose inputs exist: committed ones as they are, the others computed on
    the task runner. Shards another live process holds are waited for (their holder commits them, or
    dies and this process takes them over). Returns the stage's manifests and its failures.
    `failed_before`: shards that failed in this run's pipelined pass, reported and not run again."""
    count = None if stage.reads else stage.count_shards(profile)
    if count is not None:
        drop_shards_from(store, list(ALL_OUTPUTS), count)
    state = stage_state(stage, profile, store, manifests, source_shards=count)  # the runner says what is done
    shards, inputs, keys, done = sorted(state.keys), state.inputs, state.keys, dict(state.done)
    failed = [f"{stage.name}/part-{s:05d}: {err}" for s, err in sorted((failed_before or {}).items()) if s not in done]
    pending = [s for s in shards if s not in done and s not in (failed_before or {})]
    progress = StageProgress(f"{run}: {stage.name} shards", len(shards), len(done)) if pending else None
    announced = False
    while pending:
        held = leased_shards(store, stage.out, pending)  # one listing per loop, not one per shard
        free = [s for s in pending if s not in held]
        with _one_accelerator_per_task(stage, profile):
            futures = {s: submit_shard(stage, s, inputs[s], data_dir, run, profile, keys[s]) for s in free}
        busy = set(pending) - set(free)
        watch = _gpu_watch(stage)
        for s, fut in sorted(futures.items()):
            _wait(fut, watch)
            try:
                result = fut.result()
            except BaseException as exc:  # noqa: BLE001 - report, do not stop the other shards
                err = fut.state.message if not str(exc) else f"{type(exc).__name__}: {exc}"
                failed.append(f"{stage.name}/part-{s:05d}: {err}")
                log.error("%s shard %05d failed: %s", stage.name, s, err)
                continue
            if isinstance(result, Busy):
                busy.add(s)
            else:
                done[s] = result
            if progress is not None:
                progress.report(len(done))
        pending = sorted(busy)
        if pending:
            if not announced:
                log.info("%s: %d shard(s) are being computed by other processes; waiting for them",
                         stage.name, len(pending))
                announced = True
            time.sleep(_wait_seconds())
            now = committed_many(store, stage.out, {s: keys[s] for s in pending})
            done.update(now)
            pending = [s for s in pending if s not in now]
    if progress is not None:
        progress.report(len(done), final=True)
    tidy_done(store, stage.out, set(done))  # what holders killed while committing left
    return done, failed


def artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:200]


def stage_artifact(run: str, stage: str, manifests: dict[int, ShardManifest], failed: list[str]) -> None:
    rows = [{"shard": m.shard, "rows": m.rows, "kept": m.kept, "rejected": m.rejected, "file": m.uri}
            for m in sorted(manifests.values(), key=lambda m: m.shard)]
    rows += [{"shard": f.split(":", 1)[0], "rows": None, "kept": None, "rejected": None, "file": f} for f in failed]
    create_table_artifact(rows, key=artifact_key(run, stage), description=f"{run}: {stage} shards")


def run_artifact(summary: dict) -> None:
    lines = [f"# richpref run `{summary['run']}` ({summary['state']})", "",
             f"profile `{summary['profile']}` ({summary['profile_hash']}); pairs: `{summary['pairs']}`", "",
             "| stage | shards | rows | kept | rejected |", "|---|---|---|---|---|"]
    for out, st in summary["stages"].items():
        lines.append(f"| {out} | {st['shards']} | {st['rows']} | {st['kept']} | {st['rows'] - st['kept']} |")
    if summary["failed"]:
        lines += ["", "Failed shards:", *(f"- `{f}`" for f in summary["failed"])]
    create_markdown_artifact("\n".join(lines), key=artifact_key(summary["run"], "run"),
                             description=f"richpref curate {summary['run']}")


def failure_message(failures: list[str]) -> str:
    """Failed shards grouped by error, so one missing model reads as one line, not one per shard."""
    by_error: dict[str, list[str]] = {}
    for f in failures:
        where, err = f.split(": ", 1)
        by_error.setdefault(err, []).append(where)
    lines = [f"{', '.join(w)}: {err}" for err, w in by_error.items()]
    return (f"{len(failures)} shard(s) failed; fix the cause and rerun the same command to redo only those:\n  "
            + "\n  ".join(lines))
