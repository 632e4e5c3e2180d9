"""The curate flow: source, then every stage in order, each mapped over the run's shards.

Each shard task is cached on (stage, code version, effective stage config, input shard contents,
output location); never on the flow run, so a new run of the same run name reuses finished shards.
A failed shard does not stop the other shards; the flow fails at the end, naming the failed ones.
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from richpref.models.runtime import resident
from richpref.schemas.config import Profile, load_profile, profile_hash
from richpref.storage import RunStore, ShardManifest
from richpref.tasks import OUTPUTS, PIPELINE
from richpref.tasks import source as source_stage
from richpref.tasks.base import Stage
from richpref.tasks.wrappers import _location_key, _shard_cache_key, drop_shards_past, serialized_policy, stage_shard

log = logging.getLogger("richpref")


class CurateFailed(RuntimeError):
    pass


def _run_storage(store: RunStore) -> Path | None:
    """Prefect results (the cache records) live with the run, so a run's cache travels with its data."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(store.fs, LocalFileSystem):
        path = Path(store.root) / "_prefect"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return None  # remote data: use the Prefect profile's result storage (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK)


def _drop_record(storage: Path | None, key: str) -> None:
    if storage is not None:
        (storage / key).unlink(missing_ok=True)


def _one_accelerator_per_task():
    """On a Dask task runner, each shard task claims one `GPU` resource, so a worker started with
    `resources={"GPU": 1}` runs one model-heavy shard at a time. Elsewhere: no-op."""
    import contextlib

    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or type(ctx.task_runner).__name__ != "DaskTaskRunner":
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def on_dask(n_workers: int):
    """The curate flow on a local Dask cluster of `n_workers` processes, one `GPU` resource each."""
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                            "resources": {"GPU": 1}, "dashboard_address": None})
    return curate.with_options(task_runner=runner)


def run_stage(stage: Stage, manifests: dict[str, dict[int, ShardManifest]], store: RunStore, data_dir: str,
              run: str, profile: Profile, storage) -> tuple[dict[int, ShardManifest], list[str]]:
    """Map one stage over every shard whose inputs exist; return its manifests and failures."""
    if stage.reads:
        shards = sorted(set.intersection(*(set(manifests[r]) for r in stage.reads)))
    else:  # the source: its shards are counted from the data (row counts, offset, limit)
        shards = list(range(stage.count_shards(profile)))
    keys = {s: stage.content_key(profile, {r: manifests[r][s] for r in stage.reads}, s) for s in shards}
    # A cache record is only trusted while its shard is on disk: drop the records of missing shards
    # (or, where records live elsewhere, overwrite them) so those shards are computed again.
    stale = {s for s in shards if not store.is_committed(stage.out, s, keys[s])}
    for s in stale:
        _drop_record(storage, _location_key(store, stage.out, s, keys[s]))
    futures = {}
    base = stage_shard.with_options(result_storage=storage) if storage else stage_shard
    policy = serialized_policy(store, _shard_cache_key)
    if policy is not None:
        base = base.with_options(cache_policy=policy)
    with _one_accelerator_per_task():
        for s in shards:
            t = base.with_options(refresh_cache=True) if s in stale and storage is None else base
            futures[s] = t.submit(stage, s, {r: manifests[r][s] for r in stage.reads}, data_dir, run, profile, keys[s])
    done, failed = {}, []
    progress = create_progress_artifact(0.0, description=f"{run}: {stage.name} shards")
    for n, (s, fut) in enumerate(sorted(futures.items()), start=1):
        fut.wait()
        if progress is not None:
            update_progress_artifact(progress, 100.0 * n / len(futures))
        state = fut.state
        if state.is_completed():
            done[s] = fut.result()
        else:
            try:
                fut.result()
                err = state.message or state.name
            except BaseException as exc:  # noqa: BLE001 - report, do not stop the other shards
                err = f"{type(exc).__name__}: {exc}"
            failed.append(f"{stage.name}/part-{s:05d}: {err}")
            log.error("%s shard %05d failed: %s", stage.name, s, err)
    return done, failed


