"""A run's stages computed in this process, shard after shard, with no Prefect: the same shard runner
(keys, manifests, leases, work log) the curate flow drives, for tests, benchmarks and small runs.

`richpref curate` is the way to run a profile (retries, UI, Dask); this is the plain loop under it.
A shard that raises stops the loop; calling again computes only the shards whose manifests are missing
or stale.
"""
from __future__ import annotations

import json

from richpref.run.leases import Busy
from richpref.run.gpu_claims import release_after_stage
from richpref.run.runner import ShardManifest, content_key, drop_shards_from, run_shard, stage_shards
from richpref.schemas.config import Profile
from richpref.run.run_state import check_same_pipeline, ended
from richpref.run.storage import RunStore


def run_inline(profile: Profile, data_dir: str, run: str, *, until: str | None = None,
               report: bool = True) -> dict[str, dict[int, ShardManifest]]:
    """Compute every stage of `profile`'s pipeline (up to `until`) for `run`; return their manifests."""
    from richpref.tasks import ALL_OUTPUTS, stages_for

    stages = stages_for(profile, until)
    store = RunStore(data_dir, run)
    check_same_pipeline(store, profile)
    store.write_text("profile.json", profile.model_dump_json(indent=2))
    manifests: dict[str, dict[int, ShardManifest]] = {}
    for stage in stages:
        shards = stage_shards(stage, profile, manifests)
        if not stage.reads:
            drop_shards_from(store, list(ALL_OUTPUTS), len(shards))
        done = {}
        for s in shards:
            inputs = {r: manifests[r][s] for r in stage.reads}
            result = run_shard(stage, s, inputs, store, profile, content_key(stage, profile, s, inputs))
            if isinstance(result, Busy):
                raise RuntimeError(f"{stage.name} shard {s} is leased by another live process; run curate to wait for it")
            done[s] = result
        manifests[stage.out] = done
        release_after_stage(stage)
    summary = {"run": run, "profile": profile.name,
               "state": ended([s.name for s in stages], [s.name for s in stages_for(profile)]),
               "stages": {out: {"shards": len(ms), "rows": sum(m.rows for m in ms.values()),
                                "kept": sum(m.kept for m in ms.values())} for out, ms in manifests.items()}}
    store.write_text("run.json", json.dumps(summary, indent=2))
    if report and manifests.get("pairs"):
        from richpref.views.datacard import write_run_report

        write_run_report(data_dir, run)
    return manifests
