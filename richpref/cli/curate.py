"""`richpref curate`: run the curate flow, or print its plan (--plan)."""
from __future__ import annotations

import argparse
import os
import warnings

from richpref.cli.errors import fail, run_name
from richpref.common.argtypes import at_least


def _prefect_api_for(args: argparse.Namespace) -> dict:
    """Where the Prefect server richpref starts listens (--prefect-host), and the URL workers get."""
    from richpref.run.cluster import reachable_address, refuse_loopback_api

    host = args.prefect_host
    url_host = reachable_address(args.dask_address) if host in ("0.0.0.0", "::") and args.dask_address else None
    configured = os.environ.get("PREFECT_API_URL")
    refuse_loopback_api(configured or f"http://{url_host or host}:4200/api", args.dask_address)
    return {"api_host": host, "api_url_host": url_host}


def _run_finished_before(args: argparse.Namespace) -> bool:
    """Whether the run's last flow recorded what this command computes (run.json: it completed, or
    stopped after the same `--until` stage): a re-run then likely has nothing to compute."""
    try:
        from richpref.run.run_state import covers
        from richpref.run.storage import RunStore

        return covers(RunStore(args.data_dir, args.run).last_run().get("state"), args.until)
    except Exception:  # noqa: BLE001 - a bad run name or data dir: the checks below say why
        return False


def _spawn_server_early(args: argparse.Namespace):
    """The command's own Prefect server, spawned before the heavy imports and checks so that its start
    (seconds) overlaps them; None where a server is configured in the environment, where no flow runs
    (--plan), or where the run finished before (the plan most likely finds nothing to do)."""
    if args.plan or os.environ.get("PREFECT_API_URL") or args.dask_address or _run_finished_before(args):
        return None
    from richpref.ops.prefect_api import spawn_server

    return spawn_server(host=args.prefect_host)


def cmd_curate(args: argparse.Namespace) -> int:
    server = _spawn_server_early(args)
    try:
        return _curate(args, server)
    finally:
        if server is not None:
            server.stop()  # unused (an error, nothing to do) or already stopped by the flow's run


def _curate(args: argparse.Namespace, server) -> int:
    from richpref.doctor.checks import ModelProblem, check_key_inputs, resolve_models
    from richpref.run.cluster import ClusterError
    from richpref.run.plan import finished_and_current, plan_run
    from richpref.run.run_state import check_same_pipeline
    from richpref.run.storage import RunStore
    from richpref.schemas.config import ProfileError, load_profile
    from richpref.schemas.migrate import ProfileMigrationWarning
    from richpref.tasks.source import SourceError, check_source
    from richpref.tasks import stages_for

    try:
        # A bad profile or a missing input file fails here, before Prefect or any model starts.
        profile = load_profile(args.profile, args.set, args.models_root)
        check_source(profile.source)
        if (args.doctor_json or args.no_affinity) and args.workers == 1 and not args.dask_address:
            given = "--doctor-json" if args.doctor_json else "--no-affinity"
            raise ProfileError(f"{given} shapes the plan of Dask workers, and this run has none: add --workers N "
                               "(N > 1) or --dask-address, or leave it out")
        if args.doctor_json:
            from richpref.run.affinity import read_doctor_table

            try:
                read_doctor_table(args.doctor_json)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ProfileError(f"--doctor-json {args.doctor_json}: not a `richpref doctor --json` file ({exc})") from exc
        stages = stages_for(profile, args.until)  # an unknown --until stage: a ProfileError naming the stages
        check_key_inputs(profile, stages)  # a prompt template or tuned weights that are not there
        check_same_pipeline(RunStore(args.data_dir, args.run), profile)  # before the plan: its shards are another's
        plan = None
        if args.plan or not args.force_flow:
            plan = plan_run(profile, args.data_dir, args.run, args.until)
            if args.plan:
                print(plan.format())
                return 0
            if plan.up_to_date and finished_and_current(profile, args.data_dir, args.run, args.until):
                # Nothing the flow would compute: skip starting Prefect (--force-flow runs it anyway).
                store = RunStore(args.data_dir, args.run)
                print(plan.format().splitlines()[0])
                return _outcome(args, store.last_run().get("state", ""), store.uri(store.stage_dir("pairs")),
                                store.uri(store.root))
        if not args.dask_address:
            # On this machine (no remote workers, whose models may live elsewhere): every model of the
            # stages with shards to compute resolves before Prefect starts (a wrong --models-root failed
            # every shard of the first model stage instead).
            resolve_models(profile, None if plan is None else plan.stages_with_work())
        from richpref.ops.entrypoints import CURATE, load_flow, run_flow
        from richpref.run.orchestration import close_early_cluster, start_cluster_early, task_runner
        from richpref.run.runner import CurateFailed

        flow_fn, runner = load_flow(CURATE), None
        if args.workers > 1 or args.dask_address:
            runner = task_runner(args.workers, args.dask_address)
            flow_fn = flow_fn.with_options(task_runner=runner)
        api = _prefect_api_for(args)  # refuses a loopback API with a remote scheduler before anything starts
        if args.dask_address:
            from richpref.run.cluster import check_scheduler

            check_scheduler(args.dask_address)  # a scheduler nothing answers: seconds, not Dask's 30 s in the flow

        def while_server_starts(url: str) -> None:
            start_cluster_early(runner, url)  # a local Dask cluster starts while the Prefect server does
            if runner is None and plan is not None:  # on this process's task runner: its first model loads meanwhile
                _load_first_model_ahead(stages, plan, profile, args)

        try:
            with warnings.catch_warnings():  # the flow loads the profile again: its migration was shown above
                warnings.simplefilter("ignore", ProfileMigrationWarning)
                result = run_flow(flow_fn, **api, profile=args.profile, run=args.run, data_dir=args.data_dir, overrides=args.set,
                                  models_root=args.models_root, **({"until": args.until} if args.until else {}),
                                  **({"doctor_json": args.doctor_json} if args.doctor_json else {}),
                                  **({"affinity": False} if args.no_affinity else {}),
                                  check_models=False,  # resolved above, from the plan this command made
                                  spawned_server=server, while_server_starts=while_server_starts)
        except CurateFailed as exc:
            return fail(exc, 1)
        finally:
            close_early_cluster(runner)
    except (ProfileError, SourceError, ClusterError, ModelProblem) as exc:
        return fail(exc)
    return _outcome(args, result["state"], result["pairs"], result["run_dir"])