def _artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:200]


def _stage_artifact(run: str, stage: str, manifests: dict[int, ShardManifest], failed: list[str]) -> None:
    rows = [{"shard": m.shard, "rows": m.rows, "kept": m.kept, "rejected": m.rejected, "file": m.uri}
            for m in sorted(manifests.values(), key=lambda m: m.shard)]
    rows += [{"shard": f.split(":", 1)[0], "rows": None, "kept": None, "rejected": None, "file": f} for f in failed]
    create_table_artifact(rows, key=_artifact_key(run, stage), description=f"{run}: {stage} shards")


def _run_artifact(summary: dict) -> None:
    lines = [f"# richpref run `{summary['run']}` ({summary['state']})", "",
             f"profile `{summary['profile']}` ({summary['profile_hash']}); pairs: `{summary['pairs']}`", "",
             "| stage | shards | rows | kept | rejected |", "|---|---|---|---|---|"]
    for out, st in summary["stages"].items():
        lines.append(f"| {out} | {st['shards']} | {st['rows']} | {st['kept']} | {st['rows'] - st['kept']} |")
    if summary["failed"]:
        lines += ["", "Failed shards:", *(f"- `{f}`" for f in summary["failed"])]
    create_markdown_artifact("\n".join(lines), key=_artifact_key(summary["run"], "run"),
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


@flow(name="curate", task_runner=ThreadPoolTaskRunner(max_workers=1))
def curate(profile: str = "tiny", run: str = "demo", data_dir: str = "data", overrides: list[str] | None = None,
           models_root: str | None = None, finetune_deployment: str | None = None, until: str | None = None) -> dict:
    """Curate preference pairs for `run` with `profile`; returns per-stage counts and the pairs location.
    `until` names the last stage to run (a later run without it continues from there)."""
    prof = load_profile(profile, overrides, models_root)
    store = RunStore(data_dir, run)
    storage = _run_storage(store)
    store.write_text("profile.json", prof.model_dump_json(indent=2))
    store.write_text("run.json", json.dumps({"run": run, "profile": prof.name, "state": "running", "failed": []}))

    manifests: dict[str, dict[int, ShardManifest]] = {}
    failures: list[str] = []
    for stage in (source_stage.STAGE, *PIPELINE):
        manifests[stage.out], failed = run_stage(stage, manifests, store, data_dir, run, prof, storage)
        failures += failed
        if not stage.reads:  # a smaller source than last time: shards past its end leave the run
            drop_shards_past(store, OUTPUTS, stage.count_shards(prof))
        resident.release()  # one big model at a time: free this stage's before the next loads
        _stage_artifact(run, stage.name, manifests[stage.out], failed)
        if stage.name == until:
            break

    summary = {
        "run": run,
        "state": "failed" if failures else "completed" if until in (None, "export") else f"stopped after {until}",
        "profile": prof.name,
        "profile_hash": profile_hash(prof),
        "run_dir": store.uri(store.root),
        "pairs": store.uri(store.stage_dir("pairs")),
        "stages": {
            out: {"shards": len(ms), "rows": sum(m.rows for m in ms.values()), "kept": sum(m.kept for m in ms.values())}
            for out, ms in manifests.items()
        },
        "failed": failures,
        "manifests": {out: [m.to_dict() for m in ms.values()] for out, ms in manifests.items()},
    }
    if manifests.get("pairs"):
        from richpref.datacard import write_run_report

        summary["report"] = write_run_report(data_dir, run)  # pairs/README.md dataset card + plots/*.png
    store.write_text("run.json", json.dumps(summary, indent=2))
    _run_artifact(summary)
    if failures:
        raise CurateFailed(failure_message(failures))
    if finetune_deployment:  # e.g. "finetune/tiny": launched once per pairs content (flows/launch.py)
        from richpref.flows.launch import launch_finetune

        summary["finetune_flow_run"] = launch_finetune(summary, finetune_deployment)
    return summary
