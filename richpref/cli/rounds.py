"""`richpref rounds`: RPO rounds (curate -> fine-tune -> sample from the tuned model -> curate again)."""
from __future__ import annotations

import argparse

from richpref.cli.errors import fail


def cmd_rounds(args: argparse.Namespace) -> int:
    from richpref.ops.entrypoints import ROUNDS, run_flow
    from richpref.models.runtime import ModelNotAvailable
    from richpref.schemas.config import ProfileError
    from richpref.schemas.rounds import load_rounds_config
    from richpref.doctor.checks import ModelProblem
    from richpref.common.objstore import DataDirError
    from richpref.recipes.rounds import RoundsState, preflight
    from richpref.run.runner import CurateFailed
    from richpref.training.launcher import LaunchFailed

    try:
        cfg = load_rounds_config(args.config, args.set, args.models_root)  # bad configs fail before Prefect starts
        RoundsState(args.data_dir, cfg)  # its fine-tunes and table are local files; a name another config used
        preflight(cfg)  # every round's models, prompts, fine-tune and evaluation (the flow checks them too)
        result = run_flow(ROUNDS, config=args.config, overrides=args.set, data_dir=args.data_dir,
                          models_root=args.models_root)
    except (ProfileError, ModelNotAvailable, ModelProblem, DataDirError, ValueError) as exc:
        return fail(exc)
    except (CurateFailed, LaunchFailed) as exc:  # a round's curate or fine-tune: the message names what to redo
        return fail(exc, 1)
    print(result["markdown"])
    print(f"written to {result['rounds_dir']} (table.parquet, table.md, rewards.png; round-<k>/finetune)")
    return 0


def register(sub) -> None:
    r = sub.add_parser("rounds", help="RPO rounds: curate, fine-tune, sample from the tuned model, curate again")
    r.add_argument("--config", default="rounds-tiny",
                   help="rounds config: a name in configs/ (rounds-tiny, or tiny) or a YAML path")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a rounds config value, e.g. --set rounds=3 (repeatable)")
    r.add_argument("--models-root", default=None,
                   help="directory relative model references resolve against (default: RICHPREF_MODELS_ROOT, else "
                        "the config's models_root)")
    r.set_defaults(fn=cmd_rounds)
