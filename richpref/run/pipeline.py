"""Curate on a Dask cluster without a stage barrier: every shard of every stage is submitted at once,
each depending only on its own input shards, so a shard of stage k+1 starts as soon as its inputs are
committed instead of when the slowest shard of stage k ends.

A shard's content key follows from its inputs' keys alone (richpref/run/runner.py), so the whole chain is
keyed before anything runs. Earlier stages have a higher Dask priority: a worker takes the next
stage's shards only when no ready shard of the current one is left for it, so it keeps its resident
model while it has work for it (the workers' model loads and swaps are reported at the end).

What this pass leaves undone (a shard another process holds, a failure) the stage-by-stage pass of
richpref/run/orchestration.py finishes; shards that failed here are reported, not computed twice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from richpref.run.gpu_claims import gpu_claim
from richpref.run.leases import Busy
from richpref.run.runner import ShardManifest, content_key, drop_shards_from, is_current, stage_manifests
from richpref.schemas.config import Profile
from richpref.run.storage import RunStore
from richpref.tasks import ALL_OUTPUTS
from richpref.tasks.base import Stage
from richpref.run.shard_task import shard_task

log = logging.getLogger("richpref")


@dataclass(frozen=True)
class Submitted:
    """An input shard submitted in this pass and not yet committed: its key is known."""

    key: str


def _annotations(stage: Stage, priority: int, profile: Profile):
    import dask

    claim = gpu_claim(stage, profile)
    extra = {"resources": {"GPU": claim}} if claim else {}
    return dask.annotate(priority=priority, **extra)


def pipeline_pass(stages: tuple[Stage, ...], store: RunStore, data_dir: str, run: str,
                  profile: Profile) -> dict[str, dict[int, str]]:
    """Submit every shard not committed for its key, chained on its inputs, and wait for them all.
    Returns the shards that failed in this pass ({stage name: {shard: error}}); their downstream
    shards are not failures of their own. Only on a Dask task runner; elsewhere it does nothing."""
    from richpref.run.orchestration import _dask_runner, _gpu_watch, _wait

    if _dask_runner() is None or not stages or stages[0].reads:
        return {}
    first = stages[0].count_shards(profile)
    drop_shards_from(store, list(ALL_OUTPUTS), first)
    refs: dict[str, dict[int, ShardManifest | Submitted]] = {}
    futures: dict[tuple[str, int], object] = {}
    order: list[tuple[Stage, int]] = []
    for idx, stage in enumerate(stages):
        have = stage_manifests(store, stage.out)
        refs[stage.out] = {}
        shards = range(first) if not stage.reads else sorted(set.intersection(*(set(refs[r]) for r in stage.reads)))
        for s in shards:
            inputs = {r: refs[r][s] for r in stage.reads}
            key = content_key(stage, profile, s, inputs)
            m = have.get(s)
            if is_current(m, key):
                refs[stage.out][s] = m
                continue
            params = {r: futures[(r, s)] if isinstance(v, Submitted) else v for r, v in inputs.items()}
            with _annotations(stage, len(stages) - idx, profile):
                futures[(stage.out, s)] = shard_task.submit(stage, s, params, data_dir, run, profile, key)
            refs[stage.out][s] = Submitted(key)
            order.append((stage, s))
    if order:
        log.info("pipelined: %d shard(s) of %d stage(s) submitted at once", len(order), len({st.name for st, _ in order}))
    ok: dict[tuple[str, int], bool] = {}
    failed: dict[str, dict[int, str]] = {}
    watches = {}
    for stage, s in order:
        fut = futures[(stage.out, s)]
        if stage.name not in watches:
            watches[stage.name] = _gpu_watch(stage)
        _wait(fut, watches[stage.name])
        upstream_ok = all(ok.get((r, s), True) for r in stage.reads)
        try:
            result = fut.result()
        except BaseException as exc:  # noqa: BLE001 - report, do not stop the other shards
            ok[(stage.out, s)] = False
            if upstream_ok:  # its own failure, not the echo of an input's
                err = fut.state.message if not str(exc) else f"{type(exc).__name__}: {exc}"
                failed.setdefault(stage.name, {})[s] = err
                log.error("%s shard %05d failed: %s", stage.name, s, err)
            continue
        ok[(stage.out, s)] = not isinstance(result, Busy)
    return failed


def _worker_models() -> dict:
    from richpref.models.runtime import resident

    return {"loads": resident.loads, "swaps": resident.swaps}


def model_swaps() -> dict | None:
    """Model loads and swaps summed over the Dask workers (None on another task runner)."""
    from richpref.run.orchestration import _dask_runner

    runner = _dask_runner()
    if runner is None:
        return None
    per = runner.client.run(_worker_models, on_error="return")
    counts = [c for c in per.values() if isinstance(c, dict)]
    return {"workers": len(counts), "loads": sum(c["loads"] for c in counts), "swaps": sum(c["swaps"] for c in counts)}