def _load_first_model_ahead(stages, plan, profile, args: argparse.Namespace) -> None:
    from richpref.run.load_ahead import load_ahead, stage_to_load
    from richpref.run.storage import RunStore

    stage = stage_to_load(stages, plan.stages, profile)
    if stage is not None:
        load_ahead(stage, profile, RunStore(args.data_dir, args.run))


def _outcome(args: argparse.Namespace, state: str, pairs: str, run_dir: str) -> int:
    """What a curate that ended in `state` prints: where its pairs are (or how to go on after
    `--until`), the run folder and the run's summary."""
    from richpref.run.run_state import STOPPED_AFTER
    from richpref.views.inspect import format_summary, summary

    if state.startswith(STOPPED_AFTER):
        print(f"\n{state} (--until); run the same command without --until to continue")
    else:
        print(f"\npairs (Pick-a-Pic format): {pairs}")
    print(f"run folder: {run_dir}")
    print(format_summary(summary(args.data_dir, args.run)))
    return 0


def register(sub) -> None:
    c = sub.add_parser("curate", help="run the curate flow (ephemeral Prefect unless PREFECT_API_URL is set)")
    c.add_argument("--profile", default="tiny", help="profile name in configs/ or a YAML path")
    c.add_argument("--run", default="demo", type=run_name, help="run name: outputs go to <data-dir>/runs/<run>/")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value, e.g. --set edit.strength=0.6 (repeatable)")
    c.add_argument("--models-root", default=None, help="directory relative model references resolve against")
    where = c.add_mutually_exclusive_group()  # a local cluster of N workers, or a cluster started elsewhere
    where.add_argument("--workers", "--dask-workers", dest="workers", type=at_least(1), default=1,
                       help="spread each stage's shards over a local Dask cluster of N worker processes (one per "
                            "GPU with dask-cuda on a GPU machine; see docs/operations.md)")
    where.add_argument("--dask-address", default=None, metavar="tcp://HOST:8786",
                       help="run the shards on an existing Dask cluster (GPU workers started with --resources GPU=1)")
    c.add_argument("--doctor-json", default=None, metavar="PATH",
                   help="on Dask, weigh the plan of which GPU worker runs which stage with this `richpref doctor --json` "
                        "file (seconds per item and model load seconds per stage; default: a built-in table)")
    c.add_argument("--no-affinity", action="store_true",
                   help="on Dask, no live model affinity: every shard submitted at once, each where its input "
                        "is, earlier stages first")
    c.add_argument("--prefect-host", default=os.environ.get("PREFECT_SERVER_API_HOST", "127.0.0.1"), metavar="HOST",
                   help="address the Prefect server this command starts listens on (no PREFECT_API_URL set): an "
                        "address the Dask workers reach, or 0.0.0.0 (default 127.0.0.1, this machine only)")
    c.add_argument("--plan", action="store_true",
                   help="print which shards each stage would compute (done / todo / blocked on a todo input) and exit")
    c.add_argument("--until", metavar="STAGE", default=None,
                   help="stop after STAGE, a stage of the profile's pipeline (e.g. instruct, to read the instructions "
                        "before paying for edits; --plan lists them) or the table it writes (status lists them); a "
                        "later run without it continues from there")
    c.add_argument("--force-flow", action="store_true",
                   help="start the flow even when the run is finished and up to date (it then computes nothing)")
    c.set_defaults(fn=cmd_curate)
