"""HPSv3 and EditReward throughput in-process on their tiny twins: judgements/s per batch size.

    python bench/head_judges.py [--models data/models/tiny] [--images 8] [--batches 1,8] [--repeats 1] [--device cpu]

hpsv3: images scored/s (`score`); edit_reward: edits judged/s (`score_edits`: one (original, instructions,
edit) through both heads; relabel's `score_pairs` judges the original too, i.e. twice the work).
Every image is brought to 256·28·28 pixels as the references do, so the vision tower sees 1024
patches per image whatever the input size. Tiny random weights: the figures measure the code path
(PIL resize, processor, one model call per batch and head), not the 7B models' cost. Writes
bench/results/judges-<commit>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def main() -> None:
    from richpref.models.rewards import load_reward
    from richpref.models.tiny import LAYOUT, build_tiny_models

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="data/models/tiny")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    build_tiny_models(args.models)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(args.images)]
    texts = ["a red bicycle leaning against a yellow brick wall"] * args.images
    runs = []
    for kind in ("hpsv3", "edit_reward"):
        root = Path(args.models) / LAYOUT[kind]
        t0 = time.perf_counter()
        judge = load_reward(kind, str(root), backbone=str(root / "base"), device=args.device, dtype="float32")
        load_s = time.perf_counter() - t0
        for bs in (int(b) for b in args.batches.split(",")):
            def run():
                if kind == "hpsv3":
                    judge.score(images, texts, batch_size=bs)
                else:
                    judge.score_edits(images, images[::-1], texts, batch_size=bs)
            run()  # warm-up
            for i in range(args.repeats):
                t0 = time.perf_counter()
                run()
                rate = len(images) / (time.perf_counter() - t0)
                runs.append({"side": kind, "repeat": i, "batch": bs, "per_s": rate, "load_s": load_s})
                print(f"{kind:<12} batch {bs:>3}: {rate:7.2f} /s (load {load_s:.1f} s)", flush=True)
        judge.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = {}
    for r in runs:
        summary.setdefault(f"{r['side']}_b{r['batch']}_per_s", []).append(r["per_s"])
    summary = {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in summary.items()}
    out = Path("bench/results") / f"judges-{commit}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "bench": "judges", "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()}, "command": " ".join(sys.argv),
        "repeats": args.repeats, "runs": runs, "summary": summary,
        "headline": {"name": "hpsv3 tiny images/s at the largest batch", "unit": "images/s", "goal": None, "met": None,
                     "value": summary[f"hpsv3_b{args.batches.split(',')[-1]}_per_s"]["median"]}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
