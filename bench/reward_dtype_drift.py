"""Reward scores in float16 against float32 on the tiny models: how far 16-bit moves them.

    python bench/reward_dtype_drift.py [--models data/models/tiny] [--images 64] [--device cpu] [--dtype float16]

Scores `--images` random 64x64 images with every per-image reward of the tiny profile in float32 and
in `--dtype`, and prints per reward: the largest and the mean |difference| relative to the float32
scores' spread (std), the share of image pairs whose order flips, and the tie tolerance richpref
gives scores of that dtype (richpref/tasks/pairing.py) in the same units. The tiny models are random-weight
stand-ins of the real architectures: the figures measure what 16-bit arithmetic does to these
networks' outputs, not to the real checkpoints'. On the harness (a fresh process; deterministic, so one
repeat by default): bench/results/reward_dtype_drift-<commit>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import harness  # noqa: E402


def child(args) -> None:
    from richpref.models.rewards import load_reward_spec
    from richpref.schemas.config import load_profile
    from richpref.tasks.pairing import relative_noise

    profile = load_profile("tiny", models_root=args.models)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    prompts = ["a red bicycle leaning against a yellow brick wall"] * args.images
    i, j = np.triu_indices(args.images, 1)
    out = {}
    for name in profile.score.scored():
        spec = profile.score.rewards[name]
        full = np.asarray(load_reward_spec(spec, profile.models_root, device=args.device, dtype="float32")
                          .score(images, prompts), dtype=np.float64)
        half = np.asarray(load_reward_spec(spec, profile.models_root, device=args.device, dtype=args.dtype)
                          .score(images, prompts), dtype=np.float64)
        std = full.std()
        d = np.abs(half - full) / std
        out[f"{name}.max_diff_over_std"] = float(d.max())
        out[f"{name}.mean_diff_over_std"] = float(d.mean())
        out[f"{name}.order_flips"] = float(np.mean(np.sign(full[i] - full[j]) != np.sign(half[i] - half[j])))
        out[f"{name}.tie_tol_over_std"] = float(relative_noise(args.dtype) * np.abs(full).max() / std)
        print(f"{name:<12} {d.max():>12.2e} {d.mean():>13.2e} {out[f'{name}.order_flips']:>12.2%} "
              f"{out[f'{name}.tie_tol_over_std']:>12.2e}", flush=True)
    out["worst_order_flips"] = max(v for k, v in out.items() if k.endswith(".order_flips"))
    harness.print_child("RESULT ", {"drift": out})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="data/models/tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = harness.child_args(ap, repeats=1).parse_args()
    if args.child:
        return child(args)
    harness.run("reward_dtype_drift", args.repeats, ["drift"], "drift.worst_order_flips", "share of pairs",
                script=__file__, args=harness.child_argv(sys.argv[1:]),
                note=f"{args.dtype} against float32 on {args.images} random 64x64 images, device "
                     f"{args.device}: the largest share of image pairs whose order flips over the tiny "
                     f"profile's rewards; deterministic, so N = 1 by default")


if __name__ == "__main__":
    main()
