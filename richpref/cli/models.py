"""`richpref models build-tiny | convert-llava-critic` and `richpref doctor`: the models a profile loads."""
from __future__ import annotations

import argparse
import json
import sys

from richpref.cli.errors import fail, folder, output_file
from richpref.common.argtypes import at_least


def _progress_lines() -> None:
    """A handler for richpref's progress lines (its logger is at INFO: `commands.main`); other
    libraries' INFO records stay out (the ONNX exporter's optimizer logs a line per pass while the
    tiny cut-out net is built)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")


def cmd_build_tiny(args: argparse.Namespace) -> int:
    from richpref.models.tiny import build_tiny_models

    _progress_lines()
    paths = build_tiny_models(args.dir, seed=args.seed, force=args.force)
    print(json.dumps(paths, indent=2))
    return 0


def cmd_convert_llava_critic(args: argparse.Namespace) -> int:
    from richpref.models.convert_llava_critic import ConversionError, convert_llava_critic

    _progress_lines()
    try:
        report = convert_llava_critic(args.src, args.dst, dtype=args.dtype, vision_heads=args.vision_heads,
                                      vision_layers=args.vision_layers)
    except ConversionError as exc:
        return fail(exc)
    print(f"converted {report.tensors_mapped} tensors into {report.dst} (dropped {len(report.tensors_dropped)}); "
          f"point critique.model at it")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.finetune:  # a finetune config: memory estimate from the checkpoint's headers
        from richpref.models.runtime import ModelNotAvailable
        from richpref.schemas.config import ProfileError
        from richpref.schemas.training import load_finetune_config
        from richpref.training.memory import estimate_memory, format_estimate
        from richpref.training.setup import preflight

        try:
            cfg = load_finetune_config(args.finetune, args.set, args.models_root)
            print(format_estimate(cfg, estimate_memory(cfg, args.workers), args.workers))
            # then what the launch would refuse on the model side (the pairs may not be curated yet)
            preflight(cfg.model_copy(update={"data": [s for s in cfg.data if s.path is None]}))
        except (ProfileError, ModelNotAvailable, ValueError, FileNotFoundError) as exc:
            return fail(exc)
        return 0
    from richpref.doctor.measure import format_report, run_doctor, write_json
    from richpref.doctor.checks import DoctorError
    from richpref.schemas.config import ProfileError, load_profile

    from richpref.tasks import PIPELINE

    # The sections of the stages that load a model; cutout follows cutout.device / cutout.providers: its
    # CUDA needs the onnxruntime-gpu build.
    model_sections = list(dict.fromkeys(s.section for s in PIPELINE if s.loads_model and s.section != "cutout"))
    overrides = [f"{s}.{k}={v}" for k, v in (("device", args.device), ("dtype", args.dtype)) if v for s in model_sections]
    try:
        profile = load_profile(args.profile, overrides + args.set, args.models_root)
        report = run_doctor(profile, items=args.items, project_items=args.project_items, workers=args.workers,
                            progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ProfileError as exc:
        return fail(exc)
    except DoctorError as exc:
        return fail(exc)
    print(format_report(report))
    if args.json:
        print(f"table written to {write_json(report, args.json)}")
    return 0



def register(sub) -> None:
    m = sub.add_parser("models", help="model utilities")
    msub = m.add_subparsers(dest="models_cmd", required=True)

    b = msub.add_parser("build-tiny", help="build the tiny random-weight models into DIR")
    b.add_argument("dir", nargs="?", default="data/models/tiny", type=folder)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build is there")
    b.set_defaults(fn=cmd_build_tiny)

    cv = msub.add_parser("convert-llava-critic",
                         help="convert a LLaVA-NeXT native llava_qwen checkpoint (lmms-lab/llava-critic-7b) "
                              "to transformers' LLaVA-OneVision layout")
    cv.add_argument("src", help="directory of the native checkpoint")
    cv.add_argument("dst", type=folder, help="new directory for the transformers model + processor")
    cv.add_argument("--dtype", default="keep", choices=["keep", "float32", "float16", "bfloat16"])
    cv.add_argument("--vision-heads", type=at_least(1), default=None, help="SigLIP attention heads, for towers not built in")
    cv.add_argument("--vision-layers", type=at_least(1), default=None,
                    help="SigLIP layers to keep (default: tower depth - 1, as LLaVA-NeXT)")
    cv.set_defaults(fn=cmd_convert_llava_critic)

    d = sub.add_parser("doctor", help="load every model of a profile, run a few items through every stage and "
                                      "project the cost of a full run")
    d.add_argument("--profile", default="tiny", help="profile name in configs/ or a YAML path")
    d.add_argument("--items", type=at_least(1), default=8, help="source items to run through every stage (default 8)")
    d.add_argument("--project-items", type=at_least(1), default=100_000, help="items to project the run's cost to")
    d.add_argument("--workers", type=at_least(1), default=1, help="workers (GPUs) the projected run spreads over")
    d.add_argument("--json", metavar="PATH", type=output_file, default=None, help="also write the table as JSON")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a profile value, e.g. --set sample.dtype=float16 (repeatable)")
    d.add_argument("--models-root", default=None, help="directory relative model references resolve against")
    d.add_argument("--device", default=None, help="run every model stage on this device (e.g. cuda); --set wins")
    d.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="load every model stage's weights in this dtype; --set wins")
    d.add_argument("--finetune", metavar="CONFIG", default=None,
                   help="instead: estimate the memory of a finetune config (precision, LoRA, FSDP over --workers)")
    d.set_defaults(fn=cmd_doctor)
