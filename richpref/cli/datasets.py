"""`richpref relabel-dataset`: rescore an existing Pick-a-Pic-format dataset."""
from __future__ import annotations

import argparse
import json

from richpref.cli.errors import data_folder, fail, run_name


def cmd_relabel_dataset(args: argparse.Namespace) -> int:
    from richpref.doctor.checks import ModelProblem, check_key_inputs, resolve_models
    from richpref.tasks import stages_for
    from richpref.schemas.config import ProfileError, load_profile
    from richpref.recipes.relabel_dataset import DatasetError, dataset_profile, relabel_dataset
    from richpref.run.run_state import check_same_pipeline
    from richpref.run.storage import RunStore

    try:
        prof = load_profile(args.profile, args.set, args.models_root)
        run_profile = dataset_profile(args.src, prof, args.reward, drop_near_ties=args.drop_near_ties)
        check_same_pipeline(RunStore(args.out_dir, args.run), run_profile)  # e.g. --run of a curate run
        if args.plan:
            from richpref.run.plan import plan_run

            print(plan_run(run_profile, args.out_dir, args.run).format())
            return 0
        resolve_models(run_profile)  # the rewards that score: a missing one fails before any shard
        check_key_inputs(run_profile, stages_for(run_profile))  # and a judge's question that is not there
        result = relabel_dataset(args.src, args.out_dir, prof, reward=args.reward, drop_near_ties=args.drop_near_ties,
                                 run=args.run)
    except (ProfileError, DatasetError, ModelProblem) as exc:
        return fail(exc)
    print(json.dumps({k: result[k] for k in ("rows", "kept", "rejected", "agreement_with_source_label", "pairs", "report")},
                     indent=2))
    return 0


def register(sub) -> None:
    rd = sub.add_parser("relabel-dataset", help="rescore a Pick-a-Pic-format Parquet dataset's jpg_0/jpg_1 and rewrite label_0")
    rd.add_argument("src", help="Parquet file(s): a path, folder, glob or fsspec URL (quote globs)")
    rd.add_argument("out_dir", type=data_folder, help="data dir of the run: the relabelled part-*.parquet, README.md and plots land in "
                                    "OUT_DIR/runs/RUN/pairs/ (`richpref --data-dir OUT_DIR status RUN` and "
                                    "`inspect RUN` read it)")
    rd.add_argument("--run", default="relabel", type=run_name, help="run name under OUT_DIR/runs/ (default relabel); a rerun computes "
                                                     "only the shards that are missing or stale")
    rd.add_argument("--profile", default="tiny", help="profile whose score.rewards score the images")
    rd.add_argument("--reward", default=None, help="use only this reward of the profile (e.g. imagereward)")
    rd.add_argument("--drop-near-ties", action="store_true",
                    help="also drop pairs whose margin is <= relabel.min_margin (default: the label follows the "
                         "reward's order; only pairs without one are dropped)")
    rd.add_argument("--plan", action="store_true", help="print which shards each stage would compute and exit")
    rd.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a profile value")
    rd.add_argument("--models-root", default=None, help="directory relative model references resolve against")
    rd.set_defaults(fn=cmd_relabel_dataset)
