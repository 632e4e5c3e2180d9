"""`richpref` command line: curate, models build-tiny, inspect, summary, export."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _local_prefect_home() -> str:
    """Prefect's local state for a data dir on an object store: the user's cache folder."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "richpref" / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    return str(home)


def _quiet_defaults(data_dir: str) -> None:
    """Offline-friendly defaults, set before prefect/transformers are imported; the user's env wins."""
    defaults = {
        "PREFECT_HOME": str(Path(data_dir).resolve() / ".prefect") if "://" not in data_dir else _local_prefect_home(),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "richpref",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    if "://" not in data_dir:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    else:  # fail in seconds, naming the data dir and the fix, not after models have loaded
        from richpref.common.objstore import check_reachable

        check_reachable(data_dir)


def _prefect_api_for(args: argparse.Namespace) -> dict:
    """Where the Prefect server richpref starts listens (--prefect-host), and the URL workers get."""
    from richpref.run.cluster import reachable_address, refuse_loopback_api

    host = args.prefect_host
    url_host = reachable_address(args.dask_address) if host in ("0.0.0.0", "::") and args.dask_address else None
    configured = os.environ.get("PREFECT_API_URL")
    refuse_loopback_api(configured or f"http://{url_host or host}:4200/api", args.dask_address)
    return {"api_host": host, "api_url_host": url_host}


def cmd_curate(args: argparse.Namespace) -> int:
    from richpref.run.cluster import ClusterError
    from richpref.views.inspect import format_summary, summary
    from richpref.run.plan import finished_and_current, plan_run
    from richpref.schemas.config import ProfileError, load_profile
    from richpref.tasks.source import SourceError, check_source

    try:
        # A bad profile or a missing input file fails here, before Prefect or any model starts.
        profile = load_profile(args.profile, args.set, args.models_root)
        check_source(profile.source)
        if args.plan or not args.force_flow:
            plan = plan_run(profile, args.data_dir, args.run)
            if args.plan:
                print(plan.format())
                return 0
            if plan.up_to_date and finished_and_current(profile, args.data_dir, args.run):
                # Nothing the flow would compute: skip starting Prefect (--force-flow runs it anyway).
                from richpref.run.storage import RunStore

                store = RunStore(args.data_dir, args.run)
                print(plan.format().splitlines()[0])
                print(f"\npairs (Pick-a-Pic format): {store.uri(store.stage_dir('pairs'))}")
                print(f"run folder: {store.uri(store.root)}")
                print(format_summary(summary(args.data_dir, args.run)))
                return 0
        from richpref.ops.entrypoints import CURATE, load_flow, run_flow
        from richpref.run.orchestration import task_runner
        from richpref.run.runner import CurateFailed

        flow_fn = load_flow(CURATE)
        if args.workers > 1 or args.dask_address:
            flow_fn = flow_fn.with_options(task_runner=task_runner(args.workers, args.dask_address))
        api = _prefect_api_for(args)  # refuses a loopback API with a remote scheduler before anything starts
        try:
            result = run_flow(flow_fn, **api, profile=args.profile, run=args.run, data_dir=args.data_dir, overrides=args.set,
                              models_root=args.models_root, **({"until": args.until} if args.until else {}))
        except CurateFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    except (ProfileError, SourceError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result["state"].startswith("stopped"):
        print(f"\n{result['state']} (--until); run the same command without --until to continue")
    else:
        print(f"\npairs (Pick-a-Pic format): {result['pairs']}")
    print(f"run folder: {result['run_dir']}")
    print(format_summary(summary(args.data_dir, args.run)))
    return 0


def cmd_build_tiny(args: argparse.Namespace) -> int:
    import logging

    from richpref.models.tiny import build_tiny_models

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = build_tiny_models(args.dir, seed=args.seed, force=args.force)
    print(json.dumps(paths, indent=2))
    return 0


def cmd_convert_llava_critic(args: argparse.Namespace) -> int:
    import logging

    from richpref.models.convert_llava_critic import ConversionError, convert_llava_critic

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = convert_llava_critic(args.src, args.dst, dtype=args.dtype, vision_heads=args.vision_heads,
                                      vision_layers=args.vision_layers)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {report.tensors_mapped} tensors into {report.dst} (dropped {len(report.tensors_dropped)}); "
          f"point critique.model at it")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.finetune:  # a finetune config: memory estimate from the checkpoint's headers
        from richpref.models.runtime import ModelNotAvailable
        from richpref.schemas.config import ProfileError
        from richpref.schemas.training import load_finetune_config
        from richpref.training.memory import estimate_memory, format_estimate

        try:
            cfg = load_finetune_config(args.finetune, args.set, args.models_root)
            print(format_estimate(cfg, estimate_memory(cfg, args.workers), args.workers))
        except (ProfileError, ModelNotAvailable, ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    from richpref.doctor.measure import format_report, run_doctor, write_json
    from richpref.doctor.checks import DoctorError
    from richpref.schemas.config import ProfileError, load_profile

    # cutout follows cutout.device / cutout.providers: its CUDA needs the onnxruntime-gpu build.
    model_sections = ("sample", "critique", "instruct", "edit", "filter", "relabel")
    overrides = [f"{s}.{k}={v}" for k, v in (("device", args.device), ("dtype", args.dtype)) if v for s in model_sections]
    try:
        profile = load_profile(args.profile, overrides + args.set, args.models_root)
        report = run_doctor(profile, items=args.items, project_items=args.project_items, workers=args.workers,
                            progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DoctorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(format_report(report))
    if args.json:
        print(f"table written to {write_json(report, args.json)}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from richpref.views.inspect import format_summary, summary

    s = summary(args.data_dir, args.run)
    print(json.dumps(s, indent=2, default=str) if args.json else format_summary(s))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from richpref.views.inspect import format_status, status

    st = status(args.data_dir, args.run)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from richpref.views.report import write_report

    print(write_report(args.data_dir, args.run, args.out))
    return 0


def cmd_relabel_dataset(args: argparse.Namespace) -> int:
    from richpref.schemas.config import ProfileError, load_profile
    from richpref.recipes.relabel_dataset import DatasetError, relabel_dataset

    try:
        prof = load_profile(args.profile, args.set, args.models_root)
        result = relabel_dataset(args.src, args.out_dir, prof, reward=args.reward, drop_near_ties=args.drop_near_ties)
    except (ProfileError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("rows", "kept", "rejected", "agreement_with_source_label", "report")}, indent=2))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from richpref.views.datacard import push_to_hub, write_run_report
    from richpref.run.storage import RunStore

    written = write_run_report(args.data_dir, args.run)
    print(json.dumps(written, indent=2))
    if args.push_to_hub:
        store = RunStore(args.data_dir, args.run)
        print(push_to_hub(store.uri(store.stage_dir("pairs")), args.push_to_hub, private=not args.public))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from richpref.ops.serve import serve_forever

    return serve_forever(data_dir=args.data_dir, host=args.host, port=args.port, worker_pool=args.pool or None,
                         verbose=args.verbose)


def cmd_inspect(args: argparse.Namespace) -> int:
    from richpref.views.inspect import connect

    con, views = connect(args.data_dir, args.run)
    if args.command:
        print(con.sql(args.command))
        return 0
    print(f"views: {', '.join(views)} (joined on item_id). End a statement with ';', quit with .quit or Ctrl-D.")
    buf = ""
    while True:
        try:
            line = input("richpref> " if not buf else "   ...> ")
        except EOFError:
            print()
            return 0
        if line.strip() in (".quit", ".exit", "\\q"):
            return 0
        buf += line + "\n"
        if buf.strip().endswith(";"):
            try:
                print(con.sql(buf))
            except Exception as exc:  # noqa: BLE001 - an interactive shell reports and goes on
                print(f"error: {exc}")
            buf = ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="richpref", description=__doc__)
    p.add_argument("--data-dir", default=os.environ.get("RICHPREF_DATA_DIR", "data"),
                   help="where runs live (local dir or fsspec URL); default ./data")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("curate", help="run the curate flow (ephemeral Prefect unless PREFECT_API_URL is set)")
    c.add_argument("--profile", default="tiny", help="profile name in configs/ or a YAML path")
    c.add_argument("--run", default="demo", help="run name: outputs go to <data-dir>/runs/<run>/")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value, e.g. --set edit.strength=0.6 (repeatable)")
    c.add_argument("--models-root", default=None, help="directory relative model references resolve against")
    c.add_argument("--workers", "--dask-workers", dest="workers", type=int, default=1,
                   help="spread each stage's shards over a local Dask cluster of N worker processes (one per GPU "
                        "with dask-cuda on a GPU machine; see docs/operations.md)")
    c.add_argument("--dask-address", default=None, metavar="tcp://HOST:8786",
                   help="run the shards on an existing Dask cluster (GPU workers started with --resources GPU=1)")
    c.add_argument("--prefect-host", default=os.environ.get("PREFECT_SERVER_API_HOST", "127.0.0.1"), metavar="HOST",
                   help="address the Prefect server this command starts listens on (no PREFECT_API_URL set): an "
                        "address the Dask workers reach, or 0.0.0.0 (default 127.0.0.1, this machine only)")
    c.add_argument("--plan", action="store_true",
                   help="print which shards each stage would compute (done / todo / blocked on a todo input) and exit")
    c.add_argument("--until", metavar="STAGE", default=None,
                   choices=["source", "sample", "critique", "instruct", "edit", "cutout", "check", "filter", "score",
                            "relabel", "export", "samples", "rewards", "ranked", "rebuild_export"],
                   help="stop after STAGE (e.g. instruct, to read the instructions before paying for edits); "
                        "a later run without it continues from there")
    c.add_argument("--force-flow", action="store_true",
                   help="start the flow even when the run is finished and up to date (it then computes nothing)")
    c.set_defaults(fn=cmd_curate)

    m = sub.add_parser("models", help="model utilities")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    b = msub.add_parser("build-tiny", help="build the tiny random-weight models into DIR")
    b.add_argument("dir", nargs="?", default="data/models/tiny")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is there")
    b.set_defaults(fn=cmd_build_tiny)
    cv = msub.add_parser("convert-llava-critic",
                         help="convert a LLaVA-NeXT native llava_qwen checkpoint (lmms-lab/llava-critic-7b) "
                              "to transformers' LLaVA-OneVision layout")
    cv.add_argument("src", help="directory of the native checkpoint")
    cv.add_argument("dst", help="new directory for the transformers model + processor")
    cv.add_argument("--dtype", default="keep", choices=["keep", "float32", "float16", "bfloat16"])
    cv.add_argument("--vision-heads", type=int, default=None, help="SigLIP attention heads, for towers not built in")
    cv.add_argument("--vision-layers", type=int, default=None,
                    help="SigLIP layers to keep (default: tower depth - 1, as LLaVA-NeXT)")
    cv.set_defaults(fn=cmd_convert_llava_critic)

    d = sub.add_parser("doctor", help="load every model of a profile, run a few items through every stage and "
                                      "project the cost of a full run")
    d.add_argument("--profile", default="tiny", help="profile name in configs/ or a YAML path")
    d.add_argument("--items", type=int, default=8, help="source items to run through every stage (default 8)")
    d.add_argument("--project-items", type=int, default=100_000, help="items to project the run's cost to")
    d.add_argument("--workers", type=int, default=1, help="workers (GPUs) the projected run spreads over")
    d.add_argument("--json", metavar="PATH", default=None, help="also write the table as JSON")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value, e.g. --set sample.dtype=float16 (repeatable)")
    d.add_argument("--models-root", default=None, help="directory relative model references resolve against")
    d.add_argument("--device", default=None, help="run every model stage on this device (e.g. cuda); --set wins")
    d.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="load every model stage's weights in this dtype; --set wins")
    d.add_argument("--finetune", metavar="CONFIG", default=None,
                   help="instead: estimate the memory of a finetune config (precision, LoRA, FSDP over --workers)")
    d.set_defaults(fn=cmd_doctor)

    s = sub.add_parser("summary", help="rows per stage, rejects by reason, flip rate")
    s.add_argument("run")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_summary)

    st = sub.add_parser("status", help="per stage: shards done / missing / failed")
    st.add_argument("run")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("report", help="write a static HTML page of RUN's pairs (thumbnails, texts, scores)")
    r.add_argument("run")
    r.add_argument("--out", help="file to write (default <run>/report.html)")
    r.set_defaults(fn=cmd_report)

    rd = sub.add_parser("relabel-dataset", help="rescore a Pick-a-Pic-format Parquet dataset's jpg_0/jpg_1 and rewrite label_0")
    rd.add_argument("src", help="Parquet file(s): a path, glob or fsspec URL (quote globs)")
    rd.add_argument("out_dir", help="folder for the relabelled part-*.parquet, README.md and plots")
    rd.add_argument("--profile", default="tiny", help="profile whose relabel.rewards score the images")
    rd.add_argument("--reward", default=None, help="use only this reward of the profile (e.g. imagereward)")
    rd.add_argument("--drop-near-ties", action="store_true",
                    help="also drop pairs whose margin is <= relabel.min_margin (default: the label follows the "
                         "reward's order; only pairs without one are dropped)")
    rd.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a profile value")
    rd.add_argument("--models-root", default=None, help="directory relative model references resolve against")
    rd.set_defaults(fn=cmd_relabel_dataset)

    dc = sub.add_parser("card", help="write RUN's dataset card (pairs/README.md) and plots (plots/*.png)")
    dc.add_argument("run")
    dc.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload the pairs as a Hub dataset")
    dc.add_argument("--public", action="store_true", help="with --push-to-hub: create a public repo")
    dc.set_defaults(fn=cmd_card)

    sv = sub.add_parser("serve", help="local Prefect server + work pools + deployments + a process worker")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=4200)
    sv.add_argument("--pool", default="cpu", help="work pool the worker serves ('' for no worker)")
    sv.add_argument("--verbose", action="store_true", help="show server and worker output")
    sv.set_defaults(fn=cmd_serve)

    i = sub.add_parser("inspect", help="duckdb with one view per stage of RUN")
    i.add_argument("run")
    i.add_argument("-c", "--command", help="run one SQL statement and exit")
    i.set_defaults(fn=cmd_inspect)

    from richpref.cli.training import register as register_training  # finetune, evaluate

    register_training(sub)
    from richpref.cli.rounds import register as register_rounds

    register_rounds(sub)
    from richpref.exports.writer import register as register_export  # export RUN --format ... --out DIR

    register_export(sub)

    args = p.parse_args(argv)
    from richpref.common.objstore import DataDirError

    try:
        _quiet_defaults(args.data_dir)
    except DataDirError as exc:
        print(f"richpref: {exc}", file=sys.stderr)
        return 2
    import logging

    logging.getLogger("richpref").setLevel(logging.INFO)  # one progress line per shard
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
