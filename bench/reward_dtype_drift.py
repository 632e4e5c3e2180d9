"""Reward scores in float16 against float32 on the tiny models: how far 16-bit moves them.

    python bench/reward_dtype_drift.py [--models data/models/tiny] [--images 64] [--device cpu] [--dtype float16]

Scores `--images` random 64x64 images with every per-image reward of the tiny profile in float32 and
in `--dtype`, and prints per reward: the largest and the mean |difference| relative to the float32
scores' spread (std), the share of image pairs whose order flips, and the tie tolerance richpref
gives scores of that dtype (richpref/tasks/pairing.py) in the same units. The tiny models are random-weight
stand-ins of the real architectures: the figures measure what 16-bit arithmetic does to these
networks' outputs, not to the real checkpoints'.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    from richpref.models.rewards import load_reward_spec
    from richpref.models.tiny import build_tiny_models
    from richpref.tasks.pairing import relative_noise
    from richpref.schemas.config import load_profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="data/models/tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = ap.parse_args()
    build_tiny_models(args.models)
    profile = load_profile("tiny", models_root=args.models)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    prompts = ["a red bicycle leaning against a yellow brick wall"] * args.images
    print(f"{args.images} images of 64x64, device {args.device}: {args.dtype} against float32")
    print(f"{'reward':<12} {'max |d|/std':>12} {'mean |d|/std':>13} {'order flips':>12} {'tie tol/std':>12}")
    i, j = np.triu_indices(args.images, 1)
    for name in profile.relabel.scored():
        spec = profile.relabel.rewards[name]
        full = np.asarray(load_reward_spec(spec, profile.models_root, device=args.device, dtype="float32")
                          .score(images, prompts), dtype=np.float64)
        half = np.asarray(load_reward_spec(spec, profile.models_root, device=args.device, dtype=args.dtype)
                          .score(images, prompts), dtype=np.float64)
        std = full.std()
        d = np.abs(half - full) / std
        flips = np.mean(np.sign(full[i] - full[j]) != np.sign(half[i] - half[j]))
        tol = relative_noise(args.dtype) * np.abs(full).max() / std
        print(f"{name:<12} {d.max():>12.2e} {d.mean():>13.2e} {flips:>12.2%} {tol:>12.2e}")


if __name__ == "__main__":
    main()
