"""Reward scorers' throughput on the tiny models: images/s at batch 1 and batch 8.

    python bench/rewards.py [--models data/models/tiny] [--images 32] [--repeats 3] [--device cpu]

Scores `--images` random 64x64 images (pairs for dino_patch) with every reward of the tiny profile and
its subject gate's DINOv2. On the harness (bench/harness.py): each repeat is a fresh process that loads
every scorer once, warms it up, then times one call per batch size in alternated order (batch 1 first in
even repeats, batch 8 first in odd ones); raw runs go to bench/results/rewards-<commit>.json. Headline:
the smallest batch-8 / batch-1 speedup over the scorers (no goal). The tiny models are random-weight
stand-ins of the real architectures, so the figures measure the code path (preprocessing, batching,
model call), not the real models' cost.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import harness  # noqa: E402

SIDES = ("b1", "b8")


def child(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from richpref.models.rewards import is_pairwise, load_reward_spec
    from richpref.schemas.config import RewardSpec, load_profile

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = load_profile("tiny", models_root=args.models)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    prompts = ["a red bicycle leaning against a yellow brick wall"] * args.images
    gate = profile.score.subject_gate
    specs = {n: profile.score.rewards[n] for n in profile.score.scored()}
    specs["dino_patch"] = RewardSpec(kind="dino_patch", model=gate.model, patch=gate.patch, stride=gate.stride)
    out: dict[str, dict] = {s: {} for s in args.order}
    out["load"] = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        scorer = load_reward_spec(spec, profile.models_root, device=args.device, dtype="float32")
        out["load"][f"{name}.load_s"] = time.perf_counter() - t0

        def run(bs: int) -> None:
            if is_pairwise(scorer):  # one pair = two images
                half = len(images) // 2
                scorer.score_pairs(images[:half], images[half:], prompts[:half], batch_size=bs)
            else:
                scorer.score(images, prompts, batch_size=bs)

        run(8)  # warm-up
        for side in args.order:
            t0 = time.perf_counter()
            run(int(side[1:]))
            out[side][f"{name}.images_per_s"] = len(images) / (time.perf_counter() - t0)
    harness.print_child("RESULT ", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="data/models/tiny", help="a tiny build (richpref models build-tiny DIR)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = harness.child_args(ap, repeats=3).parse_args()
    if args.child:
        return child(args)
    harness.run("rewards", args.repeats, SIDES, "worst_speedup", "x", script=__file__, args=harness.child_argv(sys.argv[1:]),
                derive=lambda res: {**harness.rate_ratios(res, SIDES, "images_per_s"), **res["load"]},
                note=f"images/s at batch 8 / batch 1, the smallest over the tiny profile's rewards and "
                     f"dino_patch; {args.images} random 64x64 images, one timed call per batch size "
                     f"after a warm-up, device {args.device}")


if __name__ == "__main__":
    main()
