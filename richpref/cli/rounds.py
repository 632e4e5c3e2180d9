"""`richpref rounds`: RPO rounds (curate -> fine-tune -> sample from the tuned model -> curate again)."""
from __future__ import annotations

import argparse

from richpref.cli.errors import fail


def cmd_rounds(args: argparse.Namespace) -> int:
    from richpref.ops.entrypoints import ROUNDS, run_flow
    from richpref.models.runtime import ModelNotAvailable
    from richpref.schemas.config import ProfileError, load_profile
    from richpref.schemas.rounds import load_rounds_config
    from richpref.schemas.training import load_evaluate_config, load_finetune_config
    from richpref.doctor.checks import ModelProblem, check_key_inputs, resolve_models
    from richpref.tasks import stages_for
    from richpref.common.objstore import DataDirError
    from richpref.recipes.rounds import (RoundsState, check_continues, check_same_base, evaluate_overrides,
                                         finetune_overrides, round_prompts)
    from richpref.training.finetune import PAIRS_SOURCE
    from richpref.training.setup import preflight as finetune_preflight
    from richpref.training.evaluation import preflight as evaluate_preflight
    from richpref.run.runner import CurateFailed
    from richpref.training.launcher import LaunchFailed

    try:
        cfg = load_rounds_config(args.config, args.set, args.models_root)  # bad configs fail before Prefect starts
        RoundsState(args.data_dir, cfg)  # its fine-tunes and table are local files; a name another config used
        # The first round curates with every model of the profile: they resolve before it starts.
        profile = load_profile(cfg.profile, cfg.curate_overrides, cfg.models_root)
        resolve_models(profile)
        check_key_inputs(profile, stages_for(profile))  # its prompt templates
        if cfg.prompts == "next":
            round_prompts(cfg)  # every round has source rows (a short source fails before round 1, not after)
        # Round 1's fine-tune: its model, its family and its other pairs sources (its own pairs come later).
        tune = load_finetune_config(cfg.finetune, finetune_overrides(cfg, None, []))
        arch = finetune_preflight(tune.model_copy(update={"data": [s for s in tune.data if s.name != PAIRS_SOURCE]}))
        check_same_base(profile, tune, arch)  # round k > 1 samples with the tuned weights
        check_continues(cfg, tune, arch)  # and fine-tunes from them
        # The evaluation after each round: its prompts, rewards and base model, before round 1 starts.
        evaluate_preflight(load_evaluate_config(cfg.evaluate, evaluate_overrides(cfg, [])))
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
