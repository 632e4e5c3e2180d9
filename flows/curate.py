"""The curate flow: every stage in order (the source first), each mapped over the run's shards.

Thin on purpose: the shard runner (richpref/run/runner.py) decides whether a shard is done and computes
it; richpref/run/orchestration.py maps a stage over the task runner. A failed shard does not stop the
other shards; the flow fails at the end, naming the failed ones. Several processes may run this flow
on the same run at once: they share its shards through leases.
"""
from __future__ import annotations

import json

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from richpref.models.runtime import freeze_at_exit
from richpref.doctor.checks import check_key_inputs, resolve_models
from richpref.run.orchestration import dask_runner, failure_message, preflight, run_artifact, run_stage, stage_artifact
from richpref.run.plan import plan_run
from richpref.run.affinity import stage_costs
from richpref.run.gpu_claims import release_after_stage
from richpref.run.pipeline import model_swaps, models_used, pipeline_pass
from richpref.run.run_state import check_same_pipeline, ended
from richpref.run.runner import CurateFailed, ShardManifest
from richpref.schemas.config import load_profile, profile_hash
from richpref.run.storage import RunStore
from richpref.tasks import stages_for


@flow(name="curate", task_runner=ThreadPoolTaskRunner(max_workers=1))
def curate(profile: str = "tiny", run: str = "demo", data_dir: str = "data", overrides: list[str] | None = None,
           models_root: str | None = None, finetune_deployment: str | None = None, until: str | None = None,
           doctor_json: str | None = None, affinity: bool = True, check_models: bool = True) -> dict:
    """Curate preference pairs for `run` with `profile`; returns per-stage counts and the pairs location.
    `until` names the last stage to run (a later run without it continues from there). On Dask, the
    model shards follow an affinity plan weighted by `doctor_json` (a `richpref doctor --json` file;
    default: the built-in table), unless `affinity` is False. `check_models` False: the caller resolved
    the models of the stages with work already (`richpref curate` does, before Prefect starts)."""
    freeze_at_exit()  # the process of a Dask run's flow loads no model, and holds all the imports too
    prof = load_profile(profile, overrides, models_root)
    store = RunStore(data_dir, run)
    check_same_pipeline(store, prof)  # a run of another pipeline: its shards are not this one's to replace
    store.write_text("profile.json", prof.model_dump_json(indent=2))
    store.write_text("run.json", json.dumps({"run": run, "profile": prof.name, "state": "running", "failed": []}))

    stages = stages_for(prof, until)
    # What `richpref curate` checks before Prefect starts, for the runs it did not start (deployments):
    # a prompt template or tuned weights that are not there, and, with this machine's models, a model
    # of a stage with work; now, not when that stage is reached after the ones before it.
    check_key_inputs(prof, stages)
    if check_models and dask_runner() is None:  # the plan reads every manifest: the command, having planned, skips it
        resolve_models(prof, plan_run(prof, data_dir, run, until).stages_with_work())
    preflight(data_dir, stages)  # on a Dask cluster: every worker can take part, or fail now naming it
    costs, table = stage_costs(doctor_json) if affinity else (None, None)
    models_before = model_swaps()
    passed = pipeline_pass(stages, store, data_dir, run, prof, costs)  # on Dask: no stage barrier
    failed_before = passed.failed
    manifests: dict[str, dict[int, ShardManifest]] = {}
    failures: list[str] = []
    for stage in stages:
        manifests[stage.out], failed = run_stage(stage, manifests, store, data_dir, run, prof,
                                                 failed_before.get(stage.name))
        failures += failed
        release_after_stage(stage)  # one big model at a time (a model-free stage keeps one loaded ahead)
        stage_artifact(run, stage.name, manifests[stage.out], failed)

    summary = {
        "run": run,
        "state": "failed" if failures else ended([s.name for s in stages], [s.name for s in stages_for(prof)]),
        "profile": prof.name,
        "profile_hash": profile_hash(prof),
        "run_dir": store.uri(store.root),
        "pairs": store.uri(store.stage_dir("pairs")),
        "stages": {
            out: {"shards": len(ms), "rows": sum(m.rows for m in ms.values()), "kept": sum(m.kept for m in ms.values())}
            for out, ms in manifests.items()
        },
        "failed": failures,
        "models": models_used(models_before),  # Dask workers' model loads and swaps in this run (None in-process)
        "schedule": {"table": table, "plan": passed.plan},  # the table, its simulated plan, the dispatch
        "manifests": {out: [m.to_dict() for m in ms.values()] for out, ms in manifests.items()},
    }
    if manifests.get("pairs"):
        from richpref.views.datacard import write_run_report

        summary["report"] = write_run_report(data_dir, run)  # pairs/README.md dataset card + pairs/plots/*.png
    store.write_text("run.json", json.dumps(summary, indent=2))
    run_artifact(summary)
    if failures:
        raise CurateFailed(failure_message(failures))
    if finetune_deployment:  # e.g. "finetune/tiny": launched once per pairs content
        from flows.launch import launch_finetune

        summary["finetune_flow_run"] = launch_finetune(summary, finetune_deployment)
    return summary
