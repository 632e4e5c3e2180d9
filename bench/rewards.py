"""Reward scorers' throughput on the tiny models: images/s at batch 1 and batch 8.

    python bench/rewards.py [--models data/models/tiny] [--images 32] [--repeats 3] [--device cpu]

Scores `--images` random 64x64 images (pairs for dino_patch) with every reward of the tiny profile and its subject gate's DINOv2,
after one warm-up call, and prints the best of `--repeats` runs per scorer and batch size. The tiny
models are random-weight stand-ins of the real architectures, so the figures measure the code path
(preprocessing, batching, model call), not the real models' cost.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    from richpref.models.rewards import is_pairwise, load_reward_spec
    from richpref.models.tiny import build_tiny_models
    from richpref.schemas.config import RewardSpec, load_profile

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="data/models/tiny")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build_tiny_models(args.models)
    profile = load_profile("tiny", models_root=args.models)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    prompts = ["a red bicycle leaning against a yellow brick wall"] * args.images
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {args.images} images of 64x64")
    print(f"{'reward':<12} {'load s':>7} {'img/s b=1':>10} {'img/s b=8':>10}")
    gate = profile.relabel.subject_gate
    specs = {n: profile.relabel.rewards[n] for n in profile.relabel.scored()}
    specs["dino_patch"] = RewardSpec(kind="dino_patch", model=gate.model, patch=gate.patch, stride=gate.stride)
    for name, spec in specs.items():
        t0 = time.perf_counter()
        scorer = load_reward_spec(spec, profile.models_root, device=args.device, dtype="float32")
        load_s = time.perf_counter() - t0
        rates = []
        for bs in (1, 8):
            def run():
                if is_pairwise(scorer):  # one pair = two images
                    half = len(images) // 2
                    scorer.score_pairs(images[:half], images[half:], prompts[:half], batch_size=bs)
                else:
                    scorer.score(images, prompts, batch_size=bs)
            run()  # warm-up
            best = min(_timed(run) for _ in range(args.repeats))
            rates.append(len(images) / best)
        print(f"{name:<12} {load_s:>7.2f} {rates[0]:>10.1f} {rates[1]:>10.1f}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
