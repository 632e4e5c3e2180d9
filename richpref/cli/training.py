"""`richpref finetune` and `richpref evaluate`: the two flows from the command line.

Registered by `richpref/cli/commands.py`; nothing heavy is imported until a command runs.
"""
from __future__ import annotations

import argparse
import json

from richpref.cli.errors import fail, folder
from richpref.common.argtypes import at_least, port


def cmd_finetune(args: argparse.Namespace) -> int:
    from richpref.ops.entrypoints import FINETUNE, run_flow
    from richpref.models.runtime import ModelNotAvailable
    from richpref.schemas.config import ProfileError
    from richpref.schemas.training import load_finetune_config
    from richpref.common.objstore import DataDirError
    from richpref.training.finetune import check_before_launch, default_output_dir, with_pairs
    from richpref.training.data import DataError
    from richpref.training.launcher import LaunchFailed

    import os

    from richpref.training.launcher import Machines

    try:
        machines = Machines(args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port)
    except ValueError as exc:
        return fail(exc)
    if machines.num_machines > 1:
        os.environ.update(machines.to_env())  # the launcher (in this process's flow) reads them
    try:
        # A bad config, a checkpoint of another family, pairs without the masks it needs: refused before
        # Prefect starts and before any model loads.
        cfg = with_pairs(load_finetune_config(args.config, args.set, args.models_root), args.pairs)
        if args.output_dir is None:
            default_output_dir(cfg, args.data_dir)  # a data dir on an object store holds no checkpoints
        # checkpoints of another config in the output folder too: refused now, not after Prefect starts
        check_before_launch(cfg, args.output_dir or default_output_dir(cfg, args.data_dir))
        result = run_flow(FINETUNE, config=args.config, pairs=args.pairs, output_dir=args.output_dir,
                          overrides=args.set, num_processes=args.num_processes, max_restarts=args.max_restarts,
                          data_dir=args.data_dir, models_root=args.models_root)
    except (ProfileError, ModelNotAvailable, DataError, DataDirError, ValueError, FileNotFoundError) as exc:
        return fail(exc)
    except LaunchFailed as exc:
        return fail(exc, 1)
    print(json.dumps(result, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from richpref.ops.entrypoints import EVALUATE, run_flow
    from richpref.common.objstore import DataDirError
    from richpref.training.evaluation import default_output_dir, preflight, with_data_dir
    from richpref.models.runtime import ModelNotAvailable
    from richpref.schemas.config import ProfileError
    from richpref.schemas.training import load_evaluate_config

    try:
        # before Prefect starts
        cfg = load_evaluate_config(args.config, args.set, args.models_root)
        if args.output_dir is None:
            default_output_dir(cfg, args.data_dir)  # a data dir on an object store holds no images or tables
        preflight(with_data_dir(cfg, args.data_dir))
        result = run_flow(EVALUATE, config=args.config, overrides=args.set, output_dir=args.output_dir,
                          data_dir=args.data_dir, models_root=args.models_root)
    except (ProfileError, ModelNotAvailable, DataDirError, ValueError) as exc:
        return fail(exc)
    print(result["markdown"])
    print(f"written to {result['output_dir']} (table.parquet, table.md, scores.parquet, grid.png)")
    return 0


_ROOT_HELP = ("directory relative model references resolve against (default: RICHPREF_MODELS_ROOT, else the "
              "config's models_root)")


def register(sub) -> None:
    """Add the `finetune` and `evaluate` subcommands to the `richpref` parser's subparsers."""
    f = sub.add_parser("finetune", help="Diffusion-DPO (SD1.5/SDXL) or Flow-DPO (SD3, FLUX.1, Qwen-Image) "
                                              "fine-tune (the finetune flow, under accelerate launch)")
    f.add_argument("--config", default="finetune-tiny",
                   help="finetune config: a name in configs/ (finetune-flux-dev-flowdpo, or flux-dev-flowdpo) or a YAML path")
    f.add_argument("--pairs", default=None, help="Pick-a-Pic Parquet file/folder for the config's `pairs` source "
                                                 "(e.g. data/runs/demo/pairs)")
    f.add_argument("--output-dir", default=None, type=folder, help="default: <data-dir>/finetune/<config name>; rerun to resume")
    f.add_argument("--num-processes", type=at_least(1), default=1, help="accelerate processes on this machine (one per GPU)")
    f.add_argument("--num-machines", type=int, default=1,
                   help="machines training together (run the same command on each, with its own --machine-rank)")
    f.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0..M-1 (0: the main one)")
    f.add_argument("--main-process-ip", default=None, metavar="HOST",
                   help="address of the rank-0 machine, reachable from every machine (with --num-machines > 1)")
    f.add_argument("--main-process-port", type=port, default=None, metavar="PORT",
                   help="rendezvous port on the rank-0 machine (default 29500; the same on every machine)")
    f.add_argument("--max-restarts", type=at_least(0), default=1, help="relaunch after a crash this many times (resumes)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set max_train_steps=100 (repeatable)")
    f.add_argument("--models-root", default=None, help=_ROOT_HELP)
    f.set_defaults(fn=cmd_finetune)

    e = sub.add_parser("evaluate", help="base vs tuned: same prompts and seeds, reward table and image grid")
    e.add_argument("--config", default="evaluate-tiny",
                   help="evaluate config: a name in configs/ (evaluate-flux-dev, or flux-dev) or a YAML path")
    e.add_argument("--output-dir", default=None, type=folder, help="default: <data-dir>/evaluate/<config name>")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    e.add_argument("--models-root", default=None, help=_ROOT_HELP)
    e.set_defaults(fn=cmd_evaluate)
